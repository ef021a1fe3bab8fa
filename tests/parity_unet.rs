//! UNet (`UNetModelDualcondV2`) and time-aware encoder (`EncoderUNetModelWT`) against the
//! reference outputs in `stablesr/io.safetensors`, with the tiny weights loaded from both
//! `stablesr/model.safetensors` and `stablesr/model.ckpt` through `stablesr/config.yaml`.
//! Device and precision follow `PFSTORER_TEST_DEVICE` / `PFSTORER_TEST_DTYPE` (default CPU f32).

mod common;

use candle_core::Tensor;
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
    for name in io.keys() {
        if let Some(width) = name.strip_prefix("struct_enc.out.") {
            cond.insert(width.parse().unwrap(), common::input(io, name));
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
        let vb = w.var_builder(common::test_dtype(), &common::test_device());
        let enc = LqEncoder::new(&cfg.lq_encoder, vb.pp("structcond_stage_model")).unwrap();
        w.finish(&["structcond_stage_model."]).unwrap();
        let x = common::input(&io, "struct_enc.in.x");
        let t = common::get(&io, "struct_enc.in.t")
            .to_device(&common::test_device())
            .unwrap();
        let out = enc.forward(&x, &t).unwrap();
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
    let emb =
        pfstorer::model::time_embedding::timestep_embedding(t, cfg.unet.model_channels).unwrap();
    common::assert_module_close(
        "unet.debug.t_emb",
        &emb,
        common::get(&io, "unet.debug.t_emb"),
    );
    let t = common::get(&io, "struct_enc.in.t");
    let emb = pfstorer::model::time_embedding::timestep_embedding(t, cfg.lq_encoder.model_channels)
        .unwrap();
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
        let vb = w.var_builder(common::test_dtype(), &common::test_device());
        let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model")).unwrap();
        w.finish(&["model.diffusion_model."]).unwrap();
        let cond = struct_cond_from(&io);
        let t = common::get(&io, "unet.in.t")
            .to_device(&common::test_device())
            .unwrap();
        let context = common::input(&io, "unet.in.context");
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&cond),
        };
        let out = unet
            .forward(&common::input(&io, "unet.in.x"), &inputs)
            .unwrap();
        common::assert_module_close(
            &format!("{rel}: unet.out"),
            &out,
            common::get(&io, "unet.out"),
        );
    }
}

#[test]
fn unet_in_f16_stays_within_the_half_precision_bound() {
    // Runs in every default test run (the env-driven tests above default to f32): the same
    // forward with f16 weights and activations, statistics/softmax in f32, against the f32
    // reference. Bound 1e-2 x the output's largest magnitude (see common::module_tolerance).
    let cfg = config();
    let io = common::load("stablesr/io.safetensors");
    let w = weights("stablesr/model.safetensors");
    let vb = w.var_builder(candle_core::DType::F16, &candle_core::Device::Cpu);
    let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model")).unwrap();
    let half = |key: &str| {
        common::get(&io, key)
            .to_dtype(candle_core::DType::F16)
            .unwrap()
    };
    let mut cond = StructCond::new();
    for (width, t) in struct_cond_from(&io) {
        let t = t.to_device(&candle_core::Device::Cpu).unwrap();
        cond.insert(width, t.to_dtype(candle_core::DType::F16).unwrap());
    }
    let context = half("unet.in.context");
    let inputs = UNetInputs {
        timesteps: common::get(&io, "unet.in.t"),
        context: &context,
        struct_cond: Some(&cond),
    };
    let out = unet.forward(&half("unet.in.x"), &inputs).unwrap();
    assert_eq!(out.dtype(), candle_core::DType::F16);
    let expected = common::get(&io, "unet.out");
    let scale = common::max_abs(expected).max(1.0) as f64;
    common::assert_close("f16 unet.out", &out, expected, 1e-2 * scale, 0.0);
}

/// A model batch that is a multiple of the encoder features' batch (the CFG branches share one
/// LQ): the SPADE modulation computed once per LQ row and broadcast over the branches gives the
/// reference output for every branch, and what repeating the features to the full batch gives.
#[test]
fn unet_broadcasts_encoder_features_over_cfg_branches() {
    let cfg = config();
    let io = common::load("stablesr/io.safetensors");
    let w = weights(FORMATS[0]);
    let vb = w.var_builder(common::test_dtype(), &common::test_device());
    let unet = UNet::new(&cfg.unet, vb.pp("model.diffusion_model")).unwrap();
    let cond = struct_cond_from(&io);
    let twice = |t: &Tensor| Tensor::cat(&[t, t], 0).unwrap();
    let t = common::get(&io, "unet.in.t")
        .to_device(&common::test_device())
        .unwrap();
    let context = common::input(&io, "unet.in.context");
    let x = common::input(&io, "unet.in.x");
    let (t2, context2, x2) = (twice(&t), twice(&context), twice(&x));
    let shared = unet
        .forward(
            &x2,
            &UNetInputs {
                timesteps: &t2,
                context: &context2,
                struct_cond: Some(&cond),
            },
        )
        .unwrap();
    let repeated_cond: StructCond = cond.iter().map(|(k, v)| (*k, twice(v))).collect();
    let repeated = unet
        .forward(
            &x2,
            &UNetInputs {
                timesteps: &t2,
                context: &context2,
                struct_cond: Some(&repeated_cond),
            },
        )
        .unwrap();
    let diff = common::max_abs_diff(&shared, &repeated);
    println!("broadcast vs repeated encoder features: max abs diff {diff:e}");
    assert!(diff <= 1e-5 * common::max_abs(&repeated).max(1.0));
    let rows = x.dim(0).unwrap();
    for branch in 0..2 {
        common::assert_module_close(
            &format!("branch {branch}: unet.out"),
            &shared.narrow(0, branch * rows, rows).unwrap(),
            common::get(&io, "unet.out"),
        );
    }
}
