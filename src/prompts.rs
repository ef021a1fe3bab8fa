//! The paper's prompts and the placeholder of the learned token, for restoration and training
//! alike.

/// The positive prompt. `*` stands for the identity's learned token; the base model without an
/// identity gets it with `*` replaced by [`BASE_SUBJECT`].
pub const DEFAULT_PROMPT: &str =
    "a Photo of *, masterpiece, best quality, realistic, very clear, professional";
/// The negative prompt (the unconditional branch of classifier-free guidance).
pub const DEFAULT_NEGATIVE_PROMPT: &str =
    "3d, cartoon, anime, sketches, worst quality, low quality";
/// Placeholder string of the learned token.
pub const PLACEHOLDER: &str = "*";
/// The word whose token-table row initialises the learned token.
pub const INIT_WORD: &str = "person";
/// What `*` becomes without an identity: the token's initialisation word.
pub const BASE_SUBJECT: &str = INIT_WORD;
