//! The checkpoint reader (torch zip + pickle, or safetensors) and every stored tensor loaded
//! through the checked weight loader, as a model build does.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "ckpt");
    let Ok(store) = TensorStore::open(&path) else {
        return;
    };
    let shapes: Vec<(String, Vec<usize>)> = store
        .shapes()
        .iter()
        .map(|(k, (s, _))| (k.clone(), s.clone()))
        .collect();
    let weights = CheckedWeights::from_store(Arc::new(store));
    let vb = weights.var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
    for (name, shape) in shapes.iter().take(64) {
        let _ = vb.get(shape.as_slice(), name);
    }
    let _ = weights.finish(&[""]);
});
