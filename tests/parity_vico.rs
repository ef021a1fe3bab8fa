//! The personalization block against ViCo's own `SpatialTransformer` with image cross-attention
//! (`vico/block.safetensors`): outputs, attention maps, otsu mask, L_Pers and its gradient, plus
//! the properties of PFStorer's γ gate (Eq. 3) and the parameter counts.

mod common;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use pfstorer::config::UNetConfig;
use pfstorer::error::Result;
use pfstorer::kernels::DifferentiableScope;
use pfstorer::model::unet::SpatialTransformer;
use pfstorer::personalize::block::{
    otsu_mask, otsu_threshold, pers_loss, placeholder_signals, run_blocks_with_text_probs,
    ImageCrossAttention, ParamInit, PersonalizationBlock, PlaceholderSignals, TokenPositions,
};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

const FIXTURE: &str = "vico/block.safetensors";
const ICA_PREFIX: &str = "image_cross_attention.";

/// The kernel mode is process-wide; tests that depend on it run one at a time.
static KERNEL_MODE: Mutex<()> = Mutex::new(());

fn kernel_mode(differentiable: bool) -> (DifferentiableScope, MutexGuard<'static, ()>) {
    let guard = KERNEL_MODE.lock().unwrap_or_else(|e| e.into_inner());
    (DifferentiableScope::enter(differentiable), guard)
}

#[derive(Debug, serde::Deserialize)]
struct FixtureConfig {
    heads: usize,
    d_head: usize,
    context_dim: usize,
}

struct Fixture {
    tensors: HashMap<String, Tensor>,
    cfg: FixtureConfig,
    positions: TokenPositions,
}

impl Fixture {
    fn load() -> Self {
        let path = common::fixture(FIXTURE);
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let config = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("config"))
            .expect("fixture metadata `config` missing")
            .clone();
        let cfg: FixtureConfig = serde_json::from_str(&config).unwrap();
        let tensors = common::load(FIXTURE);
        let index = |key: &str| -> Vec<usize> {
            common::get(&tensors, key)
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|k| k as usize)
                .collect()
        };
        let positions = TokenPositions {
            placeholder: index("input.ph_idx"),
            eot: index("input.eot_idx"),
        };
        Fixture {
            cfg,
            positions,
            tensors,
        }
    }

    fn get(&self, key: &str) -> &Tensor {
        common::get(&self.tensors, key)
    }

    fn width(&self) -> usize {
        self.cfg.heads * self.cfg.d_head
    }

    fn host(&self, dtype: DType) -> SpatialTransformer {
        let channels = self.get("input.x").dim(1).unwrap();
        let cfg = UNetConfig {
            in_channels: channels,
            out_channels: channels,
            model_channels: channels,
            attention_resolutions: vec![1],
            num_res_blocks: 1,
            channel_mult: vec![1],
            num_head_channels: self.cfg.d_head,
            transformer_depth: 1,
            context_dim: self.cfg.context_dim,
            use_linear_in_transformer: false,
            semb_channels: channels,
        };
        let vb = VarBuilder::from_tensors(self.tensors.clone(), dtype, &Device::Cpu);
        SpatialTransformer::new(channels, self.cfg.heads, self.cfg.d_head, &cfg, vb).unwrap()
    }

    /// ViCo's ICA weights under `ica.` plus `gamma`, as trainable variables.
    fn block_varmap(&self, gamma: &Tensor, dtype: DType) -> VarMap {
        let varmap = VarMap::new();
        {
            let mut vars = varmap.data().lock().unwrap();
            for (key, t) in &self.tensors {
                if let Some(rest) = key.strip_prefix(ICA_PREFIX) {
                    let var = Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
                    vars.insert(format!("ica.{rest}"), var);
                }
            }
            vars.insert(
                "gamma".into(),
                Var::from_tensor(&gamma.to_dtype(dtype).unwrap()).unwrap(),
            );
        }
        varmap
    }

    fn block(&self, varmap: &VarMap, dtype: DType) -> PersonalizationBlock {
        let vb = VarBuilder::from_varmap(varmap, dtype, &Device::Cpu);
        PersonalizationBlock::new(self.width(), self.cfg.heads, self.cfg.d_head, vb).unwrap()
    }

    fn gamma_const(&self, value: f64) -> Tensor {
        Tensor::full(value as f32, self.width(), &Device::Cpu).unwrap()
    }

    fn gamma_random(&self, seed: u64) -> Tensor {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..self.width())
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(v, self.width(), &Device::Cpu).unwrap()
    }

    fn inputs<'a>(&'a self, context: &'a Tensor) -> HostInputs<'a> {
        HostInputs {
            x: self.get("input.x"),
            xr: self.get("input.xr"),
            context,
            ref_context: context,
            positions: &self.positions,
        }
    }
}

/// Max |a| through the shared helper, which fails on any NaN or infinity.
fn max_abs(a: &Tensor) -> f64 {
    common::max_abs(a) as f64
}

fn assert_bit_equal(name: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{name}: shapes differ");
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x.to_bits() != y.to_bits() && x != y);
    assert!(
        diff.is_none(),
        "{name}: element {} differs ({} vs {})",
        diff.unwrap_or(0),
        a[diff.unwrap_or(0)],
        b[diff.unwrap_or(0)]
    );
    println!("{name}: bit-equal over {} elements", a.len());
}

fn scalar(t: &Tensor) -> f64 {
    t.flatten_all()
        .unwrap()
        .get(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn vico_host_parity_gamma_one() {
    let _mode = kernel_mode(false);
    let fx = Fixture::load();
    let host = fx.host(DType::F32);
    let block = fx.block(
        &fx.block_varmap(&fx.gamma_const(1.0), DType::F32),
        DType::F32,
    );
    let out = host_forward(&host, &block, &fx.inputs(fx.get("input.context")), 1.0).unwrap();

    let tol = 1e-5;
    common::assert_close("output.x", &out.x, fx.get("output.x"), tol, 0.0);
    common::assert_close("output.xr", &out.xr, fx.get("output.xr"), tol, 0.0);
    assert_bit_equal(
        "reference output.xr == output.xr_base",
        fx.get("output.xr"),
        fx.get("output.xr_base"),
    );
    // The reference stream is the frozen host, run with the same kernels.
    let xr_base = host
        .forward(fx.get("input.xr"), fx.get("input.context"))
        .unwrap();
    assert_bit_equal("xr == base host(xr)", &out.xr, &xr_base);
    common::assert_close(
        "inter.attn_xr_text",
        &out.text_probs,
        fx.get("inter.attn_xr_text"),
        tol,
        0.0,
    );
    common::assert_close(
        "inter.attn_ph",
        &out.signals.attn_ph,
        fx.get("inter.attn_ph"),
        tol,
        0.0,
    );
    common::assert_close(
        "inter.attn_eot",
        &out.signals.attn_eot,
        fx.get("inter.attn_eot"),
        tol,
        0.0,
    );
    assert_eq!(
        out.signals.mask.to_vec2::<u8>().unwrap(),
        fx.get("inter.mask").to_vec2::<u8>().unwrap(),
        "inter.mask from the computed placeholder attention"
    );
    common::assert_close(
        "inter.ica_in",
        &out.host_tokens,
        fx.get("inter.ica_in"),
        tol,
        0.0,
    );
    common::assert_close(
        "inter.ref_tokens",
        &out.ref_tokens,
        fx.get("inter.ref_tokens"),
        tol,
        0.0,
    );
    common::assert_close(
        "inter.ica_out",
        &out.gated_tokens,
        fx.get("inter.ica_out"),
        tol,
        0.0,
    );
    let delta = (&out.gated_tokens - &out.host_tokens).unwrap();
    common::assert_close(
        "inter.ica_delta",
        &delta,
        fx.get("inter.ica_delta"),
        tol,
        0.0,
    );
    let loss = scalar(&out.signals.loss);
    let reference = scalar(fx.get("output.loss_reg"));
    let err = (loss - reference).abs();
    println!("output.loss_reg: {loss} vs {reference}, abs error {err:.3e}");
    assert!(
        err <= 1e-6 || err <= 1e-6 * reference.abs(),
        "loss_reg {loss} vs {reference}"
    );
}

/// The ICA alone on the recorded tokens and mask (isolates it from the host's base block).
#[test]
fn ica_module_on_recorded_tokens() {
    let _mode = kernel_mode(false);
    let fx = Fixture::load();
    let vb = VarBuilder::from_tensors(fx.tensors.clone(), DType::F32, &Device::Cpu);
    let ica = ImageCrossAttention::new(
        fx.width(),
        fx.cfg.heads,
        fx.cfg.d_head,
        vb.pp("image_cross_attention"),
    )
    .unwrap();
    let f = fx.get("inter.ica_in");
    let r = fx.get("inter.ref_tokens");
    let mask = fx.get("inter.mask");
    let out = ica.forward(f, r, Some(mask)).unwrap();
    common::assert_close(
        "ica(ica_in, ref_tokens, mask)",
        &out,
        fx.get("inter.ica_out"),
        1e-5,
        0.0,
    );
    // The same mask as float 0/1 gives the same result.
    let out_f = ica
        .forward(f, r, Some(&mask.to_dtype(DType::F32).unwrap()))
        .unwrap();
    assert_bit_equal("u8 mask == f32 mask", &out, &out_f);
    // The mask matters here (otherwise the test above could not catch a mask bug).
    let unmasked = ica.forward(f, r, None).unwrap();
    let change = max_abs(&(unmasked - &out).unwrap());
    println!("effect of the mask: {change:.3e}");
    assert!(change > 1e-4, "the mask has no effect on this fixture");
}

#[test]
fn otsu_on_recorded_attention() {
    let fx = Fixture::load();
    let attn_ph = fx.get("inter.attn_ph");
    let mask = otsu_mask(attn_ph).unwrap();
    assert_eq!(mask.dtype(), DType::U8);
    assert_eq!(
        mask.to_vec2::<u8>().unwrap(),
        fx.get("inter.mask").to_vec2::<u8>().unwrap(),
        "inter.mask"
    );
    let thresholds = otsu_threshold(attn_ph).unwrap();
    let reference: Vec<f32> = fx.get("inter.otsu_threshold").to_vec1().unwrap();
    let minmax: Vec<Vec<f32>> = fx.get("inter.attn_ph_minmax").to_vec2().unwrap();
    let recorded_mask: Vec<Vec<u8>> = fx.get("inter.mask").to_vec2().unwrap();
    for (row, (ours, theirs)) in thresholds.iter().zip(&reference).enumerate() {
        let ours = ours.expect("non-constant fixture row has a threshold");
        println!("row {row}: otsu threshold {ours} (reference {theirs})");
        if *theirs >= 0.0 {
            assert_eq!(ours, *theirs, "row {row}: otsu threshold");
        }
        // Either way the threshold must reproduce the recorded mask on the recorded min-max map.
        let from_threshold: Vec<u8> = minmax[row].iter().map(|&m| u8::from(m >= ours)).collect();
        assert_eq!(
            from_threshold, recorded_mask[row],
            "row {row}: mask of threshold"
        );
    }
}

#[test]
fn otsu_constant_row_keeps_everything() {
    let t = Tensor::new(&[[0.25f32; 7], [0.0; 7]], &Device::Cpu).unwrap();
    assert_eq!(
        otsu_mask(&t).unwrap().to_vec2::<u8>().unwrap(),
        vec![vec![1u8; 7]; 2]
    );
    assert_eq!(otsu_threshold(&t).unwrap(), vec![None, None]);
}

#[test]
fn otsu_keeps_the_arg_max() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (rows, n) = (64, 50);
    let values: Vec<f32> = (0..rows * n)
        .map(|_| rng.gen::<f32>().powi(rng.gen_range(1..6)))
        .collect();
    let t = Tensor::from_vec(values.clone(), (rows, n), &Device::Cpu).unwrap();
    let mask = otsu_mask(&t).unwrap().to_vec2::<u8>().unwrap();
    let mut some_dropped = false;
    for (r, row) in mask.iter().enumerate() {
        let vals = &values[r * n..(r + 1) * n];
        let arg_max = (0..n).fold(0, |b, i| if vals[i] > vals[b] { i } else { b });
        let arg_min = (0..n).fold(0, |b, i| if vals[i] < vals[b] { i } else { b });
        assert_eq!(row[arg_max], 1, "row {r}: arg-max patch dropped");
        assert_eq!(row[arg_min], 0, "row {r}: arg-min patch kept");
        some_dropped |= row.contains(&0);
    }
    assert!(some_dropped);
}

#[test]
fn otsu_ties_pick_the_lower_threshold() {
    // [0, 0.5, 1]: t <= 5 splits {0} | {0.5, 1}, t >= 6 splits {0, 0.5} | {1}; both give a
    // between-class variance of exactly 1/8, so t = 1 wins and 0.5 (== τ at t = 5) is kept.
    // [0, 1]: every t gives the same split.
    let t = Tensor::new(&[[0f32, 0.5, 1.0], [2.0, 3.0, 3.0]], &Device::Cpu).unwrap();
    assert_eq!(
        otsu_mask(&t).unwrap().to_vec2::<u8>().unwrap(),
        vec![vec![0u8, 1, 1], vec![0, 1, 1]]
    );
    assert_eq!(
        otsu_threshold(&t).unwrap(),
        vec![Some(0.1f32), Some(0.1f32)]
    );
    // A clear split far from the lowest threshold: {0, 0.05, 0.1} | {0.9, 1}.
    let t = Tensor::new(&[[0f32, 0.05, 0.1, 0.9, 1.0]], &Device::Cpu).unwrap();
    let th = otsu_threshold(&t).unwrap()[0].unwrap();
    assert!(th > 0.1 && th <= 0.9, "threshold {th}");
    assert_eq!(
        otsu_mask(&t).unwrap().to_vec2::<u8>().unwrap(),
        vec![vec![0u8, 0, 0, 1, 1]]
    );
}

#[test]
fn pers_loss_matches_hand_computation() {
    let fx = Fixture::load();
    let ph: Vec<Vec<f32>> = fx.get("inter.attn_ph").to_vec2().unwrap();
    let eot: Vec<Vec<f32>> = fx.get("inter.attn_eot").to_vec2().unwrap();
    let mut sum = 0f64;
    let mut count = 0usize;
    for (p, e) in ph.iter().zip(&eot) {
        let pm = p.iter().copied().fold(f32::MIN, f32::max) as f64;
        let em = e.iter().copied().fold(f32::MIN, f32::max) as f64;
        for (a, b) in p.iter().zip(e) {
            sum += (*a as f64 / pm - *b as f64 / em).powi(2);
            count += 1;
        }
    }
    let hand = sum / count as f64;
    let ours = scalar(&pers_loss(fx.get("inter.attn_ph"), fx.get("inter.attn_eot")).unwrap());
    let reference = scalar(fx.get("output.loss_reg"));
    println!("loss_reg: ours {ours}, hand {hand}, reference {reference}");
    for (name, v) in [("ours", ours), ("hand", hand)] {
        let err = (v - reference).abs();
        assert!(
            err <= 1e-6 || err <= 1e-6 * reference.abs(),
            "{name} {v} vs {reference}"
        );
    }
}

#[test]
fn zero_gate_or_zero_lambda_is_the_base_host() {
    let _mode = kernel_mode(false);
    let fx = Fixture::load();
    let host = fx.host(DType::F32);
    let context = fx.get("input.context");
    let base = host.forward(fx.get("input.x"), context).unwrap();
    common::assert_close(
        "base host vs output.x_base",
        &base,
        fx.get("output.x_base"),
        1e-5,
        0.0,
    );
    for (name, gamma, lambda) in [
        ("gamma = 0, lambda = 1", fx.gamma_const(0.0), 1.0),
        ("gamma random, lambda = 0", fx.gamma_random(3), 0.0),
    ] {
        let block = fx.block(&fx.block_varmap(&gamma, DType::F32), DType::F32);
        let out = host_forward(&host, &block, &fx.inputs(context), lambda).unwrap();
        common::assert_close(name, &out.x, fx.get("output.x_base"), 1e-5, 0.0);
        assert_bit_equal(&format!("{name}: x == base host(x)"), &out.x, &base);
    }
}

#[test]
fn eq3_is_linear_in_gamma() {
    let _mode = kernel_mode(false);
    let fx = Fixture::load();
    let host = fx.host(DType::F32);
    let context = fx.get("input.context");
    for (seed, lambda) in [(11u64, 1.0), (12, 0.5)] {
        let gamma = fx.gamma_random(seed);
        let block = fx.block(&fx.block_varmap(&gamma, DType::F32), DType::F32);
        let out = host_forward(&host, &block, &fx.inputs(context), lambda).unwrap();
        let expected = fx
            .get("inter.ica_in")
            .add(
                &fx.get("inter.ica_delta")
                    .broadcast_mul(&(&gamma * lambda).unwrap())
                    .unwrap(),
            )
            .unwrap();
        common::assert_close(
            &format!("ica_in + {lambda}*gamma*ica_delta (seed {seed})"),
            &out.gated_tokens,
            &expected,
            1e-5,
            0.0,
        );
    }
}

fn grad_or_zero(grads: &candle_core::backprop::GradStore, var: &Var) -> f64 {
    grads.get(var.as_tensor()).map(max_abs).unwrap_or(0.0)
}

#[test]
fn loss_reg_gradient_reaches_only_the_context() {
    let _mode = kernel_mode(true);
    let fx = Fixture::load();
    let host = fx.host(DType::F32);
    let varmap = fx.block_varmap(&fx.gamma_const(1.0), DType::F32);
    let block = fx.block(&varmap, DType::F32);
    let context = Var::from_tensor(fx.get("input.context")).unwrap();
    let out = host_forward(&host, &block, &fx.inputs(context.as_tensor()), 1.0).unwrap();
    let grads = out.signals.loss.backward().unwrap();
    let grad = grads
        .get(context.as_tensor())
        .expect("no gradient for the context");
    common::assert_gradient_close(
        "grad.loss_reg_wrt_context",
        grad,
        fx.get("grad.loss_reg_wrt_context"),
    );
    let vars = varmap.data().lock().unwrap();
    assert_eq!(
        vars.len(),
        PersonalizationBlock::parameter_specs(fx.width()).len()
    );
    for (name, var) in vars.iter() {
        assert_eq!(
            grad_or_zero(&grads, var),
            0.0,
            "loss_reg gradient reaches {name}"
        );
    }
}

/// `sum(out.x * W)` for a fixed random `W` and its gradients.
fn output_scalar(
    fx: &Fixture,
    host: &SpatialTransformer,
    block: &PersonalizationBlock,
    dtype: DType,
) -> Tensor {
    let x = fx.get("input.x").to_dtype(dtype).unwrap();
    let xr = fx.get("input.xr").to_dtype(dtype).unwrap();
    let context = fx.get("input.context").to_dtype(dtype).unwrap();
    let inputs = HostInputs {
        x: &x,
        xr: &xr,
        context: &context,
        ref_context: &context,
        positions: &fx.positions,
    };
    let out = host_forward(host, block, &inputs, 1.0).unwrap();
    // Fixed weights from a seeded generator (candle's own RNG is not seedable on the CPU).
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let w: Vec<f32> = (0..out.x.elem_count())
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let weight = Tensor::from_vec(w, out.x.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (out.x * weight).unwrap().sum_all().unwrap()
}

#[test]
fn output_gradients_with_zero_gate() {
    let _mode = kernel_mode(true);
    let fx = Fixture::load();
    let host = fx.host(DType::F32);
    for (label, gamma) in [
        ("gamma = 0", fx.gamma_const(0.0)),
        ("gamma random", fx.gamma_random(5)),
    ] {
        let varmap = fx.block_varmap(&gamma, DType::F32);
        let block = fx.block(&varmap, DType::F32);
        let grads = output_scalar(&fx, &host, &block, DType::F32)
            .backward()
            .unwrap();
        let vars = varmap.data().lock().unwrap();
        let mut ica_max = 0f64;
        for (name, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            let m = max_abs(g);
            assert!(m.is_finite(), "{label}: {name} gradient not finite");
            if name == "gamma" {
                println!("{label}: max |dS/dgamma| = {m:.3e}");
                assert!(m > 0.0, "{label}: gamma gradient is zero");
            } else {
                ica_max = ica_max.max(m);
                if label == "gamma = 0" {
                    assert_eq!(m, 0.0, "{label}: ICA weight {name} has a gradient");
                }
            }
        }
        println!("{label}: max |dS/d ICA weight| = {ica_max:.3e}");
        if label != "gamma = 0" {
            assert!(ica_max > 0.0, "{label}: no ICA gradient");
        }
    }
}

#[test]
fn gamma_gradient_matches_finite_difference() {
    let _mode = kernel_mode(true);
    let fx = Fixture::load();
    let dtype = DType::F64;
    let host = fx.host(dtype);
    let gamma = fx.gamma_random(21);
    let varmap = fx.block_varmap(&gamma, dtype);
    let block = fx.block(&varmap, dtype);
    let s = output_scalar(&fx, &host, &block, dtype);
    let grads = s.backward().unwrap();
    let gamma_var = varmap.data().lock().unwrap()["gamma"].clone();
    let analytic: Vec<f64> = grads
        .get(gamma_var.as_tensor())
        .expect("no gradient for gamma")
        .to_vec1()
        .unwrap();
    // S is affine in γ, so a central difference with a large step is exact up to rounding.
    let step = 0.5;
    let base: Vec<f64> = gamma.to_dtype(dtype).unwrap().to_vec1().unwrap();
    let d = fx.width();
    let mut worst = 0f64;
    for j in [0, d / 2, d - 1] {
        let eval = |delta: f64| -> f64 {
            let mut g = base.clone();
            g[j] += delta;
            let mut shifted = PersonalizationBlock::clone(&block);
            shifted.gamma = Tensor::from_vec(g, d, &Device::Cpu).unwrap();
            scalar(&output_scalar(&fx, &host, &shifted, dtype))
        };
        let fd = (eval(step) - eval(-step)) / (2.0 * step);
        let err = (fd - analytic[j]).abs();
        println!(
            "dS/dgamma[{j}]: analytic {:.10e}, finite difference {fd:.10e}",
            analytic[j]
        );
        assert!(
            err <= 1e-9 + 1e-7 * fd.abs(),
            "gamma[{j}]: {} vs {fd}",
            analytic[j]
        );
        assert!(fd.abs() > 1e-6, "gamma[{j}]: derivative too small to test");
        worst = worst.max(err);
    }
    println!("finite-difference max abs error {worst:.3e}");
}

/// Records every requested parameter and hands back a stride-0 zero tensor of its shape, so
/// full-size blocks can be built without allocating their weights.
#[derive(Clone, Default)]
struct ShapeRecorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .unwrap()
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape-only builder cannot serve unchecked `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

#[test]
fn parameter_counts() {
    let widths = [1280usize, 640, 640, 320];
    let mut ica_total = 0usize;
    let mut gamma_total = 0usize;
    for (host, &d) in ["4", "6", "8", "10"].iter().zip(&widths) {
        let recorder = ShapeRecorder::default();
        let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
        let prefix = format!("pers.output_blocks.{host}.1");
        PersonalizationBlock::new(d, d / 64, 64, vb.pp(&prefix)).unwrap();
        let shapes = recorder.0.lock().unwrap().clone();
        let count = |pred: &dyn Fn(&str) -> bool| -> usize {
            shapes
                .iter()
                .filter(|(k, _)| pred(k))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        let ica = count(&|k| k.starts_with(&format!("{prefix}.ica.")));
        let gamma = count(&|k| *k == format!("{prefix}.gamma"));
        assert_eq!(shapes.len(), 21, "{prefix}: 20 ICA tensors + gamma");
        assert_eq!(ica, 20 * d * d + 17 * d, "{prefix}: ICA parameters");
        assert_eq!(ica, PersonalizationBlock::ica_parameter_count(d));
        assert_eq!(gamma, d, "{prefix}: gamma");
        // The declared specs are exactly what the constructor reads.
        let specs: BTreeMap<String, Vec<usize>> = PersonalizationBlock::parameter_specs(d)
            .into_iter()
            .map(|s| (format!("{prefix}.{}", s.key), s.shape))
            .collect();
        assert_eq!(specs, shapes, "{prefix}: parameter specs");
        ica_total += ica;
        gamma_total += gamma;
    }
    println!("ICA parameters {ica_total}, gamma {gamma_total}");
    assert_eq!(ica_total, 51_248_960);
    assert_eq!(gamma_total, 2_880);
}

#[test]
fn trainable_init_is_pytorch_default_and_identity() {
    let _mode = kernel_mode(false);
    let fx = Fixture::load();
    let d = fx.width();
    let varmap = VarMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let prefix = "pers.output_blocks.4.1";
    let block = PersonalizationBlock::init_trainable(
        &varmap,
        prefix,
        d,
        fx.cfg.heads,
        fx.cfg.d_head,
        &mut rng,
        &Device::Cpu,
    )
    .unwrap();
    {
        let vars = varmap.data().lock().unwrap();
        let specs = PersonalizationBlock::parameter_specs(d);
        assert_eq!(vars.len(), specs.len());
        for spec in specs {
            let name = format!("{prefix}.{}", spec.key);
            let t = vars
                .get(&name)
                .unwrap_or_else(|| panic!("{name} not a Var"));
            assert_eq!(t.dims(), spec.shape.as_slice(), "{name}");
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            match spec.init {
                ParamInit::Uniform(bound) => {
                    let fan_in = *spec.shape.last().unwrap();
                    let fan_in = if spec.shape.len() == 1 {
                        // Biases use the fan-in of their layer's weight.
                        if name.contains("ff.net.2") {
                            4 * d
                        } else {
                            d
                        }
                    } else {
                        fan_in
                    };
                    assert!(
                        (bound - 1.0 / (fan_in as f64).sqrt()).abs() < 1e-12,
                        "{name}"
                    );
                    assert!(
                        v.iter().all(|x| (x.abs() as f64) <= bound),
                        "{name} out of bounds"
                    );
                    let spread = v.iter().copied().fold(0f32, |m, x| m.max(x.abs()));
                    assert!(
                        spread as f64 > 0.5 * bound,
                        "{name} not spread over U(±bound)"
                    );
                }
                ParamInit::Ones => assert!(v.iter().all(|&x| x == 1.0), "{name}"),
                ParamInit::Zeros => assert!(v.iter().all(|&x| x == 0.0), "{name}"),
            }
        }
    }
    let f = fx.get("inter.ica_in");
    let out = block
        .forward(
            f,
            fx.get("inter.ref_tokens"),
            Some(fx.get("inter.mask")),
            1.0,
        )
        .unwrap();
    assert_bit_equal("fresh block is the identity", &out, f);
    // A shared batch-1 reference row serves every host row.
    let r1 = fx.get("inter.ref_tokens").narrow(0, 0, 1).unwrap();
    let m1 = fx.get("inter.mask").narrow(0, 0, 1).unwrap();
    let mut moved = block.clone();
    moved.gamma = fx.gamma_const(1.0);
    let shared = moved.forward(f, &r1, Some(&m1), 1.0).unwrap();
    let row1 = moved
        .forward(&f.narrow(0, 1, 1).unwrap(), &r1, Some(&m1), 1.0)
        .unwrap();
    common::assert_close(
        "shared reference row",
        &shared.narrow(0, 1, 1).unwrap(),
        &row1,
        1e-6,
        0.0,
    );
}

// ---------------------------------------------------------------------------------------------
// ViCo's per-host forward composed from the library's pieces (what the fixture records).

/// The two streams entering a host.
#[derive(Debug, Clone, Copy)]
struct HostInputs<'a> {
    /// x-stream features `[B, C, H, W]`.
    x: &'a Tensor,
    /// Reference-stream features `[B_ref, C, H_ref, W_ref]`, `B_ref` = B or 1.
    xr: &'a Tensor,
    /// Text context of the x stream `[B, n_ctx, context_dim]`.
    context: &'a Tensor,
    /// Text context of the reference stream `[B_ref, n_ctx, context_dim]`.
    ref_context: &'a Tensor,
    /// Placeholder / EOT columns per reference row.
    positions: &'a TokenPositions,
}

/// Everything one personalised host forward produces.
#[derive(Debug, Clone)]
struct HostOutput {
    /// x-stream output `[B, C, H, W]` (residual included).
    x: Tensor,
    /// Reference-stream output `[B_ref, C, H_ref, W_ref]`: the frozen base host's output.
    xr: Tensor,
    /// Host tokens after the base blocks (`F`, input of the ICA).
    host_tokens: Tensor,
    /// Host tokens after Eq. 3 (`F̂`, input of `proj_out`).
    gated_tokens: Tensor,
    /// Reference tokens after the base blocks (`R`).
    ref_tokens: Tensor,
    /// Text cross-attention probabilities of the reference stream `[B_ref, N_ref, n_ctx]`.
    text_probs: Tensor,
    signals: PlaceholderSignals,
}

/// ViCo's `SpatialTransformer.forward` with `image_cross` on a frozen host, with PFStorer's γ
/// gate: `x` and the reference `xr` pass the same norm / proj_in / base blocks (`xr` with its own
/// text context `ref_context`), the placeholder map of the reference stream gives the mask and
/// L_Pers, the block mixes the reference tokens into the x tokens, and both streams leave through
/// proj_out and the residual. The reference stream never sees the ICA.
fn host_forward(
    host: &SpatialTransformer,
    block: &PersonalizationBlock,
    inputs: &HostInputs,
    lambda_att: f64,
) -> Result<HostOutput> {
    let HostInputs {
        x,
        xr,
        context,
        ref_context,
        positions,
    } = *inputs;
    let x_parts = host.tokens_in(x)?;
    let host_tokens = host.run_blocks(&x_parts.tokens, context)?;
    let xr_parts = host.tokens_in(xr)?;
    let (ref_tokens, text_probs) = run_blocks_with_text_probs(host, &xr_parts.tokens, ref_context)?;
    let signals = placeholder_signals(&text_probs, positions)?;
    let gated_tokens = block.forward(&host_tokens, &ref_tokens, Some(&signals.mask), lambda_att)?;
    Ok(HostOutput {
        x: host.tokens_out(&x_parts, &gated_tokens)?,
        xr: host.tokens_out(&xr_parts, &ref_tokens)?,
        host_tokens,
        gated_tokens,
        ref_tokens,
        text_probs,
        signals,
    })
}
