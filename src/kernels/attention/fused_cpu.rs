//! `softmax(scale · q kᵀ + mask) v` on the CPU in one pass per (head, block of query rows):
//! the block's scores, softmax and product with the values stay in a per-thread buffer that
//! fits in cache instead of round trips through score-sized tensors. The backward recomputes
//! the probabilities from each row's saved log-sum-exp (FlashAttention's scheme, in row
//! blocks), so training keeps only q, k, v, the output and two floats per query row; it may run
//! more than once (each backward reads the saved values).
//!
//! Layout ([`applies`]): non-empty f32 CPU tensors of rank 3, `[batch*heads, n, d]` (strided
//! ones are made contiguous), and an additive mask of rank 3 at most that broadcasts to
//! `[batch*heads, n_q, n_k]` and carries no gradient: a mask with a gradient takes
//! [`super::attention`]'s composed path, which differentiates it. Rows: a row whose keys are
//! all masked with a finite bias (ViCo's `-f32::MAX`) attends uniformly to every key, and one
//! whose scores are all `-inf` gives NaN, both as the composed softmax does (and torch's).
//! Where it pays: a 64x64-latent self-attention (5 heads, 4096 tokens) never holds a score
//! tensor; see the block sizes below.
//!
//! Threads take (head, block) items from a shared counter and multiply with the gemm crate on
//! one thread each; the key and value gradients are summed per thread and added at the end.

use super::cpu_blocks::{
    dims_of, item_slices, matmul_into, run_items, with_f32, Dims, MaskData, MaskGuard, MatRef,
};
use crate::kernels::cpu::f32_slice;
use crate::kernels::fast_exp::{recompute_softmax_in_place, softmax_in_place};
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::Mutex;

/// Score elements of a forward block: 2^20 f32 (4 MiB), 256 query rows against 4096 keys.
/// On a 64x64-latent self-attention (5 heads, 4096 tokens, head width 64; 2 threads, AVX-512)
/// 32-row blocks took 0.15 s and 128 to 512 rows 0.135-0.145 s: larger blocks amortise the
/// packing of the keys and values inside the products, and 4 MiB still sits in L3.
const FORWARD_BLOCK_ELEMENTS: usize = 1 << 20;
/// The backward holds two score-sized blocks (probabilities and their gradient) and adds
/// `P^T dO` and `dS^T Q` into the key and value gradients once per block, so larger blocks
/// read and write those accumulators less often (16 rows: 0.41 s; 256 rows: 0.32 s).
const BACKWARD_BLOCK_ELEMENTS: usize = 1 << 20;
const MIN_BLOCK_ROWS: usize = 16;
const MAX_BLOCK_ROWS: usize = 256;

/// Query rows per block for `n_k` keys and a score budget of `elements`.
fn block_rows(n_q: usize, n_k: usize, elements: usize) -> usize {
    (elements / n_k.max(1))
        .clamp(MIN_BLOCK_ROWS, MAX_BLOCK_ROWS)
        .min(n_q.max(1))
}

/// Whether [`fused_attention`] takes these operands: non-empty f32 CPU tensors of rank 3 and a
/// mask of rank 3 at most that broadcasts to `[batch*heads, n_q, n_k]` and has no gradient to
/// carry (the kernel treats the mask as a constant).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> bool {
    let operands_fit = [q, k, v].iter().all(|t| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 3 && t.elem_count() > 0
    });
    let (Ok((bh, n_q, _)), Ok(n_k)) = (q.dims3(), k.dim(1)) else {
        return false;
    };
    let mask_fits = mask.is_none_or(|m| {
        m.device().is_cpu()
            && !m.track_op()
            && m.rank() <= 3
            && m.dims()
                .iter()
                .rev()
                .zip([n_k, n_q, bh])
                .all(|(&got, want)| got == 1 || got == want)
    });
    operands_fit && mask_fits
}

/// `softmax(scale q k^T + mask) v` on `[batch*heads, n, d]` f32 CPU tensors; `mask` is additive
/// and broadcastable to `[batch*heads, n_q, n_k]`. With `with_grad` the result carries a
/// backward for q, k and v. A mask with a gradient is refused ([`applies`]).
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    with_grad: bool,
) -> Result<Tensor> {
    let (bh, n_q, d) = q.dims3()?;
    let (k_bh, n_k, k_d) = k.dims3()?;
    let (v_bh, v_n, _) = v.dims3()?;
    if k_bh != bh || v_bh != bh || k_d != d || v_n != n_k {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    if mask.is_some_and(|m| m.track_op()) {
        candle_core::bail!("fused attention: the mask carries a gradient, which it would drop");
    }
    let mask = mask
        .map(|m| -> Result<Tensor> {
            m.detach()
                .to_dtype(DType::F32)?
                .contiguous()?
                .broadcast_as((bh, n_q, n_k))
        })
        .transpose()?;
    let op = FusedAttentionCpu {
        scale: scale as f32,
        mask,
        forward_rows: block_rows(n_q, n_k, FORWARD_BLOCK_ELEMENTS),
        backward_rows: block_rows(n_q, n_k, BACKWARD_BLOCK_ELEMENTS),
        log_sum_exp: with_grad.then(|| Mutex::new(None)),
    };
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    if with_grad {
        q.apply_op3_arc(&k, &v, std::sync::Arc::new(Box::new(op)))
    } else {
        q.apply_op3_no_bwd(&k, &v, &op)
    }
}

struct FusedAttentionCpu {
    scale: f32,
    /// Broadcast to `[bh, n_q, n_k]` (zero strides where it repeats).
    mask: Option<Tensor>,
    forward_rows: usize,
    backward_rows: usize,
    /// Each query row's log-sum-exp of its masked, scaled scores as `(max, ln(sum))` pairs
    /// (see [`softmax_in_place`]), kept by a forward that has a backward to come, for every
    /// backward.
    log_sum_exp: Option<Mutex<Option<Vec<f32>>>>,
}

impl FusedAttentionCpu {
    /// A read lock on the mask's storage, if there is a mask.
    fn mask_guard(&self) -> Option<MaskGuard<'_>> {
        let (storage, layout) = self.mask.as_ref()?.storage_and_layout();
        let stride = layout.stride();
        Some(MaskGuard {
            storage: Box::new(storage),
            offset: layout.start_offset(),
            strides: [stride[0], stride[1], stride[2]],
        })
    }

    /// Scaled, masked scores of the query rows `q_rows` (starting at row `i0`) of head `h`
    /// into `s`.
    fn scores(
        &self,
        s: &mut [f32],
        q_rows: MatRef,
        k_head: MatRef,
        mask: Option<&MaskData>,
        h: usize,
        i0: usize,
    ) {
        let n_k = k_head.rows;
        matmul_into(s, q_rows, k_head.t(), self.scale, false);
        if let Some(mask) = mask {
            for (r, row) in s.chunks_mut(n_k).take(q_rows.rows).enumerate() {
                mask.add_row(h, i0 + r, row);
            }
        }
    }

    fn forward(&self, q: &[f32], k: &[f32], v: &[f32], dims: Dims) -> Result<Vec<f32>> {
        let Dims {
            bh,
            n_q,
            n_k,
            d,
            d_v,
        } = dims;
        let rows = self.forward_rows;
        let blocks = n_q.div_ceil(rows);
        let mut out = vec![0f32; bh * n_q * d_v];
        let mut lse = vec![
            0f32;
            if self.log_sum_exp.is_some() {
                2 * bh * n_q
            } else {
                0
            }
        ];
        let guard = self.mask_guard();
        let mask = guard.as_ref().map(MaskGuard::view).transpose()?;
        {
            let out_items = item_slices(&mut out, dims, rows, d_v);
            let lse_items = if lse.is_empty() {
                Vec::new()
            } else {
                item_slices(&mut lse, dims, rows, 2)
            };
            run_items(
                bh * blocks,
                || vec![0f32; rows * n_k],
                |item, s| {
                    let (h, i0) = (item / blocks, (item % blocks) * rows);
                    let r = rows.min(n_q - i0);
                    let q_rows = MatRef::rows(&q[(h * n_q + i0) * d..], r, d);
                    let k_head = MatRef::rows(&k[h * n_k * d..], n_k, d);
                    let v_head = MatRef::rows(&v[h * n_k * d_v..], n_k, d_v);
                    self.scores(s, q_rows, k_head, mask.as_ref(), h, i0);
                    let mut lse_rows = lse_items.get(item).map(|m| m.lock().expect("lse"));
                    for (i, row) in s.chunks_mut(n_k).take(r).enumerate() {
                        let (max, ln_sum) = softmax_in_place(row);
                        if let Some(l) = lse_rows.as_mut() {
                            l[2 * i] = max;
                            l[2 * i + 1] = ln_sum;
                        }
                    }
                    let mut o = out_items[item].lock().expect("output block");
                    matmul_into(&mut o, MatRef::rows(s, r, n_k), v_head, 1.0, false);
                },
            );
        }
        if let Some(slot) = &self.log_sum_exp {
            *slot.lock().expect("log-sum-exp") = Some(lse);
        }
        Ok(out)
    }

    /// `(dq, dk, dv)` from the inputs, the output `o`, its gradient `g` and the saved
    /// log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        g: &[f32],
        lse: &[f32],
        dims: Dims,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let Dims {
            bh,
            n_q,
            n_k,
            d,
            d_v,
        } = dims;
        let rows = self.backward_rows;
        let blocks = n_q.div_ceil(rows);
        let guard = self.mask_guard();
        let mask = guard.as_ref().map(MaskGuard::view).transpose()?;
        let mut dq = vec![0f32; bh * n_q * d];
        let partials = {
            let dq_items = item_slices(&mut dq, dims, rows, d);
            run_items(
                bh * blocks,
                || BackwardScratch {
                    p: vec![0f32; rows * n_k],
                    ds: vec![0f32; rows * n_k],
                    dk: vec![0f32; bh * n_k * d],
                    dv: vec![0f32; bh * n_k * d_v],
                },
                |item, w| {
                    let (h, i0) = (item / blocks, (item % blocks) * rows);
                    let r = rows.min(n_q - i0);
                    let q_rows = MatRef::rows(&q[(h * n_q + i0) * d..], r, d);
                    let g_rows = MatRef::rows(&g[(h * n_q + i0) * d_v..], r, d_v);
                    let o_rows = &o[(h * n_q + i0) * d_v..(h * n_q + i0 + r) * d_v];
                    let k_head = MatRef::rows(&k[h * n_k * d..], n_k, d);
                    let v_head = MatRef::rows(&v[h * n_k * d_v..], n_k, d_v);
                    // P = exp(S - lse), the forward's probabilities.
                    self.scores(&mut w.p, q_rows, k_head, mask.as_ref(), h, i0);
                    for (i, row) in w.p.chunks_mut(n_k).take(r).enumerate() {
                        let at = 2 * (h * n_q + i0 + i);
                        recompute_softmax_in_place(row, (lse[at], lse[at + 1]));
                    }
                    let p = MatRef::rows(&w.p, r, n_k);
                    // dV += P^T dO.
                    let dv_head = &mut w.dv[h * n_k * d_v..(h + 1) * n_k * d_v];
                    matmul_into(dv_head, p.t(), g_rows, 1.0, true);
                    // dP = dO V^T, then dS = P * (dP - rowsum(dO * O)) in its place.
                    matmul_into(&mut w.ds, g_rows, v_head.t(), 1.0, false);
                    for (i, (ds_row, p_row)) in
                        w.ds.chunks_mut(n_k)
                            .zip(w.p.chunks(n_k))
                            .take(r)
                            .enumerate()
                    {
                        let g_row = &g_rows.data[i * d_v..(i + 1) * d_v];
                        let o_row = &o_rows[i * d_v..(i + 1) * d_v];
                        let dot: f32 = g_row.iter().zip(o_row).map(|(a, b)| a * b).sum();
                        for (x, &p) in ds_row.iter_mut().zip(p_row) {
                            *x = p * (*x - dot);
                        }
                    }
                    let ds = MatRef::rows(&w.ds, r, n_k);
                    // dQ = s dS K, dK += s dS^T Q.
                    let mut dq_rows = dq_items[item].lock().expect("dq block");
                    matmul_into(&mut dq_rows, ds, k_head, self.scale, false);
                    let dk_head = &mut w.dk[h * n_k * d..(h + 1) * n_k * d];
                    matmul_into(dk_head, ds.t(), q_rows, self.scale, true);
                },
            )
        };
        let mut partials = partials.into_iter();
        let first = partials.next().expect("at least one worker");
        let (mut dk, mut dv) = (first.dk, first.dv);
        for w in partials {
            dk.iter_mut().zip(&w.dk).for_each(|(a, b)| *a += b);
            dv.iter_mut().zip(&w.dv).for_each(|(a, b)| *a += b);
        }
        Ok((dq, dk, dv))
    }
}

struct BackwardScratch {
    p: Vec<f32>,
    ds: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl candle_core::CustomOp3 for FusedAttentionCpu {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = dims_of(q_layout, k_layout, v_layout)?;
        let q = f32_slice(q_storage, q_layout, "attention queries")?;
        let k = f32_slice(k_storage, k_layout, "attention keys")?;
        let v = f32_slice(v_storage, v_layout, "attention values")?;
        let out = self.forward(q, k, v, dims)?;
        Ok((
            CpuStorage::F32(out),
            Shape::from((dims.bh, dims.n_q, dims.d_v)),
        ))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Read, not taken: a second backward through the same graph needs it again.
        let Some(slot) = self.log_sum_exp.as_ref() else {
            candle_core::bail!("attention backward: the forward kept no log-sum-exp");
        };
        let saved = slot
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention backward: lock poisoned".into()))?;
        let Some(lse) = saved.as_deref() else {
            candle_core::bail!("attention backward: the forward kept no log-sum-exp");
        };
        let (k, v, out, grad) = (
            k.contiguous()?,
            v.contiguous()?,
            out.contiguous()?,
            grad_out.contiguous()?,
        );
        let q = q.contiguous()?;
        let dims = dims_of(q.layout(), k.layout(), v.layout())?;
        let (dq, dk, dv) = with_f32(&q, "attention queries", |q_data| {
            with_f32(&k, "attention keys", |k_data| {
                with_f32(&v, "attention values", |v_data| {
                    with_f32(&out, "attention output", |o_data| {
                        with_f32(&grad, "attention output gradient", |g_data| {
                            self.backward(q_data, k_data, v_data, o_data, g_data, lse, dims)
                        })
                    })
                })
            })
        })?;
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use crate::kernels::DifferentiableScope;
    use candle_core::{Var, D};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>) -> Tensor {
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let scores = match mask {
            Some(m) => scores.broadcast_add(m).unwrap(),
            None => scores,
        };
        candle_nn::ops::softmax(&scores, D::Minus1)
            .unwrap()
            .matmul(v)
            .unwrap()
    }

    fn run_with_rows(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: Option<&Tensor>,
        rows: usize,
        with_grad: bool,
    ) -> Tensor {
        let (bh, n_q, _) = q.dims3().unwrap();
        let n_k = k.dim(1).unwrap();
        let op = FusedAttentionCpu {
            scale: scale as f32,
            mask: mask.map(|m| {
                m.contiguous()
                    .unwrap()
                    .broadcast_as((bh, n_q, n_k))
                    .unwrap()
            }),
            forward_rows: rows,
            backward_rows: rows,
            log_sum_exp: with_grad.then(|| Mutex::new(None)),
        };
        if with_grad {
            q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
                .unwrap()
        } else {
            q.apply_op3_no_bwd(k, v, &op).unwrap()
        }
    }

    /// The masks the models pass: none, a key mask per head (personalization's `-f32::MAX`
    /// for masked reference tokens), a full `[n_q, n_k]` bias (the text encoder's causal mask).
    fn masks(bh: usize, n_q: usize, n_k: usize) -> Vec<(&'static str, Option<Tensor>)> {
        let keep = randn(31, &[bh, 1, n_k]).ge(-0.5f64).unwrap();
        let key_mask = keep
            .where_cond(
                &Tensor::zeros((bh, 1, n_k), DType::F32, &candle_core::Device::Cpu).unwrap(),
                &Tensor::full(-f32::MAX, (bh, 1, n_k), &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
        let full = (randn(32, &[n_q, n_k]) * 3.0).unwrap();
        vec![
            ("no mask", None),
            ("key mask", Some(key_mask)),
            ("full mask", Some(full)),
        ]
    }

    /// Forward values against the composed ops, for several block sizes (one block, several,
    /// a last short block), odd sizes and a value width other than the key width.
    #[test]
    fn fused_attention_matches_composed_forward() {
        let (bh, n_q, n_k, d, d_v) = (3, 37, 29, 8, 5);
        let (q, k, v) = (
            randn(1, &[bh, n_q, d]),
            randn(2, &[bh, n_k, d]),
            randn(3, &[bh, n_k, d_v]),
        );
        for (label, mask) in masks(bh, n_q, n_k) {
            let want = composed(&q, &k, &v, 0.37, mask.as_ref());
            for rows in [1, 7, 16, n_q, 64] {
                let got = run_with_rows(&q, &k, &v, 0.37, mask.as_ref(), rows, false);
                let err = max_diff(&got, &want);
                println!(
                    "mask {}, rows {rows}: max abs error {err:e}",
                    mask.is_some()
                );
                assert!(err < 2e-6, "{label}, rows {rows}: {err:e}");
            }
        }
        // The public entry with its own block sizes, and a mask with a leading batch axis.
        let mask = (randn(33, &[1, n_q, n_k]) * 2.0).unwrap();
        let got = fused_attention(&q, &k, &v, 0.37, Some(&mask), false).unwrap();
        let err = max_diff(&got, &composed(&q, &k, &v, 0.37, Some(&mask)));
        println!("entry point: max abs error {err:e}");
        assert!(err < 2e-6);
    }

    /// Gradients for q, k and v against candle's composed differentiable softmax.
    #[test]
    fn fused_attention_matches_composed_gradients() {
        let (bh, n_q, n_k, d, d_v) = (2, 23, 19, 6, 7);
        let weight = randn(4, &[bh, n_q, d_v]);
        for (label, mask) in masks(bh, n_q, n_k) {
            for rows in [1, 5, n_q] {
                let vars: Vec<Var> = [(1, [bh, n_q, d]), (2, [bh, n_k, d]), (3, [bh, n_k, d_v])]
                    .iter()
                    .map(|(seed, shape)| Var::from_tensor(&randn(*seed, shape)).unwrap())
                    .collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );
                let want_out = composed(q, k, v, 0.41, mask.as_ref());
                let want = (&want_out * &weight)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let out = run_with_rows(q, k, v, 0.41, mask.as_ref(), rows, true);
                assert!(max_diff(&out, &want_out) < 2e-6);
                let got = (&out * &weight)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for (name, var) in ["q", "k", "v"].iter().zip(&vars) {
                    let err = max_diff(
                        got.get(var.as_tensor()).expect("gradient"),
                        want.get(var.as_tensor()).unwrap(),
                    );
                    println!("{label}, rows {rows}, d{name}: max abs error {err:e}");
                    assert!(err < 1e-5, "{label}, rows {rows}, d{name}: {err:e}");
                }
            }
        }
    }

    /// `q`, `k`, `v` of `[bh, n, d]` as variables, from seeds 1 to 3.
    fn qkv(bh: usize, n_q: usize, n_k: usize, d: usize, d_v: usize) -> [Var; 3] {
        [(1, [bh, n_q, d]), (2, [bh, n_k, d]), (3, [bh, n_k, d_v])]
            .map(|(seed, shape)| Var::from_tensor(&randn(seed, &shape)).unwrap())
    }

    /// The fused output and its q, k, v gradients for the loss `sum(out * weight)` against the
    /// composed ops'; returns the output error and the three gradient errors.
    fn compare(vars: &[Var; 3], scale: f64, mask: Option<&Tensor>, weight: &Tensor) -> [f32; 4] {
        let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
        let want_out = composed(q, k, v, scale, mask);
        let want = (&want_out * weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let out = fused_attention(q, k, v, scale, mask, true).unwrap();
        let got = (&out * weight)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad = |t: &Tensor| max_diff(got.get(t).expect("gradient"), want.get(t).unwrap());
        [max_diff(&out, &want_out), grad(q), grad(k), grad(v)]
    }

    /// Large logits (a sharp softmax) and a single key: the log-sum-exp keeps the recomputed
    /// probabilities exact, for every operand's gradient.
    #[test]
    fn fused_attention_handles_sharp_and_single_key_rows() {
        for (n_k, scale) in [(1usize, 1.0), (40, 12.0)] {
            let vars = qkv(2, 9, n_k, 4, 3);
            let weight = randn(4, &[2, 9, 3]);
            let [out, dq, dk, dv] = compare(&vars, scale, None, &weight);
            println!("n_k {n_k}, scale {scale}: output {out:e}, dq {dq:e}, dk {dk:e}, dv {dv:e}");
            assert!(out < 1e-5, "output {out:e}");
            assert!(dq < 1e-4 && dk < 1e-4 && dv < 1e-5, "{dq:e} {dk:e} {dv:e}");
        }
    }

    /// A query row whose every key is masked. With ViCo's finite `-f32::MAX` the row attends
    /// uniformly (the composed softmax's result), and its gradients match; with `-inf` both
    /// give NaN in that row, and the other rows are unaffected.
    #[test]
    fn fully_masked_rows_behave_as_the_composed_softmax() {
        let (bh, n_q, n_k) = (2, 5, 7);
        let masked_row = 3;
        let weight = randn(4, &[bh, n_q, 3]);
        let row_mask = |fill: f32| {
            let mut m = vec![0f32; n_q * n_k];
            m[masked_row * n_k..(masked_row + 1) * n_k].fill(fill);
            // And one masked key elsewhere, as a partial mask.
            m[n_k + 2] = fill;
            Tensor::from_vec(m, (n_q, n_k), &candle_core::Device::Cpu).unwrap()
        };
        let vars = qkv(bh, n_q, n_k, 4, 3);
        let finite = row_mask(-f32::MAX);
        let [out, dq, dk, dv] = compare(&vars, 0.5, Some(&finite), &weight);
        println!("-f32::MAX row: output {out:e}, dq {dq:e}, dk {dk:e}, dv {dv:e}");
        assert!(out < 2e-6 && dq < 1e-5 && dk < 1e-5 && dv < 1e-5);
        // Uniform: the masked row's output is the mean of the values.
        let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
        let out = fused_attention(q, k, v, 0.5, Some(&finite), false).unwrap();
        let mean_v = v.mean_keepdim(1).unwrap();
        let row = out.narrow(1, masked_row, 1).unwrap();
        assert!(max_diff(&row, &mean_v) < 1e-6);

        let infinite = row_mask(f32::NEG_INFINITY);
        let want = composed(q, k, v, 0.5, Some(&infinite));
        let got = fused_attention(q, k, v, 0.5, Some(&infinite), false).unwrap();
        for t in [&want, &got] {
            let row: Vec<f32> = t
                .narrow(1, masked_row, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(row.iter().all(|x| x.is_nan()), "{row:?}");
        }
        let others = |t: &Tensor| {
            Tensor::cat(
                &[
                    t.narrow(1, 0, masked_row).unwrap(),
                    t.narrow(1, masked_row + 1, n_q - masked_row - 1).unwrap(),
                ],
                1,
            )
            .unwrap()
        };
        let err = max_diff(&others(&got), &others(&want));
        println!("-inf row: other rows {err:e}");
        assert!(err < 2e-6, "{err:e}");
    }

    /// Backward twice through the same graph (as `backward()` on one loss called twice): the
    /// second gives the same gradients as the first.
    #[test]
    fn fused_attention_backward_runs_twice() {
        let vars = qkv(2, 11, 6, 4, 3);
        let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
        let out = fused_attention(q, k, v, 0.4, None, true).unwrap();
        let loss = (&out * &randn(4, &[2, 11, 3])).unwrap().sum_all().unwrap();
        let first = loss.backward().unwrap();
        let second = loss.backward().expect("a second backward");
        for t in [q, k, v] {
            assert_eq!(max_diff(first.get(t).unwrap(), second.get(t).unwrap()), 0.0);
        }
    }

    /// A mask with a gradient: the fused kernel refuses it (it would drop the gradient), and
    /// the public entry differentiates it through the composed ops, in chunks or not.
    #[test]
    fn a_mask_with_a_gradient_is_differentiated_not_dropped() {
        let (bh, n_q, n_k) = (2, 6, 5);
        let vars = qkv(bh, n_q, n_k, 4, 3);
        let [q, k, v] = vars.each_ref().map(|v| v.as_tensor());
        let mask = Var::from_tensor(&(randn(9, &[n_q, n_k]) * 2.0).unwrap()).unwrap();
        assert!(!applies(q, k, v, Some(mask.as_tensor())));
        assert!(applies(q, k, v, Some(&mask.as_tensor().detach())));
        assert!(fused_attention(q, k, v, 0.5, Some(mask.as_tensor()), true).is_err());
        let weight = randn(4, &[bh, n_q, 3]);
        let loss = |out: &Tensor| (out * &weight).unwrap().sum_all().unwrap();
        let want = loss(&composed(q, k, v, 0.5, Some(mask.as_tensor())))
            .backward()
            .unwrap();
        let _training = DifferentiableScope::enter(true);
        let out = super::super::attention(q, k, v, 0.5, Some(mask.as_tensor())).unwrap();
        let got = loss(&out).backward().unwrap();
        for (name, t) in [("q", q), ("k", k), ("v", v), ("mask", mask.as_tensor())] {
            let err = max_diff(got.get(t).expect("a gradient"), want.get(t).unwrap());
            println!("tracked mask: d{name} max abs error {err:e}");
            assert!(err < 1e-5, "d{name}: {err:e}");
        }
    }

    #[test]
    fn block_rows_stay_within_bounds() {
        assert_eq!(block_rows(4096, 4096, FORWARD_BLOCK_ELEMENTS), 256);
        assert_eq!(block_rows(4096, 1 << 16, FORWARD_BLOCK_ELEMENTS), 16);
        assert_eq!(block_rows(4096, 77, FORWARD_BLOCK_ELEMENTS), MAX_BLOCK_ROWS);
        assert_eq!(block_rows(10, 77, FORWARD_BLOCK_ELEMENTS), 10);
        assert_eq!(
            block_rows(1 << 20, 1 << 20, FORWARD_BLOCK_ELEMENTS),
            MIN_BLOCK_ROWS
        );
        assert_eq!(block_rows(0, 0, FORWARD_BLOCK_ELEMENTS), 1);
    }
}
