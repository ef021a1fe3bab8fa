//! Weights: checkpoint formats, name/shape checking, hub download, conversion.

pub mod checked;
pub mod convert;
pub mod hub;
pub mod pickle_guard;
pub mod store;

pub use checked::{CheckedWeights, LoadReport, Source};
pub use store::{detect_format, CheckpointFormat, TensorStore};
