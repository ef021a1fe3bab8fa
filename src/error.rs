//! Typed errors of the library. The CLI wraps them with `anyhow` and prints one line.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A configuration file or value that cannot be used.
    #[error("config: {0}")]
    Config(String),

    /// Checkpoint problems: unreadable file, missing or mis-shaped keys, wrong architecture.
    #[error("weights: {0}")]
    Weights(String),

    /// Bad user input (images, arguments, identity files).
    #[error("{0}")]
    Input(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
