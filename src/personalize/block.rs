//! PFStorer's personalization block: ViCo's image cross-attention ("ICA") gated by a learnable
//! per-channel γ (paper Eq. 3), the otsu mask over the placeholder token's attention map and the
//! attention regulariser L_Pers.
//!
//! A host is a spatial transformer of the UNet (`output_blocks.{4,6,8,10}.1`). Its tokens after
//! the frozen base block are `F`; the reference stream's tokens of the same host after the same
//! base block are `R`. The block computes `F̂ = F + λ·γ⊙(ICA(F, R, M) − F)`, so γ = 1 and λ = 1
//! reproduce ViCo and γ = 0 (the initial value) reproduces the base model exactly.

use crate::error::{Error, Result};
use crate::model::unet::{SpatialTransformer, TransformerBlock};
use candle_core::{DType, Device, Module, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;

/// Key-mask bias of masked reference tokens: ViCo fills their logits with `-finfo.max`.
const MASKED_LOGIT: f32 = -f32::MAX;

/// Number of otsu threshold classes: thresholds are `t / OTSU_LEVELS` for `t = 1..OTSU_LEVELS-1`.
const OTSU_LEVELS: usize = 10;

/// ViCo's `image_cross_attention`: a transformer block without text context whose second
/// attention attends from the host tokens to the (un-normalised) reference tokens.
///
/// `u1 = F + Attn1(LN1(F))`, `u2 = u1 + Attn2(LN2(u1), R, M)`, `u3 = u2 + FF(LN3(u2))`.
#[derive(Debug, Clone)]
pub struct ImageCrossAttention {
    /// Same layout and key names as a base transformer block with `context_dim = dim`.
    block: TransformerBlock,
    heads: usize,
}

impl ImageCrossAttention {
    /// Weights under ViCo's names relative to `vb`: `attn1.to_q.weight`, …, `ff.net.0.proj`,
    /// `ff.net.2`, `norm1..3`.
    pub fn new(dim: usize, heads: usize, d_head: usize, vb: VarBuilder) -> Result<Self> {
        if heads * d_head != dim {
            return Err(Error::Config(format!(
                "image cross-attention: {heads} heads x {d_head} channels != width {dim}"
            )));
        }
        Ok(ImageCrossAttention {
            block: TransformerBlock::new(dim, dim, heads, d_head, vb)?,
            heads,
        })
    }

    /// `f`: host tokens `[B, N, d]`; `r`: reference tokens `[B, N_ref, d]`; `mask`: `[B, N_ref]`
    /// (u8 or float, non-zero = reference token attended). Returns `u3` (`[B, N, d]`).
    pub fn forward(&self, f: &Tensor, r: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let b = &self.block;
        let bias = mask.map(|m| key_mask_bias(m, self.heads)).transpose()?;
        let u1 = (b.attn1.forward(&b.norm1.forward(f)?, None, None)? + f)?;
        let u2 = (b
            .attn2
            .forward(&b.norm2.forward(&u1)?, Some(r), bias.as_ref())?
            + &u1)?;
        Ok((b.ff.forward(&b.norm3.forward(&u2)?)? + u2)?)
    }
}

/// `[B, M]` keep-mask -> additive bias `[B*heads, 1, M]` (0 where kept, `-f32::MAX` where not),
/// in the head order of `CrossAttention` (batch-major).
fn key_mask_bias(mask: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, m) = mask.dims2()?;
    let keep = mask.ne(0f64)?;
    let zeros = Tensor::zeros((b, m), DType::F32, mask.device())?;
    let masked = Tensor::full(MASKED_LOGIT, (b, m), mask.device())?;
    let bias = keep.where_cond(&zeros, &masked)?;
    Ok(bias
        .reshape((b, 1, 1, m))?
        .broadcast_as((b, heads, 1, m))?
        .reshape((b * heads, 1, m))?)
}

/// How a trainable parameter is initialised (PyTorch defaults for the ICA, zero for γ).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamInit {
    /// `U(-bound, bound)`; `torch.nn.Linear` uses `bound = 1/sqrt(fan_in)` for weight and bias.
    Uniform(f64),
    Ones,
    Zeros,
}

/// One parameter of a personalization block: key relative to the block, shape, initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub key: String,
    pub shape: Vec<usize>,
    pub init: ParamInit,
}

/// A personalization block: ICA plus the per-channel gate γ (`[d]`).
/// Stored keys: `ica.<ViCo key>` and `gamma`.
#[derive(Debug, Clone)]
pub struct PersonalizationBlock {
    pub ica: ImageCrossAttention,
    pub gamma: Tensor,
}

impl PersonalizationBlock {
    /// From stored (or VarMap-backed) tensors under `vb`.
    pub fn new(dim: usize, heads: usize, d_head: usize, vb: VarBuilder) -> Result<Self> {
        Ok(PersonalizationBlock {
            ica: ImageCrossAttention::new(dim, heads, d_head, vb.pp("ica"))?,
            gamma: vb.get(dim, "gamma")?,
        })
    }

    /// Fresh trainable block: every parameter becomes a `Var` in `varmap` under
    /// `<prefix>.<key>` (γ = 0, ICA with PyTorch's default initialisation drawn from `rng`).
    /// Parameters already present in `varmap` are kept as they are.
    pub fn init_trainable<R: Rng>(
        varmap: &VarMap,
        prefix: &str,
        dim: usize,
        heads: usize,
        d_head: usize,
        rng: &mut R,
        device: &Device,
    ) -> Result<Self> {
        {
            let mut vars = varmap
                .data()
                .lock()
                .map_err(|_| Error::Config("personalization VarMap lock poisoned".into()))?;
            for spec in Self::parameter_specs(dim) {
                let name = join_key(prefix, &spec.key);
                if vars.contains_key(&name) {
                    continue;
                }
                let count: usize = spec.shape.iter().product();
                let values: Vec<f32> = match spec.init {
                    ParamInit::Uniform(bound) => (0..count)
                        .map(|_| rng.gen_range(-bound..bound) as f32)
                        .collect(),
                    ParamInit::Ones => vec![1.0; count],
                    ParamInit::Zeros => vec![0.0; count],
                };
                let tensor = Tensor::from_vec(values, spec.shape.as_slice(), device)?;
                vars.insert(name, Var::from_tensor(&tensor)?);
            }
        }
        let vb = VarBuilder::from_varmap(varmap, DType::F32, device);
        let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
        Self::new(dim, heads, d_head, vb)
    }

    /// Every parameter of a block of width `d`, in a fixed order: 20d² + 17d for the ICA, d for γ.
    pub fn parameter_specs(dim: usize) -> Vec<ParamSpec> {
        let linear_bound = 1.0 / (dim as f64).sqrt();
        let ff_out_bound = 1.0 / ((4 * dim) as f64).sqrt();
        let spec = |key: String, shape: Vec<usize>, init| ParamSpec { key, shape, init };
        let mut specs = Vec::new();
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v"] {
                specs.push(spec(
                    format!("ica.{attn}.{proj}.weight"),
                    vec![dim, dim],
                    ParamInit::Uniform(linear_bound),
                ));
            }
            specs.push(spec(
                format!("ica.{attn}.to_out.0.weight"),
                vec![dim, dim],
                ParamInit::Uniform(linear_bound),
            ));
            specs.push(spec(
                format!("ica.{attn}.to_out.0.bias"),
                vec![dim],
                ParamInit::Uniform(linear_bound),
            ));
        }
        specs.push(spec(
            "ica.ff.net.0.proj.weight".into(),
            vec![8 * dim, dim],
            ParamInit::Uniform(linear_bound),
        ));
        specs.push(spec(
            "ica.ff.net.0.proj.bias".into(),
            vec![8 * dim],
            ParamInit::Uniform(linear_bound),
        ));
        specs.push(spec(
            "ica.ff.net.2.weight".into(),
            vec![dim, 4 * dim],
            ParamInit::Uniform(ff_out_bound),
        ));
        specs.push(spec(
            "ica.ff.net.2.bias".into(),
            vec![dim],
            ParamInit::Uniform(ff_out_bound),
        ));
        for norm in ["norm1", "norm2", "norm3"] {
            specs.push(spec(
                format!("ica.{norm}.weight"),
                vec![dim],
                ParamInit::Ones,
            ));
            specs.push(spec(
                format!("ica.{norm}.bias"),
                vec![dim],
                ParamInit::Zeros,
            ));
        }
        specs.push(spec("gamma".into(), vec![dim], ParamInit::Zeros));
        specs
    }

    /// Parameters of the ICA of width `d` (20d² + 17d), without γ.
    pub fn ica_parameter_count(dim: usize) -> usize {
        20 * dim * dim + 17 * dim
    }

    /// Eq. 3: `F + λ·γ⊙(ICA(F, R, M) − F)`. `r` (and `mask`) may have batch 1 and are then
    /// shared by every row of `f`. `λ = 0` returns `f` without running the ICA.
    pub fn forward(
        &self,
        f: &Tensor,
        r: &Tensor,
        mask: Option<&Tensor>,
        lambda_att: f64,
    ) -> Result<Tensor> {
        if lambda_att == 0.0 {
            return Ok(f.clone());
        }
        let batch = f.dim(0)?;
        let r = broadcast_rows(r, batch)?;
        let mask = mask.map(|m| broadcast_rows(m, batch)).transpose()?;
        let delta = (self.ica.forward(f, &r, mask.as_ref())? - f)?;
        let gate = (&self.gamma * lambda_att)?;
        Ok((f + delta.broadcast_mul(&gate)?)?)
    }
}

fn join_key(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A batch-1 tensor repeated to `batch` rows (the shared reference row); other batches must match.
fn broadcast_rows(t: &Tensor, batch: usize) -> Result<Tensor> {
    let rows = t.dim(0)?;
    if rows == batch {
        return Ok(t.clone());
    }
    if rows != 1 {
        return Err(Error::Input(format!(
            "reference batch {rows} does not match host batch {batch}"
        )));
    }
    let mut shape = t.dims().to_vec();
    shape[0] = batch;
    Ok(t.broadcast_as(shape)?.contiguous()?)
}

/// The otsu threshold ViCo picks for each row of `attn_ph` (`[B, N]`): `Some(t/10)`, or `None`
/// for a constant row (min-max normalisation gives NaN and ViCo keeps every patch).
pub fn otsu_threshold(attn_ph: &Tensor) -> Result<Vec<Option<f32>>> {
    let rows: Vec<Vec<f32>> = attn_ph.to_dtype(DType::F32)?.to_vec2()?;
    Ok(rows
        .iter()
        .map(|row| otsu_row(&min_max_normalise(row)).map(|t| t.1))
        .collect())
}

/// ViCo's otsu mask of the placeholder attention (`[B, N]` -> `[B, N]` u8, 1 = keep). Computed on
/// values, hence detached from any graph.
pub fn otsu_mask(attn_ph: &Tensor) -> Result<Tensor> {
    let rows: Vec<Vec<f32>> = attn_ph.to_dtype(DType::F32)?.to_vec2()?;
    let (b, n) = attn_ph.dims2()?;
    let mut mask = Vec::with_capacity(b * n);
    for row in &rows {
        let normed = min_max_normalise(row);
        match otsu_row(&normed) {
            Some((_, tau)) => mask.extend(normed.iter().map(|&m| u8::from(m >= tau))),
            None => mask.extend(std::iter::repeat_n(1u8, n)),
        }
    }
    Ok(Tensor::from_vec(mask, (b, n), attn_ph.device())?)
}

/// `(a - min) / (max - min)` in f32, as ViCo (NaN for a constant row).
fn min_max_normalise(row: &[f32]) -> Vec<f32> {
    let min = row.iter().copied().fold(f32::INFINITY, f32::min);
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|&a| (a - min) / (max - min)).collect()
}

/// The first `t` in 1..=9 with the strictly largest between-class variance
/// `(|L|/N)(|H|/N)(mean L − mean H)²`, skipping thresholds with an empty class.
/// Returns `(t, f32(t/10))`.
fn otsu_row(normed: &[f32]) -> Option<(usize, f32)> {
    let n = normed.len() as f64;
    let mut best: Option<(usize, f32)> = None;
    let mut best_g = 0f32;
    for t in 1..OTSU_LEVELS {
        let tau = (t as f64 / OTSU_LEVELS as f64) as f32;
        let (mut low_sum, mut low_n, mut high_sum, mut high_n) = (0f64, 0usize, 0f64, 0usize);
        for &m in normed {
            if m < tau {
                low_sum += m as f64;
                low_n += 1;
            } else if m >= tau {
                high_sum += m as f64;
                high_n += 1;
            }
        }
        if low_n == 0 || high_n == 0 {
            continue;
        }
        // Class weights are Python floats in ViCo, the means f32 tensors.
        let weight = ((low_n as f64 / n) * (high_n as f64 / n)) as f32;
        let diff = (low_sum / low_n as f64) as f32 - (high_sum / high_n as f64) as f32;
        let g = weight * (diff * diff);
        if g > best_g {
            best_g = g;
            best = Some((t, tau));
        }
    }
    best
}

/// L_Pers of one host: `mean((a_ph/max a_ph − sg(a_eot)/max sg(a_eot))²)` over `[B, N]`.
/// Gradients reach the context only through `attn_ph`.
pub fn pers_loss(attn_ph: &Tensor, attn_eot: &Tensor) -> Result<Tensor> {
    let eot = attn_eot.detach();
    let ph = attn_ph.broadcast_div(&attn_ph.max_keepdim(D::Minus1)?)?;
    let eot = eot.broadcast_div(&eot.max_keepdim(D::Minus1)?)?;
    Ok((ph - eot)?.sqr()?.mean_all()?)
}

/// Columns of the prompt: placeholder token and end-of-text token, one per context row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPositions {
    pub placeholder: Vec<usize>,
    pub eot: Vec<usize>,
}

/// Runs a host's base transformer blocks on `tokens` exactly as `SpatialTransformer::run_blocks`
/// does, also returning the text cross-attention probabilities of the last block
/// (`[B, N, n_ctx]`, mean over heads), taken from `norm2(u1)` as ViCo's `return_attn`.
pub fn run_blocks_with_text_probs(
    host: &SpatialTransformer,
    tokens: &Tensor,
    context: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let mut t = tokens.clone();
    let mut probs = None;
    for block in &host.blocks {
        let u1 = (block.attn1.forward(&block.norm1.forward(&t)?, None, None)? + &t)?;
        let q_in = block.norm2.forward(&u1)?;
        probs = Some(block.attn2.probabilities(&q_in, context)?);
        let u2 = (block.attn2.forward(&q_in, Some(context), None)? + u1)?;
        t = (block.ff.forward(&block.norm3.forward(&u2)?)? + u2)?;
    }
    let probs =
        probs.ok_or_else(|| Error::Config("host spatial transformer has no blocks".into()))?;
    Ok((t, probs))
}

/// What the placeholder's attention map yields at one host.
#[derive(Debug, Clone)]
pub struct PlaceholderSignals {
    /// `[B, N_ref]` placeholder column (differentiable w.r.t. the context).
    pub attn_ph: Tensor,
    /// `[B, N_ref]` end-of-text column, detached.
    pub attn_eot: Tensor,
    /// `[B, N_ref]` u8 otsu mask of `attn_ph`.
    pub mask: Tensor,
    /// Scalar L_Pers of the host.
    pub loss: Tensor,
}

/// Placeholder/EOT columns of `text_probs` (`[B, N, n_ctx]`), the otsu mask and L_Pers.
pub fn placeholder_signals(
    text_probs: &Tensor,
    positions: &TokenPositions,
) -> Result<PlaceholderSignals> {
    let (b, _n, n_ctx) = text_probs.dims3()?;
    if positions.placeholder.len() != b || positions.eot.len() != b {
        return Err(Error::Input(format!(
            "token positions for {} / {} rows, attention has {b}",
            positions.placeholder.len(),
            positions.eot.len()
        )));
    }
    let column = |cols: &[usize]| -> Result<Tensor> {
        let rows = cols
            .iter()
            .enumerate()
            .map(|(row, &k)| {
                if k >= n_ctx {
                    return Err(Error::Input(format!(
                        "token column {k} outside the {n_ctx}-token context"
                    )));
                }
                Ok(text_probs.get(row)?.narrow(1, k, 1)?.squeeze(1)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    };
    let attn_ph = column(&positions.placeholder)?;
    let attn_eot = column(&positions.eot)?.detach();
    let mask = otsu_mask(&attn_ph)?;
    let loss = pers_loss(&attn_ph, &attn_eot)?;
    Ok(PlaceholderSignals {
        attn_ph,
        attn_eot,
        mask,
        loss,
    })
}
