//! The OpenCLIP (CLIP BPE) tokenizer as `open_clip.tokenize` applies it: `<start_of_text>`, the
//! BPE ids, `<end_of_text>`, truncated to 77 ids (keeping the end token) and right-padded with 0.
//!
//! The bundled `assets/tokenizer.json` reproduces open_clip's ids except for text that ftfy would
//! repair (mojibake) and word-final capital sigma; see `assets/TOKENIZER-LICENSE.md`.

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// Id of `<start_of_text>`.
pub const START_ID: u32 = 49406;
/// Id of `<end_of_text>`; the largest id, so `argmax(ids)` finds it.
pub const END_ID: u32 = 49407;
/// Padding id of `open_clip.tokenize`.
pub const PAD_ID: u32 = 0;
/// Token sequence length of the OpenCLIP text towers.
pub const CONTEXT_LENGTH: usize = 77;

static BUNDLED_TOKENIZER: &[u8] = include_bytes!("../../assets/tokenizer.json");

pub struct ClipTokenizer {
    inner: Tokenizer,
}

impl ClipTokenizer {
    /// Loads a Hugging Face `tokenizer.json` holding the CLIP BPE.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// The tokenizer shipped inside the binary (`assets/tokenizer.json`).
    pub fn from_bundled() -> Result<Self> {
        Self::from_bytes(BUNDLED_TOKENIZER)
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let tokenizer = ClipTokenizer { inner };
        for (name, id) in [("<start_of_text>", START_ID), ("<end_of_text>", END_ID)] {
            if tokenizer.token_id(name) != Some(id) {
                return Err(Error::Tokenizer(format!(
                    "not the CLIP BPE tokenizer: `{name}` is not id {id}"
                )));
            }
        }
        Ok(tokenizer)
    }

    /// Exactly [`CONTEXT_LENGTH`] ids, as `open_clip.tokenize(text)[0]`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        if ids.first() != Some(&START_ID) {
            return Err(Error::Tokenizer(
                "tokenizer.json does not add <start_of_text>".into(),
            ));
        }
        // The file normally truncates and pads itself; enforce open_clip's rule regardless so a
        // tokenizer.json without those settings still gives the reference layout.
        if ids.len() > CONTEXT_LENGTH {
            ids.truncate(CONTEXT_LENGTH);
            ids[CONTEXT_LENGTH - 1] = END_ID;
        }
        ids.resize(CONTEXT_LENGTH, PAD_ID);
        Ok(ids)
    }

    /// The id of a vocabulary entry, e.g. `"*</w>"` -> 265.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes `text` with `placeholder` (e.g. `*`) made a word of its own, so that it is one token
    /// instead of merging with neighbouring punctuation (`*,` is a single BPE token), and returns
    /// the ids with the positions of the placeholder token. Fails when `text` lacks the
    /// placeholder, when the placeholder is not a single token, or when truncation drops it.
    pub fn encode_with_placeholder(
        &self,
        text: &str,
        placeholder: &str,
    ) -> Result<(Vec<u32>, Vec<usize>)> {
        if placeholder.trim().is_empty() {
            return Err(Error::Input("the placeholder string is empty".into()));
        }
        if !text.contains(placeholder) {
            return Err(Error::Input(format!(
                "prompt {text:?} does not contain the placeholder {placeholder:?}"
            )));
        }
        let placeholder_id = self.single_token_id(placeholder)?;
        let spaced = text.replace(placeholder, &format!(" {placeholder} "));
        let ids = self.encode(&spaced)?;
        let positions: Vec<usize> = ids
            .iter()
            .enumerate()
            .filter(|&(_, &id)| id == placeholder_id)
            .map(|(i, _)| i)
            .collect();
        if positions.is_empty() {
            return Err(Error::Input(format!(
                "the placeholder {placeholder:?} of prompt {text:?} falls beyond the {CONTEXT_LENGTH}-token limit"
            )));
        }
        Ok((ids, positions))
    }

    /// The id of `word` when it encodes to exactly one token.
    fn single_token_id(&self, word: &str) -> Result<u32> {
        let ids = self.encode(word)?;
        match ids.as_slice() {
            [START_ID, id, END_ID, ..] => Ok(*id),
            _ => Err(Error::Input(format!(
                "the placeholder {word:?} is not a single token of the CLIP vocabulary"
            ))),
        }
    }
}

/// Position of `<end_of_text>`: open_clip takes `argmax(ids)`, which is the first end token
/// because it has the largest id.
pub fn eot_position(ids: &[u32]) -> Result<usize> {
    ids.iter()
        .position(|&id| id == END_ID)
        .ok_or_else(|| Error::Input("token ids contain no <end_of_text>".into()))
}
