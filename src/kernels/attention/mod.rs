//! Scaled dot-product attention, `softmax(scale · q kᵀ + mask) v`, on `[batch*heads, n, d]`
//! tensors with an optional additive mask broadcastable to `[batch*heads, n_q, n_k]`; scores and
//! softmax in f32 (as the reference's `_ATTN_PRECISION = "fp32"`).
//!
//! [`attention`] dispatches: on f32 CPU tensors, the fused kernel of [`fused_cpu`] (one pass
//! per block of query rows, with its own backward), where its `applies` says so; elsewhere
//! (CUDA, half precision, a mask that carries a gradient) in query chunks of bounded score
//! memory ([`attention_chunk_elements`]) at inference, and for training a forward without a
//! graph whose backward recomputes the probabilities chunk by chunk. Where it pays: a 64x64
//! latent's self-attention never holds its whole score tensor, in inference or in training.

mod cpu_blocks;
pub mod fused_cpu;

use super::softmax::{softmax_backward, softmax_last_dim, softmax_last_dim_no_grad};
use super::{differentiable, frozen::HandOver};
use candle_core::{DType, Result, Tensor};

/// Upper bound on the elements of one f32 score matrix (`[batch*heads, rows, n_k]`) that
/// [`attention`] materialises at a time: 2^26 floats = 256 MiB. Longer query sequences are
/// processed in row chunks, so a 64x64-latent tile (4096 tokens, 4096 keys) never holds the whole
/// score tensor, in inference or in training (the chunks are ordinary differentiable ops).
pub const ATTENTION_CHUNK_ELEMENTS: usize = 1 << 26;

/// The inference bound on the CPU where the fused kernel does not apply (half precision): 2^22
/// floats = 16 MiB per score chunk (also the feed-forward's row chunks, see
/// `unet::FeedForward`). A chunk of ~100 query rows per head against 4096 keys keeps the matrix
/// products at full speed, and the scores and their probabilities (two chunk-sized tensors) add
/// 32 MiB to a restore's peak instead of half a gigabyte.
pub const CPU_CHUNK_ELEMENTS: usize = 1 << 22;

/// On CUDA, inference chunks follow the device's free memory: 1/32 of it per f32 score chunk
/// (the softmax keeps about three score-sized tensors alive at once, and tiles may run in
/// batches), between 2^24 elements (64 MiB) and 2^27 (512 MiB). Larger chunks only add peak
/// memory: a 4096-row, head-dim-64 product already fills the GPU, and the softmax is
/// bandwidth-bound whatever the chunking. A 64x64-latent self-attention at CFG batch 2 (10 heads
/// of 4096 x 4096 scores, 671 MB) runs in 2 chunks on an H200 instead of 3.
pub const CUDA_CHUNK_MIN_ELEMENTS: usize = 1 << 24;
pub const CUDA_CHUNK_MAX_ELEMENTS: usize = 1 << 27;
const CUDA_CHUNK_FREE_FRACTION: usize = 32;

/// The score-chunk bound (f32 elements) for a device with `free_bytes` of free memory.
pub fn chunk_elements_for_free_memory(free_bytes: usize) -> usize {
    (free_bytes / CUDA_CHUNK_FREE_FRACTION / std::mem::size_of::<f32>())
        .clamp(CUDA_CHUNK_MIN_ELEMENTS, CUDA_CHUNK_MAX_ELEMENTS)
}

/// The inference score-chunk bound on `device`: [`CPU_CHUNK_ELEMENTS`] on the CPU,
/// [`ATTENTION_CHUNK_ELEMENTS`] where a GPU's free memory cannot be read, [`chunk_elements_for_free_memory`] on CUDA, read once per
/// GPU (at its first attention, with the weights loaded) so one run keeps one chunking.
pub fn attention_chunk_elements(device: &candle_core::Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => {
            static PER_GPU: std::sync::Mutex<Vec<(usize, usize)>> =
                std::sync::Mutex::new(Vec::new());
            let Ok(mut known) = PER_GPU.lock() else {
                return ATTENTION_CHUNK_ELEMENTS;
            };
            if let Some(&(_, n)) = known.iter().find(|(id, _)| *id == gpu_id) {
                return n;
            }
            let n = cuda_free_memory(device)
                .map(chunk_elements_for_free_memory)
                .unwrap_or(ATTENTION_CHUNK_ELEMENTS);
            known.push((gpu_id, n));
            n
        }
        _ => CPU_CHUNK_ELEMENTS,
    }
}

#[cfg(feature = "cuda")]
fn cuda_free_memory(device: &candle_core::Device) -> Option<usize> {
    match device {
        candle_core::Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _)| free),
        _ => None,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_free_memory(_: &candle_core::Device) -> Option<usize> {
    None
}

/// Scaled dot-product attention on `[batch*heads, n, d]` tensors with an optional additive
/// mask broadcastable to `[batch*heads, n_q, n_k]`. Scores and softmax are in f32 (as the
/// reference's `_ATTN_PRECISION = "fp32"`); query rows are chunked to bound memory. In
/// differentiable mode gradients flow to q, k, v and to a mask that carries one.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask_tracked = mask.is_some_and(|m| m.track_op());
    let with_grad =
        differentiable() && (q.track_op() || k.track_op() || v.track_op() || mask_tracked);
    if fused_cpu::applies(q, k, v, mask) {
        return fused_cpu::fused_attention(q, k, v, scale, mask, with_grad);
    }
    if with_grad && mask_tracked {
        // The recomputing backward treats the mask as a constant: composed ops (the softmax
        // too, in differentiable mode) differentiate all four operands.
        return chunked_attention(q, k, v, scale, mask, ATTENTION_CHUNK_ELEMENTS);
    }
    if with_grad {
        return recomputed_attention(q, k, v, scale, mask, ATTENTION_CHUNK_ELEMENTS);
    }
    chunked_attention(q, k, v, scale, mask, attention_chunk_elements(q.device()))
}

fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    max_elements: usize,
) -> Result<Tensor> {
    let (heads, n_q, _) = q.dims3()?;
    let rows = chunk_rows(heads, k.dim(1)?, max_elements);
    if rows >= n_q {
        return attention_rows(q, k, v, scale, mask);
    }
    let mut chunks = Vec::with_capacity(n_q.div_ceil(rows));
    for start in (0..n_q).step_by(rows) {
        let len = rows.min(n_q - start);
        let q_rows = q.narrow(1, start, len)?;
        let mask_rows = mask_rows(mask, n_q, start, len)?;
        chunks.push(attention_rows(&q_rows, k, v, scale, mask_rows.as_ref())?);
    }
    Tensor::cat(&chunks, 1)
}

/// Query rows per chunk so that one `[heads, rows, n_k]` f32 matrix stays within the bound.
fn chunk_rows(heads: usize, n_k: usize, max_elements: usize) -> usize {
    (max_elements / (heads * n_k).max(1)).max(1)
}

/// The rows `start..start+len` of an additive mask: one with a query axis is cut with the
/// queries; a broadcast one is shared.
fn mask_rows(
    mask: Option<&Tensor>,
    n_q: usize,
    start: usize,
    len: usize,
) -> Result<Option<Tensor>> {
    Ok(match mask {
        Some(m) if m.rank() >= 2 && m.dim(m.rank() - 2)? == n_q && n_q > 1 => {
            Some(m.narrow(m.rank() - 2, start, len)?)
        }
        Some(m) => Some(m.clone()),
        None => None,
    })
}

/// Attention for training: the forward runs without a graph (as at inference), and the backward
/// recomputes the probabilities chunk by chunk from q, k and v. The graph keeps only q, k, v and
/// the output instead of every `[heads, n_q, n_k]` intermediate of the composed softmax (five
/// 671 MB matrices per 64x64-latent self-attention at batch 2), which is what lets a full-size
/// 512-px personalization step fit in memory. Gradients flow to q, k and v; the mask is constant.
fn recomputed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    max_elements: usize,
) -> Result<Tensor> {
    let out = chunked_attention(
        &q.detach(),
        &k.detach(),
        &v.detach(),
        scale,
        mask,
        max_elements,
    )?;
    let op = RecomputedAttention {
        out: HandOver::new(out),
        scale,
        mask: mask.map(|m| m.detach()),
        max_elements,
    };
    q.apply_op3_arc(k, v, std::sync::Arc::new(Box::new(op)))
}

struct RecomputedAttention {
    out: HandOver,
    scale: f64,
    mask: Option<Tensor>,
    max_elements: usize,
}

impl candle_core::CustomOp3 for RecomputedAttention {
    fn name(&self) -> &'static str {
        "recomputed-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
        _: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // In f32 whatever the activations' dtype; per query chunk c:
        // P = softmax(s Q_c K^T + M), dV += P^T G_c, dP = G_c V^T,
        // dS = P * (dP - rowsum(dP * P)), dQ_c = s dS K, dK += s dS^T Q_c.
        let dtype = q.dtype();
        let f32 = |t: &Tensor| t.detach().to_dtype(DType::F32);
        let (q, k, v, g) = (f32(q)?, f32(k)?, f32(v)?, f32(grad_out)?);
        let (heads, n_q, _) = q.dims3()?;
        let n_k = k.dim(1)?;
        let rows = chunk_rows(heads, n_k, self.max_elements);
        let mut dq_chunks = Vec::with_capacity(n_q.div_ceil(rows));
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for start in (0..n_q).step_by(rows) {
            let len = rows.min(n_q - start);
            let q_c = q.narrow(1, start, len)?;
            let g_c = g.narrow(1, start, len)?;
            let scores = (q_c.matmul(&k.t()?)? * self.scale)?;
            let scores = match mask_rows(self.mask.as_ref(), n_q, start, len)? {
                Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
                None => scores,
            };
            let p = softmax_last_dim_no_grad(&scores)?;
            dv = (dv + p.t()?.matmul(&g_c)?)?;
            let dp = g_c.matmul(&v.t()?)?;
            let ds = softmax_backward(&p, &dp)?;
            dq_chunks.push((ds.matmul(&k)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&q_c)? * self.scale)?)?;
        }
        let dq = Tensor::cat(&dq_chunks, 1)?;
        Ok((
            Some(dq.to_dtype(dtype)?),
            Some(dk.to_dtype(dtype)?),
            Some(dv.to_dtype(dtype)?),
        ))
    }
}

fn attention_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    // The scale goes on the queries ([n_q, d]) rather than the scores ([n_q, n_k]): one pass over
    // the small tensor instead of the largest one, and f16 scores stay far from overflow. Half
    // precision multiplies in the native dtype (cuBLAS accumulates in f32) and widens for the
    // softmax.
    let scores = (q * scale)?.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.to_dtype(DType::F32)?)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    probs.to_dtype(dtype)?.matmul(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::{max_diff, randn};
    use candle_core::{Var, D};

    /// The recomputing attention (chunked into 1-, 2- and whole-row pieces) against the composed
    /// differentiable one: same output, same gradients for q, k and v, with and without a mask.
    #[test]
    fn recomputed_attention_matches_composed_gradients() {
        let (bh, n_q, n_k, d) = (3, 5, 7, 4);
        let scale = 0.5;
        let causal_like = randn(9, &[n_q, n_k]).clamp(-1f32, 0f32).unwrap();
        let weight = randn(4, &[bh, n_q, d]);
        for mask in [None, Some(&causal_like)] {
            for max_elements in [bh * n_k, 2 * bh * n_k, 1 << 20] {
                let vars: Vec<Var> = [1, 2, 3]
                    .iter()
                    .zip([[bh, n_q, d], [bh, n_k, d], [bh, n_k, d]])
                    .map(|(seed, shape)| Var::from_tensor(&randn(*seed, &shape)).unwrap())
                    .collect();
                let (q, k, v) = (
                    vars[0].as_tensor(),
                    vars[1].as_tensor(),
                    vars[2].as_tensor(),
                );

                let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
                let scores = match mask {
                    Some(m) => scores.broadcast_add(m).unwrap(),
                    None => scores,
                };
                let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
                let composed = probs.matmul(v).unwrap();
                let loss = (&composed * &weight).unwrap().sum_all().unwrap();
                let want = loss.backward().unwrap();

                let out = recomputed_attention(q, k, v, scale, mask, max_elements).unwrap();
                assert!(max_diff(&out, &composed) < 1e-6);
                let loss = (&out * &weight).unwrap().sum_all().unwrap();
                let got = loss.backward().unwrap();
                for var in &vars {
                    let (g, w) = (
                        got.get(var.as_tensor()).expect("gradient"),
                        want.get(var.as_tensor()).unwrap(),
                    );
                    let err = max_diff(g, w);
                    assert!(
                        err < 1e-5,
                        "max_elements {max_elements}: gradient error {err}"
                    );
                }
            }
        }
    }

    /// The CUDA chunk bound as a function of free memory: clamped at both ends, 1/32 of free
    /// memory in between; and the CPU keeps the fixed bound.
    #[test]
    fn chunk_bound_follows_free_memory_on_cuda_only() {
        const GB: usize = 1_000_000_000;
        assert_eq!(chunk_elements_for_free_memory(0), CUDA_CHUNK_MIN_ELEMENTS);
        assert_eq!(chunk_elements_for_free_memory(GB), CUDA_CHUNK_MIN_ELEMENTS);
        // 12 GB free: 375 MB of scores, between the bounds.
        assert_eq!(chunk_elements_for_free_memory(12 * GB), 12 * GB / 32 / 4);
        // An H200 (about 139 GB free before the weights): the upper bound.
        assert_eq!(
            chunk_elements_for_free_memory(139 * GB),
            CUDA_CHUNK_MAX_ELEMENTS
        );
        // Monotone in free memory.
        let mut last = 0;
        for free in (0..200).map(|i| i * GB) {
            let n = chunk_elements_for_free_memory(free);
            assert!(n >= last);
            last = n;
        }
        // 4096-token self-attention, head dim 64, CFG batch 2 x 5 heads: chunks of the score
        // matrix [10, 4096, 4096] are 512 MiB at most and the rows cover it in 2 chunks.
        let rows = chunk_rows(10, 4096, chunk_elements_for_free_memory(139 * GB));
        assert_eq!(4096usize.div_ceil(rows), 2);
        assert!(10 * rows * 4096 * 4 <= 512 << 20);
        assert_eq!(
            attention_chunk_elements(&candle_core::Device::Cpu),
            CPU_CHUNK_ELEMENTS
        );
    }

    #[test]
    fn chunked_attention_matches_one_block() {
        let (q, k, v) = (
            randn(1, &[2, 9, 4]),
            randn(2, &[2, 6, 4]),
            randn(3, &[2, 6, 4]),
        );
        let mask = randn(5, &[9, 6]).clamp(-2f32, 0f32).unwrap();
        let whole = attention_rows(&q, &k, &v, 0.3, Some(&mask)).unwrap();
        let chunked = chunked_attention(&q, &k, &v, 0.3, Some(&mask), 2 * 6 * 2).unwrap();
        assert!(max_diff(&whole, &chunked) < 1e-6);
    }
}
