//! The tiled ("canvas") sampler of StableSR's tile script, for latents larger than the UNet's
//! native size.
//!
//! At every step the latent is cut into overlapping square tiles; each tile of `x_t` is denoised
//! with the matching tile of the LQ latent as condition (so the time-aware encoder runs per tile),
//! guidance is applied per tile, and the guided v predictions are blended with a Gaussian weight
//! map: `v = sum(w v_tile) / sum(w)`. Only then are x0, the posterior and the noise computed, on
//! the whole latent, exactly as in the plain sampler. As in the reference, each `w v_tile` product
//! is formed in float64 and added to float32 accumulation buffers.

use crate::diffusion::noise::NoiseSource;
use crate::diffusion::sampler::{
    denoise, DdpmSampler, SampleOptions, SampleOutput, StepProgress, VDenoiser,
};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::f64::consts::PI;

/// Variance of the Gaussian tile weights, relative to the tile size.
const WEIGHT_VARIANCE: f64 = 0.01;

/// Tiling of the canvas sampler, in latent pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tiling {
    /// Tile side (the tile script uses `input_size / 8`, the released VAE's factor: 64 for 512-pixel models).
    pub tile_size: usize,
    /// Overlap between neighbouring tiles (tile script default 32).
    pub tile_overlap: usize,
    /// Tiles denoised per network call (`batch_size_sample`; twice as many rows with CFG).
    /// Tiles are grouped in processing order across columns too (the reference flushes at
    /// the end of each column, an artifact of its loop): the blend adds the tiles in the same
    /// order either way, so only the number of calls changes.
    pub tiles_per_batch: usize,
}

impl Tiling {
    /// Whether a `height x width` latent is sampled whole (it fits one tile) rather than on the
    /// canvas.
    pub fn fits_one_tile(&self, height: usize, width: usize) -> bool {
        height <= self.tile_size && width <= self.tile_size
    }

    /// Tiles of one step on a `height x width` latent: 1 when it fits one tile, else the
    /// canvas's tiles.
    pub fn tile_count(&self, height: usize, width: usize) -> Result<usize> {
        if self.fits_one_tile(height, width) {
            return Ok(1);
        }
        Ok(tile_offsets(height, width, self.tile_size, self.tile_overlap)?.len())
    }

    /// Denoiser calls of one step on a `height x width` latent.
    pub fn calls_per_step(&self, height: usize, width: usize) -> Result<usize> {
        if self.fits_one_tile(height, width) {
            return Ok(1);
        }
        Ok(tile_groups(self.tile_count(height, width)?, self.tiles_per_batch).len())
    }
}

/// The tiles of each denoiser call: consecutive runs of at most `per_batch` of the `count` tiles
/// (`per_batch` 0 counts as 1).
pub fn tile_groups(count: usize, per_batch: usize) -> Vec<std::ops::Range<usize>> {
    let per_batch = per_batch.max(1);
    (0..count)
        .step_by(per_batch)
        .map(|start| start..(start + per_batch).min(count))
        .collect()
}

/// The Gaussian weight map of one tile, `[tile_size * tile_size]` row-major (y, x), in float64.
/// Like the reference, the centre is `(tile - 1) / 2` along the width but `tile / 2` along the
/// height.
pub fn gaussian_weights(tile_size: usize) -> Vec<f64> {
    let n = tile_size as f64;
    let profile = |mid: f64| -> Vec<f64> {
        (0..tile_size)
            .map(|i| {
                let d = i as f64 - mid;
                (-d * d / (n * n) / (2.0 * WEIGHT_VARIANCE)).exp()
                    / (2.0 * PI * WEIGHT_VARIANCE).sqrt()
            })
            .collect()
    };
    let xs = profile((n - 1.0) / 2.0);
    let ys = profile(n / 2.0);
    ys.iter()
        .flat_map(|y| xs.iter().map(move |x| y * x))
        .collect()
}

/// Tile starts along one axis: `k * (tile - overlap)` until the axis is covered, the last one
/// moved to `size - tile`.
fn axis_offsets(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    let stride = tile - overlap;
    let mut count = 0;
    let mut covered = 0;
    while covered < size {
        covered = count * stride + tile;
        count += 1;
    }
    (0..count)
        .map(|k| {
            if k + 1 == count {
                size - tile
            } else {
                k * stride
            }
        })
        .collect()
}

/// `(y0, x0)` of every tile in processing order: outer loop over horizontal positions, inner
/// loop over vertical ones.
pub fn tile_offsets(
    height: usize,
    width: usize,
    tile_size: usize,
    tile_overlap: usize,
) -> Result<Vec<(usize, usize)>> {
    if tile_size == 0 || tile_overlap >= tile_size {
        return Err(Error::Input(format!(
            "tile overlap {tile_overlap} must be smaller than the tile size {tile_size}"
        )));
    }
    if height < tile_size || width < tile_size {
        return Err(Error::Input(format!(
            "latent {height}x{width} is smaller than one {tile_size}x{tile_size} tile; use the plain sampler"
        )));
    }
    let ys = axis_offsets(height, tile_size, tile_overlap);
    let xs = axis_offsets(width, tile_size, tile_overlap);
    Ok(xs
        .iter()
        .flat_map(|&x| ys.iter().map(move |&y| (y, x)))
        .collect())
}

/// One tile of an NCHW tensor.
fn crop(t: &Tensor, (y, x): (usize, usize), tile: usize) -> Result<Tensor> {
    Ok(t.narrow(2, y, tile)?.narrow(3, x, tile)?)
}

/// `buf[tile] = f32(f64(buf[tile]) + add)`: the reference's in-place add of a float64 tensor to
/// a float32 buffer.
fn accumulate(buf: &Tensor, add: &Tensor, (y, x): (usize, usize), tile: usize) -> Result<Tensor> {
    let (b, c, _, _) = buf.dims4()?;
    let region = crop(buf, (y, x), tile)?.to_dtype(DType::F64)?;
    let sum = region.broadcast_add(add)?.to_dtype(DType::F32)?;
    Ok(buf.slice_assign(&[0..b, 0..c, y..y + tile, x..x + tile], &sum)?)
}

/// The canvas sampler: a [`DdpmSampler`] whose v prediction is assembled from tiles.
pub struct CanvasSampler<'a> {
    sampler: &'a DdpmSampler,
    tiling: Tiling,
}

impl<'a> CanvasSampler<'a> {
    pub fn new(sampler: &'a DdpmSampler, tiling: Tiling) -> Result<Self> {
        if tiling.tiles_per_batch == 0 {
            return Err(Error::Input("tiles_per_batch must be at least 1".into()));
        }
        tile_offsets(
            tiling.tile_size,
            tiling.tile_size,
            tiling.tile_size,
            tiling.tile_overlap,
        )?;
        Ok(CanvasSampler { sampler, tiling })
    }

    /// The float64 weight map as a `[1, 1, tile, tile]` tensor.
    fn weight_tensor(&self, device: &Device) -> Result<Tensor> {
        let t = self.tiling.tile_size;
        Ok(Tensor::from_vec(gaussian_weights(t), (1, 1, t, t), device)?)
    }

    /// Full run: draws `x_T` from `init_latent`, then samples (see [`Self::sample_from`]).
    pub fn sample(
        &self,
        denoiser: &mut dyn VDenoiser,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(&StepProgress),
    ) -> Result<SampleOutput> {
        let x_t = self.sampler.start_latent(init_latent, noise)?;
        self.sample_from(x_t, denoiser, init_latent, noise, opts, on_step)
    }

    /// Runs the respaced chain from `x_t` with tiled v predictions.
    pub fn sample_from(
        &self,
        x_t: Tensor,
        denoiser: &mut dyn VDenoiser,
        init_latent: &Tensor,
        noise: &mut dyn NoiseSource,
        opts: &SampleOptions,
        on_step: &mut dyn FnMut(&StepProgress),
    ) -> Result<SampleOutput> {
        if x_t.dims() != init_latent.dims() {
            return Err(Error::Input(format!(
                "x_T shape {:?} differs from the LQ latent shape {:?}",
                x_t.dims(),
                init_latent.dims()
            )));
        }
        let (_, _, h, w) = x_t.dims4()?;
        let tile = self.tiling.tile_size;
        let offsets = tile_offsets(h, w, tile, self.tiling.tile_overlap)?;
        let weights = self.weight_tensor(x_t.device())?;

        // The summed weights are the same at every step.
        let mut contributors = x_t.zeros_like()?;
        for &o in &offsets {
            contributors = accumulate(&contributors, &weights, o, tile)?;
        }

        let groups = tile_groups(offsets.len(), self.tiling.tiles_per_batch);

        self.sampler
            .run_chain(x_t, opts, on_step, noise, &mut |x, t_orig| {
                let mut blended = x.zeros_like()?;
                for group in &groups {
                    let x_tiles = group
                        .clone()
                        .map(|k| crop(x, offsets[k], tile))
                        .collect::<Result<Vec<_>>>()?;
                    let lq_tiles = group
                        .clone()
                        .map(|k| crop(init_latent, offsets[k], tile))
                        .collect::<Result<Vec<_>>>()?;
                    let v = denoise(
                        denoiser,
                        &Tensor::cat(&x_tiles, 0)?,
                        &Tensor::cat(&lq_tiles, 0)?,
                        t_orig,
                        opts.guidance_scale,
                    )?;
                    // Rows of `v` are the group's tiles in order (guidance merged the halves).
                    let per_tile = v.chunk(group.len(), 0)?;
                    for (k, v_tile) in group.clone().zip(&per_tile) {
                        let weighted = v_tile.to_dtype(DType::F64)?.broadcast_mul(&weights)?;
                        blended = accumulate(&blended, &weighted, offsets[k], tile)?;
                    }
                }
                Ok((blended / &contributors)?)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BaseModelConfig;
    use crate::diffusion::noise::SeededNoise;
    use crate::diffusion::sampler::Branches;

    #[test]
    fn tile_groups_cover_every_tile_once_in_order() {
        for count in 0..12 {
            for per_batch in 0..6 {
                let groups = tile_groups(count, per_batch);
                let flat: Vec<usize> = groups.iter().flat_map(|g| g.clone()).collect();
                assert_eq!(flat, (0..count).collect::<Vec<_>>());
                assert!(groups
                    .iter()
                    .all(|g| !g.is_empty() && g.len() <= per_batch.max(1)));
                assert_eq!(groups.len(), count.div_ceil(per_batch.max(1)));
            }
        }
    }

    /// The planned calls per step are the calls the sampler makes, for batches that divide the
    /// tile count and batches that do not.
    #[test]
    fn planned_calls_are_the_sampler_calls() {
        let cfg = BaseModelConfig::default().diffusion;
        let sampler = DdpmSampler::new(&cfg, 2).unwrap();
        for (h, w, tile, overlap) in [(12, 20, 8, 4), (16, 16, 8, 2), (9, 30, 8, 3)] {
            let tiles = tile_offsets(h, w, tile, overlap).unwrap().len();
            for per_batch in [1, 2, 3, tiles, tiles + 5] {
                let tiling = Tiling {
                    tile_size: tile,
                    tile_overlap: overlap,
                    tiles_per_batch: per_batch,
                };
                assert_eq!(tiling.tile_count(h, w).unwrap(), tiles);
                let init = Tensor::zeros((1, 4, h, w), DType::F32, &Device::Cpu).unwrap();
                let mut calls = 0;
                let mut rows = 0;
                let mut denoiser =
                    |x: &Tensor, _: &Tensor, _: usize, _: Branches| -> Result<Tensor> {
                        calls += 1;
                        rows += x.dim(0)?;
                        Ok(x.zeros_like()?)
                    };
                let opts = SampleOptions {
                    guidance_scale: Some(2.0),
                    record_steps: false,
                };
                CanvasSampler::new(&sampler, tiling)
                    .unwrap()
                    .sample(
                        &mut denoiser,
                        &init,
                        &mut SeededNoise::new(0),
                        &opts,
                        &mut |_| {},
                    )
                    .unwrap();
                assert_eq!(calls, 2 * tiling.calls_per_step(h, w).unwrap());
                assert_eq!(rows, 2 * 2 * tiles, "CFG doubles every tile's rows");
            }
        }
        let one = Tiling {
            tile_size: 8,
            tile_overlap: 4,
            tiles_per_batch: 3,
        };
        assert_eq!(one.tile_count(8, 6).unwrap(), 1);
        assert_eq!(one.calls_per_step(8, 6).unwrap(), 1);
    }
}
