//! `.ckpt` -> safetensors conversion, so later loads are memory-mapped instead of unpickled.

use super::store::TensorStore;
use crate::error::{Error, Result};
use crate::fsutil;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes: u64,
}

/// Copies every tensor of `input` into a safetensors file at `output`, floating-point tensors
/// cast to `dtype` (integer buffers keep theirs). Names are kept exactly. The output is written
/// atomically and an existing file is replaced only with `force`.
pub fn convert_checkpoint(
    input: &Path,
    output: &Path,
    dtype: DType,
    force: bool,
) -> Result<ConvertReport> {
    fsutil::check_not_an_input(output, [input])?;
    fsutil::check_output_location(output, force)?;
    let store = TensorStore::open(input)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, (_, stored)) in store.shapes() {
        let target = if stored.is_float() { dtype } else { *stored };
        tensors.insert(name.clone(), store.load(name, target, &Device::Cpu)?);
    }
    let count = tensors.len();
    fsutil::write_atomic(output, fsutil::WriteMode::from_force(force), |tmp| {
        candle_core::safetensors::save(&tensors, tmp).map_err(|e| {
            Error::Weights(format!(
                "{}: cannot write safetensors: {e}",
                output.display()
            ))
        })
    })?;
    let bytes = std::fs::metadata(output)
        .map_err(|e| Error::io(output, e))?
        .len();
    Ok(ConvertReport {
        tensors: count,
        bytes,
    })
}
