//! The assembled base model: full-size key/shape coverage of the released diffusion checkpoint,
//! loading the tiny fixture model from both formats, and clear errors for bad files and configs.

mod common;

use candle_core::{DType, Device};
use pfstorer::config::{BaseModelConfig, CfwConfig};
use pfstorer::model::base::{BaseModel, CfwModel, Network, Residency};
use pfstorer::model::unet::UNetInputs;
use pfstorer::weights::CheckedWeights;
use pfstorer::Error;

fn tmp_dir(name: &str) -> common::Scratch {
    common::scratch(&format!("base-{name}"))
}

#[test]
fn full_size_base_model_requests_exactly_the_released_keys() {
    let w = CheckedWeights::shapes_only();
    BaseModel::from_weights(BaseModelConfig::default(), &w, DType::F32, &Device::Cpu).unwrap();
    let requested = w.requested();
    let expected = common::manifest("manifests/face_stablesr.json");
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    let extra: Vec<_> = requested
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(missing.is_empty(), "never requested: {missing:?}");
    assert!(extra.is_empty(), "not in the release: {extra:?}");
    for (k, shape) in &expected {
        assert_eq!(&requested[k], shape, "shape of {k}");
    }
    println!(
        "{} keys of face_stablesr requested with their shapes",
        expected.len()
    );
}

#[test]
fn full_size_cfw_requests_exactly_the_released_keys() {
    let w = CheckedWeights::shapes_only();
    CfwModel::from_weights(CfwConfig::default(), &w, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        w.requested(),
        common::manifest("manifests/face_vqgan_cfw.json")
    );
}

#[test]
fn tiny_model_loads_from_both_formats_using_every_tensor() {
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    for rel in ["stablesr/model.safetensors", "stablesr/model.ckpt"] {
        let (model, unused) =
            BaseModel::load(&common::fixture(rel), cfg.clone(), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(unused, None, "{rel}: every tensor is used");
        assert_eq!(model.config.unet, cfg.unet);
    }
    let cfw_cfg = CfwConfig::from_yaml_file(&common::fixture("stablesr/cfw.yaml")).unwrap();
    for rel in ["stablesr/cfw.safetensors", "stablesr/cfw.ckpt"] {
        let (_, unused) = CfwModel::load(
            &common::fixture(rel),
            cfw_cfg.clone(),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(unused, None, "{rel}: every tensor is used");
    }
}

#[test]
fn extra_tensors_are_summarised_by_prefix() {
    // A training checkpoint with EMA and loss extras: written as safetensors with added names.
    let src = common::fixture("stablesr/cfw.safetensors");
    let mut tensors = candle_core::safetensors::load(&src, &Device::Cpu).unwrap();
    let t = candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("loss.discriminator.main.0.weight".into(), t.clone());
    tensors.insert("loss.logvar".into(), t.clone());
    tensors.insert("model_ema.decoder.x".into(), t);
    let dir = tmp_dir("extra");
    let path = dir.join("extra.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let cfg = CfwConfig::from_yaml_file(&common::fixture("stablesr/cfw.yaml")).unwrap();
    let (_, unused) = CfwModel::load(&path, cfg, DType::F32, &Device::Cpu).unwrap();
    let line = unused.expect("extras are reported");
    assert!(line.contains("3 tensors not used"), "{line}");
    assert!(
        line.contains("loss.discriminator.* (1)")
            && line.contains("loss.* (1)")
            && line.contains("model_ema.decoder.* (1)"),
        "{line}"
    );
}

#[test]
fn bad_checkpoints_give_clear_errors() {
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let dir = tmp_dir("bad");

    // Truncated safetensors and truncated .ckpt.
    for rel in ["stablesr/model.safetensors", "stablesr/model.ckpt"] {
        let bytes = std::fs::read(common::fixture(rel)).unwrap();
        let path = dir.join(format!("truncated-{}", rel.replace('/', "_")));
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let err = BaseModel::load(&path, cfg.clone(), DType::F32, &Device::Cpu)
            .err()
            .expect("truncated file fails");
        let msg = err.to_string();
        assert!(matches!(err, Error::Weights(_)), "{msg}");
        assert!(
            msg.contains(path.to_str().unwrap()),
            "names the file: {msg}"
        );
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    // Not a checkpoint at all.
    let path = dir.join("notes.ckpt");
    std::fs::write(&path, "these are not weights\n").unwrap();
    let msg = BaseModel::load(&path, cfg.clone(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("not a checkpoint") && msg.contains("notes.ckpt"),
        "{msg}"
    );

    // A checkpoint of another architecture: the CFW autoencoder given as the diffusion model.
    let cfw = common::fixture("stablesr/cfw.safetensors");
    let msg = BaseModel::load(&cfw, cfg.clone(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("does not match the configured architecture"),
        "{msg}"
    );
    assert!(
        msg.contains("missing: model.diffusion_model."),
        "lists missing keys: {msg}"
    );

    // The fixture checkpoint against an architecture with twice its UNet width (whatever the
    // fixture's own size, even the released one): wrong shapes are listed.
    let fixture = common::fixture("stablesr/model.safetensors");
    let mut wider = cfg.clone();
    wider.unet.model_channels *= 2;
    let msg = BaseModel::load(&fixture, wider, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("with the wrong shape"), "{msg}");
}

#[test]
fn bad_yaml_gives_clear_errors() {
    let text = std::fs::read_to_string(common::fixture("stablesr/config.yaml")).unwrap();
    let dir = tmp_dir("yaml");

    let unknown = text.replace("UNetModelDualcondV2", "UNetModelSomethingElse");
    let path = dir.join("unknown.yaml");
    std::fs::write(&path, unknown).unwrap();
    let msg = BaseModelConfig::from_yaml_file(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("unknown.yaml") && msg.contains("UNetModelSomethingElse"),
        "{msg}"
    );

    // Drop the `context_dim:` line, whatever its value and indentation.
    let missing: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("context_dim:"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(
        missing.lines().count(),
        text.lines().count(),
        "fixture config has a context_dim line"
    );
    let path = dir.join("missing.yaml");
    std::fs::write(&path, missing).unwrap();
    let msg = BaseModelConfig::from_yaml_file(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("missing field") && msg.contains("context_dim"),
        "{msg}"
    );

    let path = dir.join("broken.yaml");
    std::fs::write(&path, "model: [unclosed").unwrap();
    let msg = BaseModelConfig::from_yaml_file(&path)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("broken.yaml") && msg.contains("not valid YAML"),
        "{msg}"
    );

    // The CFW YAML is not a diffusion YAML.
    let msg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/cfw.yaml"))
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("AutoencoderKLResi"), "{msg}");
}

#[test]
fn default_config_is_the_released_face_model() {
    let cfg = BaseModelConfig::default();
    assert_eq!(cfg.unet.model_channels, 320);
    assert_eq!(cfg.unet.context_dim, 1024);
    assert_eq!(cfg.text.width, 1024);
    assert_eq!(cfg.text.layers, 24);
    assert_eq!(cfg.lq_encoder.channel_mult, vec![1, 1, 2, 2]);
    assert!(cfg.diffusion.parameterization_v);
}

/// The same tokens through every residency's text encoder, and the same UNet call through every
/// residency's UNet.
#[test]
fn residencies_hold_what_they_name_and_check_the_rest() {
    let cfg = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let path = common::fixture("stablesr/model.safetensors");
    let load = |residency| {
        let (model, unused) =
            BaseModel::load_with(&path, cfg.clone(), DType::F32, &Device::Cpu, residency).unwrap();
        assert_eq!(unused, None, "{residency:?}: every tensor is accounted for");
        model
    };
    let full = load(Residency::Full);
    let text_only = load(Residency::TextOnly);
    let sampling = load(Residency::WithoutText);

    let tokens = full.tokenizer.encode("a photo of a person").unwrap();
    let tokens = candle_core::Tensor::new(tokens.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let context = full.text_encoder().unwrap().forward(&tokens).unwrap();
    let context_text_only = text_only.text_encoder().unwrap().forward(&tokens).unwrap();
    assert_eq!(common::max_abs_diff(&context, &context_text_only), 0.0);
    assert!(common::max_abs(&context) > 0.0);
    let err = sampling.text_encoder().err().unwrap().to_string();
    assert!(err.contains("not in memory"), "{err}");

    // The sampling networks: real in Full and WithoutText, refused in TextOnly.
    assert!(full.require_networks().is_ok() && sampling.require_networks().is_ok());
    let err = text_only.require_networks().unwrap_err().to_string();
    assert!(
        err.contains("TextOnly") && err.contains("asked to run"),
        "{err}"
    );
    // The staged restore's residencies hold one stage's networks each and refuse the others.
    let encoder_only = load(Residency::VaeEncoderOnly);
    let sampling_only = load(Residency::SamplingOnly);
    assert!(encoder_only.require(Network::VaeEncoder).is_ok());
    assert!(sampling_only.require(Network::Sampling).is_ok());
    for (model, refused) in [
        (&encoder_only, Network::Sampling),
        (&encoder_only, Network::Text),
        (&sampling_only, Network::VaeEncoder),
        (&sampling_only, Network::Text),
        (&text_only, Network::Sampling),
        (&sampling, Network::Text),
    ] {
        let err = model.require(refused).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{refused:?}")) && err.contains("asked to run"),
            "{err}"
        );
    }
    assert!(sampling_only.text_encoder().is_err() && encoder_only.text_encoder().is_err());
    let latent = cfg.diffusion.image_size / cfg.vae.downsample_factor();
    let x = common::seeded_randn(3, &[1, cfg.unet.in_channels, latent, latent]);
    let t = candle_core::Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let context = context.broadcast_as((1, 77, cfg.unet.context_dim)).unwrap();
    let run = |model: &BaseModel| {
        let cond = model.lq_encoder.forward(&x, &t).unwrap();
        let inputs = UNetInputs {
            timesteps: &t,
            context: &context,
            struct_cond: Some(&cond),
        };
        model.unet.forward(&x, &inputs).unwrap()
    };
    let out_full = run(&full);
    assert_eq!(common::max_abs_diff(&out_full, &run(&sampling)), 0.0);
    assert_eq!(common::max_abs_diff(&out_full, &run(&sampling_only)), 0.0);
    assert!(common::max_abs(&out_full) > 0.0);

    // No residency holds the VAE decoder; the VAE encoder is held with the sampling networks.
    let image = common::seeded_randn(
        4,
        &[1, 3, cfg.diffusion.image_size, cfg.diffusion.image_size],
    );
    let z = full.vae.encode(&image).unwrap().mean;
    for other in [&sampling, &encoder_only] {
        assert_eq!(
            common::max_abs_diff(&z, &other.vae.encode(&image).unwrap().mean),
            0.0
        );
    }
    let err = full.vae.decode(&z).unwrap_err().to_string();
    assert!(err.contains("without its decoder"), "{err}");

    // What a residency does not hold is still checked against the file.
    let mut wider = cfg.clone();
    wider.unet.model_channels *= 2;
    for residency in [
        Residency::TextOnly,
        Residency::WithoutText,
        Residency::VaeEncoderOnly,
        Residency::SamplingOnly,
    ] {
        let msg = BaseModel::load_with(&path, wider.clone(), DType::F32, &Device::Cpu, residency)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("with the wrong shape"), "{residency:?}: {msg}");
        assert!(
            msg.contains("model.diffusion_model."),
            "{residency:?}: {msg}"
        );
    }
    // The never-held VAE decoder too: a checkpoint without one of its tensors is refused.
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let dropped = "first_stage_model.decoder.conv_out.weight";
    assert!(tensors.remove(dropped).is_some());
    let dir = tmp_dir("residency");
    let incomplete = dir.join("no-decoder-conv-out.safetensors");
    candle_core::safetensors::save(&tensors, &incomplete).unwrap();
    for residency in [
        Residency::Full,
        Residency::TextOnly,
        Residency::WithoutText,
        Residency::VaeEncoderOnly,
        Residency::SamplingOnly,
    ] {
        let msg = BaseModel::load_with(
            &incomplete,
            cfg.clone(),
            DType::F32,
            &Device::Cpu,
            residency,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            msg.contains(&format!("1 missing: {dropped}")),
            "{residency:?}: {msg}"
        );
    }
    let mut wider_text = cfg.clone();
    wider_text.text.width *= 2;
    let msg = BaseModel::load_with(
        &path,
        wider_text,
        DType::F32,
        &Device::Cpu,
        Residency::WithoutText,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("cond_stage_model.model."), "{msg}");
}
