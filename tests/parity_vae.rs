//! The diffusion checkpoint's VAE (`first_stage_model`) and the CFW autoencoder against the
//! reference outputs in `stablesr/io.safetensors`, loaded from both checkpoint formats.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_module_close, fixture, get, load};
use pfstorer::config::{BaseModelConfig, CfwConfig, VaeConfig};
use pfstorer::model::vae::{AutoencoderKL, CfwAutoencoder};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

const VAE_PREFIX: &str = "first_stage_model";

fn checked(rel: &str) -> CheckedWeights {
    let store = TensorStore::open(&fixture(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    CheckedWeights::from_store(Arc::new(store))
}

fn load_vae(rel: &str) -> (AutoencoderKL, BaseModelConfig) {
    let cfg = BaseModelConfig::from_yaml_file(&fixture("stablesr/config.yaml")).unwrap();
    let weights = checked(rel);
    let vb = weights
        .var_builder(common::test_dtype(), &common::test_device())
        .pp(VAE_PREFIX);
    let vae = AutoencoderKL::new(&cfg.vae, vb).unwrap();
    let report = weights
        .finish(&[&format!("{VAE_PREFIX}.")])
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert!(
        report.unused.is_empty(),
        "{rel}: VAE tensors never used: {:?}",
        report.unused
    );
    (vae, cfg)
}

fn check_vae(rel: &str) {
    let (vae, cfg) = load_vae(rel);
    let io = load("stablesr/io.safetensors");
    let image = common::input(&io, "vae.in.image");

    let posterior = vae.encode(&image).unwrap();
    println!("[{rel}]");
    let moments = Tensor::cat(&[&posterior.mean, &posterior.logvar], 1).unwrap();
    assert_module_close("vae.enc.moments", &moments, get(&io, "vae.enc.moments"));
    assert_module_close("vae.post.mean", &posterior.mean, get(&io, "vae.post.mean"));
    assert_module_close(
        "vae.post.logvar",
        &posterior.logvar,
        get(&io, "vae.post.logvar"),
    );
    assert_module_close(
        "vae.post.std",
        &posterior.std().unwrap(),
        get(&io, "vae.post.std"),
    );

    let sample = posterior
        .sample(&common::input(&io, "vae.post.noise"))
        .unwrap();
    assert_module_close("vae.post.sample", &sample, get(&io, "vae.post.sample"));
    let scale = cfg.diffusion.scale_factor;
    let latent = (&sample * scale).unwrap();
    assert_module_close("vae.latent_scaled", &latent, get(&io, "vae.latent_scaled"));

    // Decode the reference latent so that the decoder is checked on its own.
    let z = (common::input(&io, "vae.latent_scaled") / scale).unwrap();
    let start = Instant::now();
    let decoded = vae.decode(&z).unwrap();
    println!(
        "vae decode of latent {:?} -> {:?}: {:.3} s",
        z.dims(),
        decoded.dims(),
        start.elapsed().as_secs_f64()
    );
    assert_module_close("vae.dec.out", &decoded, get(&io, "vae.dec.out"));
}

#[test]
fn vae_matches_reference_from_safetensors() {
    check_vae("stablesr/model.safetensors");
}

#[test]
fn vae_matches_reference_from_ckpt() {
    check_vae("stablesr/model.ckpt");
}

/// Tensors of `io` whose name is `prefix` followed by a suffix, ordered by the parsed suffix.
fn numbered<T: std::str::FromStr + PartialOrd>(
    io: &HashMap<String, Tensor>,
    prefix: &str,
) -> Vec<(T, Tensor)> {
    let mut items: Vec<(T, Tensor)> = io
        .iter()
        .filter_map(|(name, t)| {
            let suffix = name.strip_prefix(prefix)?;
            let key = suffix
                .parse::<T>()
                .unwrap_or_else(|_| panic!("fixture tensor `{name}`: unexpected suffix"));
            Some((key, t.clone()))
        })
        .collect();
    items.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(!items.is_empty(), "no fixture tensors named `{prefix}*`");
    items
}

fn check_cfw(rel: &str) {
    let cfg = CfwConfig::from_yaml_file(&fixture("stablesr/cfw.yaml")).unwrap();
    let weights = checked(rel);
    let cfw = CfwAutoencoder::new(
        &cfg.vae,
        weights.var_builder(common::test_dtype(), &common::test_device()),
    )
    .unwrap();
    let report = weights
        .finish(&[""])
        .unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert!(
        report.unused.is_empty(),
        "{rel}: tensors never used: {:?}",
        report.unused
    );

    let io = load("stablesr/io.safetensors");
    println!("[{rel}]");
    let (posterior, features) = cfw
        .encode_with_features(&common::input(&io, "cfw.in.image"))
        .unwrap();
    assert_module_close("cfw.post.mean", &posterior.mean, get(&io, "cfw.post.mean"));
    assert_module_close(
        "cfw.post.logvar",
        &posterior.logvar,
        get(&io, "cfw.post.logvar"),
    );
    let expected_features = numbered::<usize>(&io, "cfw.enc_fea.");
    assert_eq!(
        features.len(),
        expected_features.len(),
        "number of encoder features"
    );
    for ((i, expected), actual) in expected_features.iter().zip(&features) {
        assert_module_close(&format!("cfw.enc_fea.{i}"), actual, expected);
    }

    // Decode from the reference's z and features so that the decoder is checked on its own.
    let z = common::input(&io, "cfw.dec.in.z");
    let device = common::test_device();
    let reference_features: Vec<Tensor> = expected_features
        .into_iter()
        .map(|(_, t)| {
            t.to_dtype(common::test_dtype())
                .unwrap()
                .to_device(&device)
                .unwrap()
        })
        .collect();
    for (w, expected) in numbered::<f64>(&io, "cfw.dec.out_w") {
        let decoded = cfw.decode_fused(&z, &reference_features, w).unwrap();
        assert_module_close(&format!("cfw.dec.out_w{w}"), &decoded, &expected);
    }
}

#[test]
fn cfw_matches_reference_from_ckpt() {
    check_cfw("stablesr/cfw.ckpt");
}

#[test]
fn cfw_matches_reference_from_safetensors() {
    check_cfw("stablesr/cfw.safetensors");
}

/// Key -> shape of the full-size CFW checkpoint.
fn manifest() -> BTreeMap<String, Vec<usize>> {
    common::manifest("manifests/face_vqgan_cfw.json")
}

fn assert_same_keys(built: &BTreeMap<String, Vec<usize>>, expected: &BTreeMap<String, Vec<usize>>) {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !built.contains_key(*k))
        .collect();
    let extra: Vec<_> = built
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let misshaped: Vec<_> = expected
        .iter()
        .filter_map(|(k, s)| built.get(k).filter(|b| *b != s).map(|b| (k, b, s)))
        .collect();
    assert!(
        missing.is_empty(),
        "keys the model does not request: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "keys the model requests beyond the manifest: {extra:?}"
    );
    assert!(
        misshaped.is_empty(),
        "shape mismatches (key, model, manifest): {misshaped:?}"
    );
}

#[test]
fn full_size_cfw_requests_exactly_the_manifest_keys() {
    let expected = manifest();
    let weights = CheckedWeights::shapes_only();
    CfwAutoencoder::new(
        &CfwConfig::default().vae,
        weights.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    let built = weights.requested();
    println!(
        "full-size CFW: {} keys requested, manifest {}",
        built.len(),
        expected.len()
    );
    assert_same_keys(&built, &expected);
}

#[test]
fn full_size_vae_requests_the_manifest_keys_without_fusion_layers() {
    // The CFW model is the plain VAE plus `decoder.fusion_layer_*`.
    let expected: BTreeMap<_, _> = manifest()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("decoder.fusion_layer_"))
        .collect();
    let weights = CheckedWeights::shapes_only();
    AutoencoderKL::new(
        &VaeConfig::released(),
        weights.var_builder(DType::F32, &Device::Cpu),
    )
    .unwrap();
    assert_same_keys(&weights.requested(), &expected);
}

#[test]
fn wrong_architecture_is_reported_by_finish() {
    let mut cfg = BaseModelConfig::from_yaml_file(&fixture("stablesr/config.yaml")).unwrap();
    cfg.vae.ch *= 2;
    let weights = checked("stablesr/model.safetensors");
    let vb = weights.var_builder(DType::F32, &Device::Cpu).pp(VAE_PREFIX);
    AutoencoderKL::new(&cfg.vae, vb).unwrap();
    let err = weights.finish(&[&format!("{VAE_PREFIX}.")]).unwrap_err();
    assert!(err.to_string().contains("wrong shape"), "{err}");
}
