//! Weights: checkpoint formats, name/shape checking, hub download, conversion, and the
//! fingerprint that names a base model's weights.

pub mod checked;
pub mod convert;
pub mod digest;
pub mod fingerprint;
pub mod hub;
pub mod pickle_guard;
pub mod store;

pub use checked::{CheckedWeights, LoadReport, Source};
pub use fingerprint::{base_fingerprint, base_fingerprint_cached};
pub use store::{detect_format, CheckpointFormat, TensorStore};
