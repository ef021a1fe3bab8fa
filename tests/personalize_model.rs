//! Personalized UNet on the tiny fixture model: zero-gate identity with the base UNet, the
//! reference stream, the learned token, and the training step (gradient reach, frozen weights,
//! finite differences, identity round trip).

mod common;

use common::max_abs_diff;

use candle_core::{DType, Device, Tensor};
use pfstorer::config::BaseModelConfig;
use pfstorer::imaging::ImageF32;
use pfstorer::kernels::DifferentiableScope;
use pfstorer::model::base::BaseModel;
use pfstorer::model::unet::UNetInputs;
use pfstorer::personalize::dual_stream::PersonalizedUNet;
use pfstorer::personalize::identity::{Identity, IdentityInfo};
use pfstorer::personalize::token::PromptTokens;
use pfstorer::personalize::trainer::{TrainConfig, TrainableParams, Trainer};
use pfstorer::personalize::{host_specs, HostSpec};
use pfstorer::weights::base_fingerprint;
use pfstorer::weights::TensorStore;
use rand::{Rng, SeedableRng};

/// The tiny base model; the tests hold the thread on the differentiable kernels with
/// `training()` (the personalization trainer does the same for its lifetime).
fn base() -> BaseModel {
    common::tiny_base()
}

fn training() -> DifferentiableScope {
    DifferentiableScope::enter(true)
}

fn randn(seed: u64, shape: &[usize]) -> Tensor {
    common::seeded_randn(seed, shape)
}

fn set_random_gammas(params: &TrainableParams, seed: u64) {
    let (_, gammas) = params.block_vars().unwrap();
    for (i, (_, g)) in gammas.iter().enumerate() {
        g.set(&randn(seed + i as u64, g.dims())).unwrap();
    }
}

#[test]
fn released_hosts_are_output_blocks_4_6_8_10() {
    let cfg = BaseModelConfig::default();
    let hosts = host_specs(&cfg.unet);
    let expected = [(4, 1280), (6, 640), (8, 640), (10, 320)];
    assert_eq!(hosts.len(), 4);
    for (h, (n, d)) in hosts.iter().zip(expected) {
        assert_eq!(
            h,
            &HostSpec {
                path: format!("output_blocks.{n}.1"),
                dim: d,
                heads: d / 64,
                d_head: 64
            }
        );
    }
    let tiny = BaseModelConfig::from_yaml_file(&common::fixture("stablesr/config.yaml")).unwrap();
    let tiny_hosts: Vec<String> = host_specs(&tiny.unet).into_iter().map(|h| h.path).collect();
    // The same rule on the fixture UNet: decoder transformers at even global index.
    assert!(!tiny_hosts.is_empty());
    assert!(tiny_hosts.iter().all(|p| p.starts_with("output_blocks.")));
}

struct Setup {
    base: BaseModel,
    params: TrainableParams,
}

/// Every test of this file runs in differentiable mode: the switch is process-wide and the
/// trainer turns it on, so mixing modes between parallel tests would compare different kernels.
fn setup() -> Setup {
    let base = base();
    let params = TrainableParams::init(&base, 7).unwrap();
    Setup { base, params }
}

#[test]
fn zero_gamma_and_zero_lambda_reproduce_the_base_unet_exactly() {
    let _training = training();
    let Setup { base, params } = setup();
    let blocks = params.blocks(&Device::Cpu).unwrap();
    let prompt = PromptTokens::default_positive(&base.tokenizer).unwrap();
    let context = prompt
        .context(base.text_encoder().unwrap(), Some(params.token.as_tensor()))
        .unwrap();
    let context2 = Tensor::cat(&[&context, &context], 0).unwrap();
    // x and reference of different spatial sizes.
    let x = randn(1, &[2, 4, 12, 20]);
    let lq = randn(2, &[1, 4, 12, 20]);
    let z_ref = randn(3, &[1, 4, 16, 16]);
    let t1 = Tensor::new(&[321f32], &Device::Cpu).unwrap();
    let t2 = Tensor::new(&[321f32, 321f32], &Device::Cpu).unwrap();
    let cond = base.lq_encoder.forward(&lq, &t1).unwrap();
    let inputs = UNetInputs {
        timesteps: &t2,
        context: &context2,
        struct_cond: Some(&cond),
    };
    let base_out = base.unet.forward(&x, &inputs).unwrap();
    let positions = prompt.positions(1, 0);

    let pers = PersonalizedUNet::new(&base.unet, &blocks, 1.0);
    let refs0 = pers
        .reference_features(&z_ref, &t1, &context, &positions)
        .unwrap();
    let out0 = pers.forward(&x, &inputs, Some(&refs0)).unwrap();
    let err0 = max_abs_diff(&out0, &base_out);
    println!("gamma = 0: max abs error {err0:e}");
    assert_eq!(err0, 0.0);

    set_random_gammas(&params, 100);
    let refs1 = pers
        .reference_features(&z_ref, &t1, &context, &positions)
        .unwrap();
    // The reference stream does not see the blocks.
    for (path, r0) in &refs0.hosts {
        let r1 = &refs1.hosts[path];
        assert_eq!(max_abs_diff(&r0.tokens, &r1.tokens), 0.0, "{path}");
        assert_eq!(
            max_abs_diff(&r0.signals.attn_ph, &r1.signals.attn_ph),
            0.0,
            "{path}"
        );
        assert!(r0.tokens.dim(1).unwrap() > 0);
    }
    let gated = pers.forward(&x, &inputs, Some(&refs1)).unwrap();
    let moved = max_abs_diff(&gated, &base_out);
    println!("random gamma: output moved by {moved:e}");
    assert!(moved > 1e-4, "random gamma must change the output");

    let off = PersonalizedUNet::new(&base.unet, &blocks, 0.0);
    let out_off = off.forward(&x, &inputs, Some(&refs1)).unwrap();
    assert_eq!(max_abs_diff(&out_off, &base_out), 0.0);
}

#[test]
fn learned_token_replaces_the_placeholder_embedding() {
    let _training = training();
    let Setup { base, params } = setup();
    let prompt = PromptTokens::default_positive(&base.tokenizer).unwrap();
    assert_eq!(prompt.placeholder, Some(4));
    assert_eq!(prompt.eot, 17);
    assert_eq!(prompt.ids[4], 265);
    let negative = PromptTokens::default_negative(&base.tokenizer).unwrap();
    assert_eq!(negative.eot, 15);
    // v*0 = row of "person": the context equals the prompt with "person" in place of "*".
    let ctx = prompt
        .context(base.text_encoder().unwrap(), Some(params.token.as_tensor()))
        .unwrap();
    let mut ids = prompt.ids.clone();
    ids[4] = 2533;
    let ids = Tensor::from_vec(ids, (1, 77), &Device::Cpu).unwrap();
    let expected = base.text_encoder().unwrap().forward(&ids).unwrap();
    assert_eq!(max_abs_diff(&ctx, &expected), 0.0);
    // Columns before the placeholder do not depend on the token; gradients reach the token.
    let grads = ctx
        .narrow(1, 4, 73)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(params.token.as_tensor()).expect("token gradient");
    let norm: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(norm > 0.0);
}

fn reference_images(count: usize, size: usize, seed: u64) -> Vec<ImageF32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|k| {
            let (w, h) = (size + 8 * k, size);
            let data = (0..w * h)
                .flat_map(|i| {
                    let (x, y) = ((i % w) as f32 / w as f32, (i / w) as f32 / h as f32);
                    let n: f32 = rng.gen_range(-0.05..0.05);
                    [
                        (0.5 + 0.4 * (6.0 * x + k as f32).sin() + n).clamp(0.0, 1.0),
                        (0.5 + 0.4 * (5.0 * y).cos()).clamp(0.0, 1.0),
                        (0.3 + 0.5 * x * y).clamp(0.0, 1.0),
                    ]
                })
                .collect();
            ImageF32::new(w, h, 3, data)
        })
        .collect()
}

/// Bits of every frozen module's output on fixed inputs.
fn frozen_probe(base: &BaseModel) -> Vec<Tensor> {
    let x = randn(11, &[1, 4, 8, 8]);
    let t = Tensor::new(&[500f32], &Device::Cpu).unwrap();
    let negative = PromptTokens::default_negative(&base.tokenizer).unwrap();
    let ctx = negative
        .context(base.text_encoder().unwrap(), None)
        .unwrap();
    let cond = base.lq_encoder.forward(&x, &t).unwrap();
    let out = base
        .unet
        .forward(
            &x,
            &UNetInputs {
                timesteps: &t,
                context: &ctx,
                struct_cond: Some(&cond),
            },
        )
        .unwrap();
    let img = randn(12, &[1, 3, 64, 64]);
    let enc = base.vae.encode(&img).unwrap().mean;
    let table = base
        .text_encoder()
        .unwrap()
        .token_embeddings(&Tensor::from_vec(vec![2533u32, 265], (1, 2), &Device::Cpu).unwrap())
        .unwrap();
    vec![ctx, out, enc, table]
}

#[test]
fn training_steps_touch_only_the_trainable_tensors() {
    let _training = training();
    let base = base();
    let params = TrainableParams::init(&base, 3).unwrap();
    let before = frozen_probe(&base);
    let token0 = params.token.as_tensor().copy().unwrap();
    let images = reference_images(3, 64, 5);
    let mut trainer = Trainer::new(&base, params, &images, 64, TrainConfig::default(), 9).unwrap();

    // Step 0: ICA gradients exactly zero (γ = 0), γ and token gradients non-zero.
    let sample = trainer.draw_sample().unwrap();
    let parts = trainer.loss(&sample).unwrap();
    let grads = parts.total.backward().unwrap();
    let (ica, gammas) = trainer.params.block_vars().unwrap();
    for (name, var) in &ica {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let m = common::max_abs(g);
        assert_eq!(
            m, 0.0,
            "{name}: ICA gradient at gamma = 0 must be exactly 0"
        );
    }
    for (name, var) in &gammas {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no grad"));
        let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s > 0.0, "{name}: gamma gradient is zero");
    }
    let gt = grads
        .get(trainer.params.token.as_tensor())
        .expect("token grad");
    assert!(
        gt.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    // Finite differences of dL/dγ on the channel with the largest gradient.
    let (gname, gvar) = &gammas[0];
    let g = grads
        .get(gvar.as_tensor())
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let c = (0..g.len())
        .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
        .unwrap();
    let h = 1e-2f32;
    let original = gvar.as_tensor().to_vec1::<f32>().unwrap();
    let loss_at = |delta: f32| -> f64 {
        let mut v = original.clone();
        v[c] += delta;
        gvar.set(&Tensor::new(v.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        let l: f32 = trainer.loss(&sample).unwrap().total.to_scalar().unwrap();
        l as f64
    };
    let fd = (loss_at(h) - loss_at(-h)) / (2.0 * h as f64);
    loss_at(0.0);
    let analytic = g[c] as f64;
    println!("{gname}[{c}]: analytic {analytic:e}, finite difference {fd:e}");
    assert!(
        (fd - analytic).abs() <= 0.05 * analytic.abs() + 1e-6,
        "dL/dgamma: analytic {analytic} vs finite difference {fd}"
    );

    let start = std::time::Instant::now();
    let steps = 3;
    for _ in 0..steps {
        let r = trainer.step().unwrap();
        assert!(r.total.is_finite());
    }
    println!(
        "seconds per iteration (tiny config, 64 px): {:.3}",
        start.elapsed().as_secs_f64() / steps as f64
    );
    let after = frozen_probe(&base);
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        assert_eq!(max_abs_diff(a, b), 0.0, "frozen probe {i} changed");
    }
    let (ica, gammas) = trainer.params.block_vars().unwrap();
    for (name, var) in &gammas {
        let s: f32 = var
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(s > 0.0, "{name} did not move");
    }
    assert!(max_abs_diff(trainer.params.token.as_tensor(), &token0) > 0.0);
    assert!(!ica.is_empty());

    // Identity round trip.
    let store = TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap();
    let fingerprint = base_fingerprint(&store).unwrap();
    assert_eq!(fingerprint.len(), 64);
    let info = IdentityInfo {
        name: "test".into(),
        base_fingerprint: fingerprint.clone(),
        ref_sources: vec![],
        training: serde_json::json!({"seed": 9}),
    };
    let identity = Identity::from_trainer(&trainer, &info).unwrap();
    let dir = common::scratch("pers");
    let path = dir.join("test.identity.safetensors");
    identity.save(&path, false).unwrap();
    assert!(
        identity.save(&path, false).is_err(),
        "existing file must be refused"
    );
    let loaded = Identity::load_file(&path).unwrap();
    assert_eq!(loaded.metadata, identity.metadata);
    assert_eq!(loaded.tensors.len(), identity.tensors.len());
    // A finished identity is stored in f16: each value within f16's rounding (2^-11 relative;
    // the smallest normals are coarser in absolute terms, hence the 6e-8 floor).
    assert!(identity.stores_half());
    for (k, t) in &identity.tensors {
        let err = max_abs_diff(t, &loaded.tensors[k]);
        let bound = common::max_abs(t) * 2f32.powi(-11) + 6e-8;
        assert!(err <= bound, "{k}: {err} > {bound}");
    }
    let f32_bytes = identity
        .tensors
        .values()
        .map(|t| t.elem_count() * 4)
        .sum::<usize>() as f64;
    let file_bytes = std::fs::metadata(&path).unwrap().len() as f64;
    println!("identity file: {file_bytes} bytes in f16, {f32_bytes} bytes of f32 values");
    assert!(file_bytes < 0.75 * f32_bytes, "{file_bytes} vs {f32_bytes}");
    // A checkpoint (optimizer moments) stays f32 and round-trips exactly: older f32 files load.
    let mut checkpoint = identity.clone();
    checkpoint
        .metadata
        .insert("optimizer_steps".into(), "1".into());
    assert!(!checkpoint.stores_half());
    let ck_path = dir.join("test.checkpoint");
    checkpoint.save(&ck_path, false).unwrap();
    let ck = Identity::load_file(&ck_path).unwrap();
    for (k, t) in &checkpoint.tensors {
        assert_eq!(max_abs_diff(t, &ck.tensors[k]), 0.0, "{k}");
    }
    loaded.check_base(&fingerprint).unwrap();
    let err = loaded.check_base(&"0".repeat(64)).unwrap_err().to_string();
    assert!(err.contains("another base model"), "{err}");
    // Loaded blocks reproduce the trained personalized output.
    let hosts = host_specs(&base.config.unet);
    let blocks = loaded.blocks(&hosts, DType::F32, &Device::Cpu).unwrap();
    let (ctx, prompt) = loaded.positive_context(&base).unwrap();
    let z_ref = loaded
        .reference_latent(0, DType::F32, &Device::Cpu)
        .unwrap();
    let x = randn(21, &[1, 4, 8, 8]);
    let t = Tensor::new(&[400f32], &Device::Cpu).unwrap();
    let cond = base.lq_encoder.forward(&x, &t).unwrap();
    let inputs = UNetInputs {
        timesteps: &t,
        context: &ctx,
        struct_cond: Some(&cond),
    };
    let run = |blocks: &std::collections::BTreeMap<_, _>| {
        let p = PersonalizedUNet::new(&base.unet, blocks, 1.0);
        let refs = p
            .reference_features(&z_ref, &t, &ctx, &prompt.positions(1, 0))
            .unwrap();
        p.forward(&x, &inputs, Some(&refs)).unwrap()
    };
    // The f16 identity's output against the trained (f32) blocks': within the f16 parity bound
    // of the modules (1e-2 x the output's largest magnitude, at least 1).
    let (from_file, trained) = (run(&blocks), run(&trainer.blocks));
    let err = max_abs_diff(&from_file, &trained);
    let bound = 1e-2 * common::max_abs(&trained).max(1.0);
    println!("f16 identity vs f32 blocks: personalized UNet output max abs error {err:e} (bound {bound:e})");
    assert!(err <= bound, "{err} > {bound}");
    // The checkpoint's f32 blocks reproduce the trained output exactly.
    let ck_blocks = ck.blocks(&hosts, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&run(&ck_blocks), &trained), 0.0);
    // Truncated file: a clear error.
    let bytes = std::fs::read(&path).unwrap();
    let truncated = dir.join("trunc.identity.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = Identity::load_file(&truncated).unwrap_err().to_string();
    assert!(err.contains("truncated or corrupt"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The branch-by-branch backward of a training step (one x-pass branch's graph alive at a time)
/// gives the losses and gradients of the single joint graph, for every trainable tensor.
#[test]
fn branchwise_gradients_equal_the_joint_backward() {
    let _training = training();
    let base = base();
    let params = TrainableParams::init(&base, 21).unwrap();
    set_random_gammas(&params, 400);
    let images = reference_images(2, 64, 6);
    let mut trainer = Trainer::new(&base, params, &images, 64, TrainConfig::default(), 13).unwrap();
    let sample = trainer.draw_sample().unwrap();

    let joint = trainer.loss(&sample).unwrap();
    let joint_grads = joint.total.backward().unwrap();
    let (report, split_grads) = trainer.loss_and_gradients(&sample).unwrap();
    let scalar = |t: &Tensor| t.to_scalar::<f32>().unwrap();
    for (name, split, whole) in [
        ("total", report.total, scalar(&joint.total)),
        ("diff", report.diff, scalar(&joint.diff)),
        ("gen", report.gen, scalar(&joint.gen)),
        ("pers", report.pers, scalar(&joint.pers)),
    ] {
        let err = (split - whole).abs();
        println!("{name}: joint {whole:e}, branchwise {split:e}, abs error {err:e}");
        assert!(
            err <= 1e-5 * whole.abs().max(1e-3),
            "{name}: {split} vs {whole}"
        );
    }

    let (ica, gammas) = trainer.params.block_vars().unwrap();
    let token = ("token".to_string(), trainer.params.token.clone());
    let vars: Vec<_> = ica
        .iter()
        .chain(gammas.iter())
        .chain(std::iter::once(&token))
        .map(|(name, var)| {
            let whole = joint_grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no joint gradient"))
                .clone();
            let split = split_grads
                .get(&var.id())
                .unwrap_or_else(|| panic!("{name}: no branchwise gradient"))
                .clone();
            (name.clone(), whole, split)
        })
        .collect();
    // Summing the branches' gradients in another order rounds differently; a tensor whose
    // gradient nearly cancels between the branches is compared at the scale of the rest.
    let global = vars
        .iter()
        .map(|(_, whole, _)| common::max_abs(whole))
        .fold(0f32, f32::max);
    let mut compared = 0;
    let mut worst = 0f32;
    for (name, whole, split) in &vars {
        let scale = common::max_abs(whole);
        let err = max_abs_diff(whole, split);
        assert!(
            scale > 0.0,
            "{name}: zero gradient, the comparison would prove nothing"
        );
        assert!(
            err <= 1e-4 * scale + 1e-6 * global,
            "{name}: branchwise gradient differs by {err:e} (its scale {scale:e}, largest gradient {global:e})"
        );
        worst = worst.max(err / scale);
        compared += 1;
    }
    println!("compared {compared} gradients, largest {global:e}, worst relative error {worst:e}");
    assert_eq!(compared, ica.len() + gammas.len() + 1);
}

/// Records which spatial transformers a pass reaches; finished after `wanted` of them.
struct VisitCounter {
    visited: Vec<String>,
    wanted: usize,
}

impl pfstorer::model::unet::TransformerSeam for VisitCounter {
    fn after_blocks(&mut self, path: &str, tokens: Tensor) -> candle_core::Result<Tensor> {
        self.visited.push(path.to_string());
        Ok(tokens)
    }

    fn finished(&self) -> bool {
        self.visited.len() >= self.wanted
    }
}

/// `run_for_seam` (the reference pass) stops at the first block boundary after the seam is
/// done; `forward_with_seam` runs every transformer whatever the seam says.
#[test]
fn a_finished_seam_ends_the_pass_early() {
    let _training = training();
    let base = base();
    let x = randn(31, &[1, 4, 8, 8]);
    let t = Tensor::new(&[300f32], &Device::Cpu).unwrap();
    let ctx = PromptTokens::default_negative(&base.tokenizer)
        .unwrap()
        .context(base.text_encoder().unwrap(), None)
        .unwrap();
    let inputs = UNetInputs {
        timesteps: &t,
        context: &ctx,
        struct_cond: None,
    };
    let mut all = VisitCounter {
        visited: Vec::new(),
        wanted: 1,
    };
    base.unet
        .forward_with_seam(&x, &inputs, Some(&mut all))
        .unwrap();
    assert!(
        all.visited.len() > 1,
        "the tiny UNet needs several transformers: {:?}",
        all.visited
    );
    let wanted = all.visited.len() - 1;
    let mut part = VisitCounter {
        visited: Vec::new(),
        wanted,
    };
    base.unet.run_for_seam(&x, &inputs, &mut part).unwrap();
    assert_eq!(part.visited, all.visited[..wanted].to_vec());
}
