//! The learned token: one embedding row `v*` that replaces the output of the frozen token table at
//! the placeholder of the positive prompt, before the positional embedding (spec §3).

use crate::error::{Error, Result};
use crate::model::text_encoder::{replace_rows, TextEncoder};
use crate::model::tokenizer::{eot_position, ClipTokenizer};
use crate::personalize::block::TokenPositions;
use crate::prompts::{
    DEFAULT_NEGATIVE_PROMPT as NEGATIVE_PROMPT, DEFAULT_PROMPT as POSITIVE_PROMPT, INIT_WORD,
    PLACEHOLDER,
};
use candle_core::{DType, Tensor};

/// Token ids of one prompt with its placeholder and end-of-text columns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PromptTokens {
    pub text: String,
    pub ids: Vec<u32>,
    /// Placeholder column (`None` for a prompt without one).
    pub placeholder: Option<usize>,
    pub eot: usize,
}

impl PromptTokens {
    /// The positive prompt: the placeholder must occur exactly once.
    pub fn positive(tokenizer: &ClipTokenizer, text: &str) -> Result<Self> {
        let (ids, positions) = tokenizer.encode_with_placeholder(text, PLACEHOLDER)?;
        if positions.len() != 1 {
            return Err(Error::Input(format!(
                "prompt {text:?} must contain the placeholder {PLACEHOLDER:?} exactly once, found {}",
                positions.len()
            )));
        }
        Ok(PromptTokens {
            text: text.to_string(),
            eot: eot_position(&ids)?,
            placeholder: Some(positions[0]),
            ids,
        })
    }

    /// A prompt without placeholder (the negative prompt).
    pub fn plain(tokenizer: &ClipTokenizer, text: &str) -> Result<Self> {
        let ids = tokenizer.encode(text)?;
        Ok(PromptTokens {
            text: text.to_string(),
            eot: eot_position(&ids)?,
            placeholder: None,
            ids,
        })
    }

    pub fn default_positive(tokenizer: &ClipTokenizer) -> Result<Self> {
        Self::positive(tokenizer, POSITIVE_PROMPT)
    }

    pub fn default_negative(tokenizer: &ClipTokenizer) -> Result<Self> {
        Self::plain(tokenizer, NEGATIVE_PROMPT)
    }

    fn ids_tensor(&self, text: &TextEncoder) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.ids.clone(),
            (1, self.ids.len()),
            text.device(),
        )?)
    }

    /// The text context `[1, L, width]`; the placeholder row of the token table replaced by
    /// `token` (`[1, width]` or `[width]`) when both are present. Differentiable in `token`.
    pub fn context(&self, text: &TextEncoder, token: Option<&Tensor>) -> Result<Tensor> {
        let emb = text.token_embeddings(&self.ids_tensor(text)?)?;
        let emb = match (self.placeholder, token) {
            (Some(k), Some(token)) => replace_rows(&emb, &[(0, k)], token)?,
            _ => emb,
        };
        Ok(text.forward_embeddings(&emb)?)
    }

    /// Mask/L_Pers columns for `rows` rows of this prompt. A prompt without placeholder (the
    /// negative branch) uses `placeholder_column`, as ViCo's sampler reuses the positive one.
    pub fn positions(&self, rows: usize, placeholder_column: usize) -> TokenPositions {
        TokenPositions {
            placeholder: vec![self.placeholder.unwrap_or(placeholder_column); rows],
            eot: vec![self.eot; rows],
        }
    }
}

/// The token-table row of a single-token word (`[1, width]`, f32): the initial value of `v*`.
pub fn init_embedding(tokenizer: &ClipTokenizer, text: &TextEncoder, word: &str) -> Result<Tensor> {
    let ids = tokenizer.encode(word)?;
    let id = match ids.as_slice() {
        [_, id, end, ..] if *end == crate::model::tokenizer::END_ID => *id,
        _ => {
            return Err(Error::Input(format!(
                "init word {word:?} is not a single token"
            )))
        }
    };
    let ids = Tensor::from_vec(vec![id], (1, 1), text.device())?;
    Ok(text
        .token_embeddings(&ids)?
        .reshape((1, text.width()))?
        .to_dtype(DType::F32)?)
}

/// Id of the init word (for the identity metadata).
pub fn init_word_id(tokenizer: &ClipTokenizer) -> Result<u32> {
    let ids = tokenizer.encode(INIT_WORD)?;
    ids.get(1)
        .copied()
        .ok_or_else(|| Error::Tokenizer("empty encoding of the init word".into()))
}
