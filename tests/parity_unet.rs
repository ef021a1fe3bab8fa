//! UNet (`UNetModelDualcondV2`) and time-aware encoder (`EncoderUNetModelWT`) against the
//! reference outputs in `stablesr/io.safetensors`, with the tiny weights loaded from both
//! `stablesr/model.safetensors` and `stablesr/model.ckpt` through `stablesr/config.yaml`.

mod common;

use candle_core::{DType, Device, Tensor};
use pfstorer::config::BaseModelConfig;
use pfstorer::model::lq_encoder::LqEncoder;
use pfstorer::model::unet::{StructCond, UNet, UNetInputs};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::sync::Arc;

const FORMATS: [&str; 2] = ["stablesr/model.safetensors", "stablesr/model.ckpt"];

fn config() -> BaseModelConfig {
    BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap()
}

fn weights(rel: &str) -> CheckedWeights {
    let store = TensorStore::open(&common::fixture(rel)).unwrap();
    CheckedWeights::from_store(Arc::new(store))
}

fn struct_cond_from(io: &std::collections::HashMap<String, Tensor>) -> StructCond {
    let mut cond = StructCond::new();
    for (name, t) in io {
        if let Some(width) = name.strip_prefix("struct_enc.out.") {
            cond.insert(width.parse().unwrap(), t.clone());
        }
    }
    assert!(
        !cond.is_empty(),
        "io.safetensors has no struct_enc.out.* tensors"
    );
    cond
}

#[test]
fn lq_encoder_matches_reference() {
    let cfg = config();
    let io = common::load("stablesr/io.safetensors");
    for rel in FORMATS {
        let w = weights(rel);
        let vb = w.var_builder(DType::F32, &Device::Cpu);
        let enc = LqEncoder::new(&cfg.lq_encoder, vb.pp("structcond_stage_model")).unwrap();
        w.finish(&["structcond_stage_model."]).unwrap();
        let x = common::get(&io, "struct_enc.in.x");
        let t = common::get(&io, "struct_enc.in.t");
        let out = enc.forward(x, t).unwrap();
        let expected = struct_cond_from(&io);
        assert_eq!(
            out.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "feature widths"
        );
        for (width, want) in &expected {
            common::assert_module_close(
                &format!("{rel}: struct_enc.out.{width}"),
                &out[width],
                want,
            );
        }
    }
}

#[test]
fn timestep_embedding_matches_reference() {
    let cfg = config();
    let io = common::load("stablesr/io.safetensors");
    let t = common::get(&io, "unet.in.t");
    let emb = pfstorer::model::nn::timestep_embedding(t, cfg.unet.model_channels).unwrap();
    common::assert_module_close(
        "unet.debug.t_emb",
        &emb,
        common::get(&io, "unet.debug.t_emb"),
    );
    let t = common::get(&io, "struct_enc.in.t");
    let emb = pfstorer::model::nn::timestep_embedding(t, cfg.lq_encoder.model_channels).unwrap();
    common::assert_module_close(
        "struct_enc.debug.t_emb",
        &emb,
        common::get(&io, "struct_enc.debug.t_emb"),
    );
}

#[test]
fn unet_matches_reference() {
    let cfg = config();
    let io = common::load("stablesr/io.safetensors");
    for rel in FORMATS {
        let w = weights(rel);
        let vb = w.var_builder(DType::F32, &Device::Cpu);
        let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model")).unwrap();
        w.finish(&["model.diffusion_model."]).unwrap();
        let cond = struct_cond_from(&io);
        let inputs = UNetInputs {
            timesteps: common::get(&io, "unet.in.t"),
            context: common::get(&io, "unet.in.context"),
            struct_cond: Some(&cond),
        };
        let out = unet
            .forward(common::get(&io, "unet.in.x"), &inputs)
            .unwrap();
        common::assert_module_close(
            &format!("{rel}: unet.out"),
            &out,
            common::get(&io, "unet.out"),
        );
    }
}
