//! Restoration with an identity on the tiny fixture model: the personalized denoiser against the
//! base one (zero gates, token only, the reference-pass cache), and `pfstorer restore --id` end
//! to end after `pfstorer personalize` (metadata, --id-strength 0, missing and foreign identities).

mod common;

use common::max_abs_diff;

use candle_core::{Device, Tensor};
use pfstorer::diffusion::sampler::{Branches, VDenoiser};
use pfstorer::imaging::ImageF32;
use pfstorer::model::base::BaseModel;
use pfstorer::personalize::identity::{Identity, IdentityInfo};
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use pfstorer::restore::{
    ModelDenoiser, Personalization, PersonalizedDenoiser, DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use pfstorer::weights::base_fingerprint;
use pfstorer::weights::TensorStore;
use std::path::Path;
use std::process::{Command, Output};

fn base() -> BaseModel {
    common::tiny_base()
}

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    common::seeded_randn(seed, shape)
}

fn reference_image(seed: u64, side: usize) -> ImageF32 {
    let data: Vec<f32> = randn(seed, &[side * side * 3])
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| (0.5 + 0.2 * v).clamp(0.0, 1.0))
        .collect();
    ImageF32::new(side, side, 3, data)
}

/// A fresh identity (γ = 0 unless `random_gammas`) for the fixture base model.
fn identity(base: &BaseModel, fingerprint: &str, random_gammas: bool) -> Identity {
    let params = TrainableParams::init(base, 5).unwrap();
    if random_gammas {
        let (_, gammas) = params.block_vars().unwrap();
        for (i, (_, g)) in gammas.iter().enumerate() {
            g.set(&randn(100 + i as u64, g.dims())).unwrap();
        }
    }
    let images: Vec<ImageF32> = (0..2).map(|k| reference_image(k, 64)).collect();
    let trainer = Trainer::new(base, params, &images, 64, TrainConfig::default(), 3).unwrap();
    let info = IdentityInfo {
        name: "lib-test".into(),
        base_fingerprint: fingerprint.to_string(),
        ref_sources: vec![],
        training: serde_json::json!({}),
    };
    // The trainer holds this thread on the differentiable ops until it is dropped here;
    // restoration then runs the plain ones.
    Identity::from_trainer(&trainer, &info).unwrap()
}

/// The base denoiser with the personalization's own (token) contexts.
fn base_denoiser<'a>(base: &'a BaseModel, p: &Personalization) -> ModelDenoiser<'a> {
    ModelDenoiser {
        model: base,
        cond: p.cond_context(),
        uncond: p.uncond_context(),
    }
}

/// The fingerprint of the fixture base model's weights.
fn fixture_fingerprint() -> String {
    base_fingerprint(&TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap())
        .unwrap()
}

/// `identity` prepared for `base` with the default prompts.
fn prepare(
    base: &BaseModel,
    identity: &Identity,
    fingerprint: &str,
    lambda: f64,
) -> Personalization {
    Personalization::new(
        identity,
        base,
        fingerprint,
        DEFAULT_PROMPT,
        DEFAULT_NEGATIVE_PROMPT,
        lambda,
    )
    .unwrap()
}

#[test]
fn personalized_denoiser_against_the_base_denoiser() {
    let base = base();
    let fingerprint = fixture_fingerprint();
    // A small latent keeps the UNet calls quick: 8, or the smallest side the fixture UNet and
    // time-aware encoder can halve down to their deepest level.
    let depth = base
        .config
        .unet
        .channel_mult
        .len()
        .max(base.config.lq_encoder.channel_mult.len());
    let latent = 8usize.max(1 << (depth - 1));
    let lq = randn(1, &[1, 4, latent, latent]);
    let x = randn(2, &[2, 4, latent, latent]);
    let x1 = x.narrow(0, 0, 1).unwrap();
    let prepare = |identity: &Identity, lambda: f64| prepare(&base, identity, &fingerprint, lambda);

    // γ = 0: Eq. 3 leaves the features unchanged, the output is the base output.
    let zero = identity(&base, &fingerprint, false);
    let p = prepare(&zero, 1.0);
    let mut personalized = PersonalizedDenoiser::new(&base, &p).unwrap();
    let mut plain = base_denoiser(&base, &p);
    let (mut worst, mut scale) = (0f32, 0f32);
    for (t, xt, branches) in [
        (999, &x, Branches::UncondCond),
        (999, &x, Branches::UncondCond),
        (500, &x1, Branches::Cond),
    ] {
        let v = personalized.predict_v(xt, &lq, t, branches).unwrap();
        let v_base = plain.predict_v(xt, &lq, t, branches).unwrap();
        worst = worst.max(max_abs_diff(&v, &v_base));
        scale = scale.max(common::max_abs(&v_base));
    }
    println!("zero gates: max abs error {worst:e} (outputs up to {scale})");
    // Float rounding only: the two paths order some sums differently.
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "zero-gate identity differs from base: {worst} (outputs up to {scale})"
    );
    // The repeated call reused the reference features of its step.
    assert_eq!(personalized.reference_passes(), 2);

    // Trained-looking gates change the output, unless --id-strength is 0 (token only, and no
    // reference pass at all).
    let gated = identity(&base, &fingerprint, true);
    let p = prepare(&gated, 1.0);
    let mut personalized = PersonalizedDenoiser::new(&base, &p).unwrap();
    let v = personalized
        .predict_v(&x, &lq, 700, Branches::UncondCond)
        .unwrap();
    let v_base = base_denoiser(&base, &p)
        .predict_v(&x, &lq, 700, Branches::UncondCond)
        .unwrap();
    let moved = max_abs_diff(&v, &v_base);
    println!("random gates: output moved by {moved:e}");
    assert!(moved > 1e-4, "the identity's attention had no effect");

    let p = prepare(&gated, 0.0);
    let mut token_only = PersonalizedDenoiser::new(&base, &p).unwrap();
    let v = token_only
        .predict_v(&x, &lq, 700, Branches::UncondCond)
        .unwrap();
    assert_eq!(
        max_abs_diff(&v, &v_base),
        0.0,
        "strength 0 must be the base UNet"
    );
    assert_eq!(
        token_only.reference_passes(),
        0,
        "strength 0 ran the reference pass"
    );

    // Another base model is refused.
    let err = Personalization::new(
        &zero,
        &base,
        &"0".repeat(64),
        DEFAULT_PROMPT,
        DEFAULT_NEGATIVE_PROMPT,
        1.0,
    )
    .err()
    .expect("foreign identity accepted")
    .to_string();
    assert!(err.contains("another base model"), "{err}");
}

/// With an identity, several latent tiles in one call (the canvas sampler's batches: `[x_1..x_b;
/// x_1..x_b]` with CFG, the LQ tiles once) give each tile's v of a call on its own: the
/// reference pass runs at the call's rows with the negative rows first, as the x pass expects.
#[test]
fn personalized_denoiser_batches_tiles_like_single_calls() {
    let base = base();
    let fingerprint = fixture_fingerprint();
    let depth = base
        .config
        .unet
        .channel_mult
        .len()
        .max(base.config.lq_encoder.channel_mult.len());
    let latent = 8usize.max(1 << (depth - 1));
    const TILES: usize = 3;
    let x = randn(7, &[TILES, 4, latent, latent]);
    let lq = randn(8, &[TILES, 4, latent, latent]);
    let gated = identity(&base, &fingerprint, true);
    let p = prepare(&base, &gated, &fingerprint, 1.0);
    let mut denoiser = PersonalizedDenoiser::new(&base, &p).unwrap();
    let both = Tensor::cat(&[&x, &x], 0).unwrap();
    let batched = denoiser
        .predict_v(&both, &lq, 600, Branches::UncondCond)
        .unwrap();
    let (mut worst, mut scale) = (0f32, 0f32);
    for k in 0..TILES {
        let xk = x.narrow(0, k, 1).unwrap();
        let single = denoiser
            .predict_v(
                &Tensor::cat(&[&xk, &xk], 0).unwrap(),
                &lq.narrow(0, k, 1).unwrap(),
                600,
                Branches::UncondCond,
            )
            .unwrap();
        let rows = Tensor::cat(
            &[
                batched.narrow(0, k, 1).unwrap(),
                batched.narrow(0, TILES + k, 1).unwrap(),
            ],
            0,
        )
        .unwrap();
        worst = worst.max(max_abs_diff(&rows, &single));
        scale = scale.max(common::max_abs(&single));
    }
    println!("identity, {TILES} tiles in one call vs alone: max abs diff {worst:e} (outputs up to {scale})");
    assert!(
        worst <= 1e-5 * scale.max(1.0),
        "batched tiles differ: {worst} (outputs up to {scale})"
    );
}

fn tmp_dir(name: &str) -> common::Scratch {
    common::scratch(&format!("restore-id-{name}"))
}

fn fixture_flag(flag: &str, rel: &str) -> [String; 2] {
    [flag.to_string(), common::fixture(rel).display().to_string()]
}

fn model_flags(base: &Path) -> Vec<String> {
    let mut flags = vec!["--base".to_string(), base.display().to_string()];
    flags.extend(fixture_flag("--config", "stablesr/config.yaml"));
    flags.extend(fixture_flag("--cfw", "stablesr/cfw.safetensors"));
    flags.extend(fixture_flag("--cfw-config", "stablesr/cfw.yaml"));
    flags.push("--quiet".into());
    flags
}

fn pfstorer(home: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .env("PFSTORER_HOME", home)
        .output()
        .expect("run pfstorer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn restore_with_an_identity_from_the_command_line() {
    let dir = tmp_dir("cli");
    let home = dir.join("home");
    let base = common::fixture("stablesr/model.safetensors");
    let mut refs = Vec::new();
    for k in 0..3u32 {
        let img = image::RgbImage::from_fn(72 + 8 * k, 72, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3 + 40 * k) % 256) as u8,
                (y * 4 % 256) as u8,
                (x * 2 % 256) as u8,
            ])
        });
        let path = dir.join(format!("ref{k}.png"));
        img.save(&path).unwrap();
        refs.push(path.display().to_string());
    }
    let id_file = dir.join("bob.identity.safetensors");
    let mut args = strings(&["personalize", "--refs-aligned", "--refs"]);
    args.extend(refs);
    args.extend(strings(&["--id", "bob", "--steps", "2", "--size", "64"]));
    args.extend(["--out".to_string(), id_file.display().to_string()]);
    args.extend(model_flags(&base));
    let o = pfstorer(&home, &args);
    assert!(o.status.success(), "personalize failed: {}", stderr(&o));
    assert!(id_file.is_file());

    let input = dir.join("face.png");
    image::RgbImage::from_fn(24, 20, |x, y| {
        image::Rgb([(x * 9 % 256) as u8, (y * 11 % 256) as u8, 90])
    })
    .save(&input)
    .unwrap();
    let restore = |extra: &[String], base: &Path| {
        let mut args = vec!["restore".to_string(), input.display().to_string()];
        args.extend(common::fast_sampling_flags());
        args.extend(extra.iter().cloned());
        args.extend(model_flags(base));
        pfstorer(&home, &args)
    };
    let fingerprint = base_fingerprint(&TensorStore::open(&base).unwrap()).unwrap();

    for (strength, out_name) in [("1", "full.png"), ("0", "token.png")] {
        let out = dir.join(out_name);
        let o = restore(
            &[
                "--id".into(),
                id_file.display().to_string(),
                "--id-strength".into(),
                strength.into(),
                "-o".into(),
                out.display().to_string(),
            ],
            &base,
        );
        assert!(
            o.status.success(),
            "restore --id-strength {strength}: {}",
            stderr(&o)
        );
        let png = std::fs::read(&out).unwrap();
        let text = String::from_utf8_lossy(&png);
        assert!(text.contains("pfstorer:identity"), "no identity metadata");
        assert!(
            text.contains(&format!("bob (base {fingerprint})")),
            "identity metadata lacks the name and fingerprint"
        );
        assert!(
            text.contains("a Photo of *"),
            "the prompt keeps `*` with an identity"
        );
        assert!(!text.contains("none (base model)"));
    }

    // A name that is not stored: one clear line.
    let o = restore(&strings(&["--id", "nobody", "-o", "x.png"]), &base);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("identity \"nobody\" not found"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A base model with one tensor changed has another fingerprint: refused in one line.
    let mut tensors = candle_core::safetensors::load(&base, &Device::Cpu).unwrap();
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|k| k.starts_with("model.diffusion_model."))
        .cloned()
        .collect();
    names.sort();
    let changed = (&tensors[&names[0]] + 1.0).unwrap();
    tensors.insert(names[0].clone(), changed);
    let other_base = dir.join("other.safetensors");
    candle_core::safetensors::save(&tensors, &other_base).unwrap();
    let o = restore(
        &[
            "--id".into(),
            id_file.display().to_string(),
            "-o".into(),
            dir.join("foreign.png").display().to_string(),
        ],
        &other_base,
    );
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("another base model"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!dir.join("foreign.png").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn id_ref_selects_a_stored_reference_and_rejects_out_of_range() {
    let base = base();
    let identity = identity(&base, "fp", false);
    let mut p = prepare(&base, &identity, "fp", 1.0);
    let stored = identity.tensor("ref.latents").unwrap().clone();
    assert_eq!(
        stored.dim(0).unwrap(),
        2,
        "the helper stores two references"
    );
    let first = stored.narrow(0, 0, 1).unwrap();
    let second = stored.narrow(0, 1, 1).unwrap();
    assert_eq!(
        max_abs_diff(&p.reference, &first),
        0.0,
        "reference 0 by default"
    );
    p.use_reference(&identity, &base, 1).unwrap();
    assert_eq!(max_abs_diff(&p.reference, &second), 0.0);
    assert!(max_abs_diff(&first, &second) > 0.0);
    let err = p
        .use_reference(&identity, &base, 2)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("reference index 2 out of range") && err.contains("holds 2"),
        "{err}"
    );
}

/// The faces of one photo go through the UNet together (`Restorer::restore_crops` with several
/// tiles per call): crops of one identity share a call, crops of another identity or of the
/// base model never do, each crop gets what it gets alone, and the calls are the groups'.
#[test]
fn face_crops_share_unet_calls_only_with_their_own_identity() {
    use pfstorer::config::CfwConfig;
    use pfstorer::model::base::CfwModel;
    use pfstorer::restore::{Conditioning, FaceCrop, RestoreSettings, Restorer};

    let base = base();
    let cfw_cfg = CfwConfig::from_yaml_file(&common::fixture("stablesr/cfw.yaml")).unwrap();
    let (cfw, _) = CfwModel::load(
        &common::fixture("stablesr/cfw.safetensors"),
        cfw_cfg,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let fingerprint = fixture_fingerprint();
    let prepare = |identity: &Identity| prepare(&base, identity, &fingerprint, 1.0);
    // Two prepared identities with different gates: `anna` and `ben`.
    let anna = prepare(&identity(&base, &fingerprint, true));
    let ben_identity = identity(&base, &fingerprint, false);
    let ben = prepare(&ben_identity);
    let native = common::FAST_INPUT_SIZE;
    let steps = 2;
    const PER_CALL: usize = 3;
    let restorer = |tile_batch: usize| {
        let settings = RestoreSettings {
            steps,
            native_size: Some(native),
            tile_overlap: Some(native / base.config.vae.downsample_factor() / 2),
            tile_batch: Some(tile_batch),
            ..RestoreSettings::default()
        };
        let cond = Restorer::text_context(&base, DEFAULT_PROMPT).unwrap();
        let uncond = Restorer::text_context(&base, DEFAULT_NEGATIVE_PROMPT).unwrap();
        Restorer::new(&base, &cfw, settings, cond, uncond).unwrap()
    };
    let who = [
        Conditioning::Base,
        Conditioning::Identity(&anna),
        Conditioning::Base,
        Conditioning::Identity(&anna),
        Conditioning::Identity(&ben),
        Conditioning::Base,
        Conditioning::Base,
        Conditioning::Identity(&anna),
    ];
    let images: Vec<ImageF32> = (0..who.len())
        .map(|k| reference_image(40 + k as u64, native))
        .collect();
    let crops: Vec<FaceCrop> = images
        .iter()
        .zip(who)
        .enumerate()
        .map(|(k, (image, conditioning))| FaceCrop {
            image,
            conditioning,
            seed: 1000 + k as u64,
        })
        .collect();

    let mut outputs = Vec::new();
    for per_call in [1, PER_CALL] {
        let r = restorer(per_call);
        let mut progress = Vec::new();
        let out = r
            .restore_crops(&crops, &mut |done, total| progress.push((done, total)))
            .unwrap();
        // Base rows [0, 2, 5] then [6], anna [1, 3, 7], ben [4]: 4 calls a step in batches
        // of 3 (guidance doubles the rows of a call, not the calls); 8 one at a time.
        let groups = if per_call == 1 { who.len() } else { 4 };
        assert_eq!(r.unet_calls(), groups * steps, "batches of {per_call}");
        let total = who.len() * steps;
        assert_eq!(
            progress.last(),
            Some(&(total, total)),
            "progress ends complete"
        );
        assert!(
            progress
                .windows(2)
                .all(|w| w[0].0 <= w[1].0 && w[1].1 == total),
            "progress never goes back: {progress:?}"
        );
        outputs.push(out);
    }
    let mut worst = 0f32;
    for (k, (alone, batched)) in outputs[0].iter().zip(&outputs[1]).enumerate() {
        assert_eq!((alone.width, alone.height), (batched.width, batched.height));
        let diff = alone
            .data
            .iter()
            .zip(&batched.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Latent rounding reaches the pixels times 1 / scale_factor (see the tile batches).
        let bound = 1e-5 / base.config.diffusion.scale_factor as f32;
        assert!(
            diff <= bound,
            "crop {k}: batched differs by {diff} (bound {bound})"
        );
        worst = worst.max(diff);
    }
    println!(
        "{} face crops, batches of {PER_CALL}: max abs diff {worst:.3e} against one at a time",
        who.len()
    );
    // The identities did reach their rows: an anna crop restored as the base model differs.
    let as_base = restorer(PER_CALL)
        .restore_crops(
            &[FaceCrop {
                image: &images[1],
                conditioning: Conditioning::Base,
                seed: 1001,
            }],
            &mut |_, _| {},
        )
        .unwrap();
    let moved = outputs[1][1]
        .data
        .iter()
        .zip(&as_base[0].data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-3,
        "anna's crop restored like the base model ({moved})"
    );
}
