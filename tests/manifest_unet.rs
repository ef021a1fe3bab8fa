//! Full-size coverage of the UNet and the time-aware encoder: building them from the built-in
//! defaults (the released face model) requests exactly the keys and shapes of the released
//! checkpoint (`manifests/face_stablesr.json`), without allocating the weights.

mod common;

use candle_core::{DType, Device};
use pfstorer::config::BaseModelConfig;
use pfstorer::model::lq_encoder::LqEncoder;
use pfstorer::model::unet::UNet;
use pfstorer::weights::CheckedWeights;
use std::collections::BTreeMap;

fn manifest(prefix: &str) -> BTreeMap<String, Vec<usize>> {
    let path = common::fixture("manifests/face_stablesr.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["keys"]
        .as_array()
        .expect("manifest has a `keys` list")
        .iter()
        .filter_map(|e| {
            let key = e["key"].as_str().unwrap();
            key.starts_with(prefix).then(|| {
                let shape = e["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect();
                (key.to_string(), shape)
            })
        })
        .collect()
}

fn assert_same_keys(
    requested: BTreeMap<String, Vec<usize>>,
    expected: BTreeMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    let extra: Vec<_> = requested
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "manifest keys never requested: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "requested keys not in the manifest: {extra:?}"
    );
    for (k, shape) in &expected {
        assert_eq!(&requested[k], shape, "shape of {k}");
    }
    println!(
        "{} keys requested with the manifest's shapes",
        expected.len()
    );
}

#[test]
fn full_size_unet_requests_exactly_the_manifest_keys() {
    let cfg = BaseModelConfig::default();
    let w = CheckedWeights::shapes_only();
    UNet::new(
        &cfg.unet,
        w.var_builder(DType::F32, &Device::Cpu)
            .pp("model.diffusion_model"),
    )
    .unwrap();
    assert_same_keys(w.requested(), manifest("model.diffusion_model."));
}

#[test]
fn full_size_lq_encoder_requests_exactly_the_manifest_keys() {
    let cfg = BaseModelConfig::default();
    let w = CheckedWeights::shapes_only();
    LqEncoder::new(
        &cfg.lq_encoder,
        w.var_builder(DType::F32, &Device::Cpu)
            .pp("structcond_stage_model"),
    )
    .unwrap();
    assert_same_keys(w.requested(), manifest("structcond_stage_model."));
}
