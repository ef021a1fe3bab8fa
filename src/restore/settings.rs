//! What a restoration is asked to do: output size, sampling settings and limits, and the plan of
//! sizes one image goes through, checked before any compute.

use crate::diffusion::canvas::Tiling;
use crate::diffusion::sampler::Branches;
use crate::error::{Error, Result};
use crate::imaging::colorfix::ColorFix;
use crate::imaging::patches::patches;

/// How large the output should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetSize {
    /// Multiply both sides (fractional allowed).
    Scale(f64),
    /// Exact width and height.
    Size(usize, usize),
    /// Longest side in pixels, aspect kept.
    LongSide(usize),
}

impl TargetSize {
    /// Output `(width, height)` for an input of `width x height` (sizes truncate like the
    /// reference's `int()`).
    pub fn output_size(&self, width: usize, height: usize) -> Result<(usize, usize)> {
        let (w, h) = match *self {
            TargetSize::Scale(s) => {
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::Input(format!(
                        "--scale {s}: must be a positive number"
                    )));
                }
                ((width as f64 * s) as usize, (height as f64 * s) as usize)
            }
            TargetSize::Size(w, h) => (w, h),
            TargetSize::LongSide(n) => {
                let s = n as f64 / width.max(height) as f64;
                (
                    (width as f64 * s).round() as usize,
                    (height as f64 * s).round() as usize,
                )
            }
        };
        if w == 0 || h == 0 {
            return Err(Error::Input(format!("output size {w}x{h} is empty")));
        }
        Ok((w, h))
    }
}

/// Sampling and post-processing settings, with the defaults of `pfstorer restore`.
#[derive(Debug, Clone)]
pub struct RestoreSettings {
    pub steps: usize,
    /// Classifier-free guidance scale (paper Eq. 9); 1 disables the negative branch.
    pub guidance: f64,
    pub seed: u64,
    /// CFW fusion weight of the decoder.
    pub dec_w: f64,
    pub color_fix: ColorFix,
    /// Overlap of latent tiles, in latents; `None`: [`default_tile_overlap`] of the tile.
    pub tile_overlap: Option<usize>,
    /// Pixel patch size and stride above which an image is processed in patches.
    pub patch_size: usize,
    pub patch_stride: usize,
    /// The model's native image size in pixels (short sides below it are processed at it, and
    /// latent tiles are this size over the VAE's downsampling factor); `None` takes
    /// `image_size` of the diffusion config.
    pub native_size: Option<usize>,
    /// Largest image, in pixels, processed at once (after upscaling and padding); larger
    /// requests are refused before any compute. Bounds the image buffers (about
    /// [`BYTES_PER_PROCESSED_PIXEL`] each pixel); the networks' memory is bounded by the patch
    /// size.
    pub max_pixels: usize,
    /// Latent tiles per UNet call (`--tile-batch`); `None` chooses from the device (see
    /// [`auto_tile_batch`]).
    pub tile_batch: Option<usize>,
}

/// Default of [`RestoreSettings::max_pixels`]: 64 megapixels (e.g. 8192x8192, a 4x upscale
/// of a 2048x2048 photo).
pub const DEFAULT_MAX_PIXELS: usize = 64_000_000;

/// Image buffers held per processed pixel: the upscaled and padded input, the patch blender's
/// sum and weights, the result and its crops (f32 RGB, 12 bytes each).
pub const BYTES_PER_PROCESSED_PIXEL: usize = 96;

/// Largest native size (`--input-size`, `image_size`) accepted: the released model's is 512,
/// and one latent tile of this size is what every UNet call holds.
pub const MAX_NATIVE_SIZE: usize = 2048;

/// Refuses a native size (`--input-size` or the config's `image_size`) outside 1..=
/// [`MAX_NATIVE_SIZE`].
pub fn check_native_size(native: usize) -> Result<()> {
    if native == 0 || native > MAX_NATIVE_SIZE {
        return Err(Error::Input(format!(
            "--input-size {native}: must be between 1 and {MAX_NATIVE_SIZE} pixels (the released model's is 512)"
        )));
    }
    Ok(())
}

/// The sizes one image goes through, known before any compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestorePlan {
    pub out_w: usize,
    pub out_h: usize,
    /// The size it is processed at (short side at least the native size).
    pub proc_w: usize,
    pub proc_h: usize,
    /// `proc` padded to a multiple of 32.
    pub padded_w: usize,
    pub padded_h: usize,
    /// Pixel patches (1 when the padded image fits one patch).
    pub patches: usize,
    /// Size of each patch (all patches have it; the padded size when there is one).
    pub patch_w: usize,
    pub patch_h: usize,
}

/// The sampling work of one image: what the UNet will be asked to do, from the same plan,
/// tiling and grouping the samplers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplingWork {
    pub patches: usize,
    /// Latent tiles of each patch at every step (1 when its latent fits one tile).
    pub tiles_per_patch: usize,
    pub steps: usize,
    /// UNet rows per tile: 2 with classifier-free guidance, 1 without.
    pub rows_per_tile: usize,
    /// Most tiles in one UNet call.
    pub tiles_per_batch: usize,
    /// UNet calls of the whole image.
    pub unet_calls: usize,
}

impl SamplingWork {
    /// Tile denoisings of the whole image: patches x tiles x steps.
    pub fn tile_steps(&self) -> usize {
        self.patches * self.tiles_per_patch * self.steps
    }

    /// UNet batch rows of the whole image (tile steps, twice with CFG).
    pub fn unet_rows(&self) -> usize {
        self.tile_steps() * self.rows_per_tile
    }

    /// Sampling steps the progress counts: steps of every patch.
    pub fn total_steps(&self) -> usize {
        self.patches * self.steps
    }
}

impl std::fmt::Display for SamplingWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural =
            |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
        write!(
            f,
            "{} x {} x {} = {} UNet passes{}, in {} of up to {}",
            plural(self.patches, "patch", "patches"),
            plural(self.tiles_per_patch, "latent tile", "latent tiles"),
            plural(self.steps, "step", "steps"),
            self.unet_rows(),
            if self.rows_per_tile == 2 {
                " (x2 for CFG)"
            } else {
                ""
            },
            plural(self.unet_calls, "UNet call", "UNet calls"),
            plural(self.tiles_per_batch, "tile", "tiles"),
        )
    }
}

/// A conservative estimate of the memory one UNet batch row of a `tile x tile` latent holds at
/// its peak: this many full-resolution feature maps of `model_channels` in f32 (skip
/// connections, GroupNorm and SPADE intermediates, the transformer's 8x-wide GEGLU projection
/// and attention's query chunk all live at the first level, the widest one).
pub const FEATURE_MAPS_PER_ROW: usize = 64;

/// Most tiles one UNet call takes when free memory decides: larger batches no longer shorten a
/// GPU's step much, and a tile canvas is rarely that much wider.
pub const MAX_AUTO_TILE_BATCH: usize = 8;

/// Estimated peak bytes of one UNet batch row at a `tile x tile` latent.
pub fn bytes_per_unet_row(model_channels: usize, tile: usize) -> u64 {
    (FEATURE_MAPS_PER_ROW * model_channels * tile * tile * 4) as u64
}

/// The latent tile overlap when none is given: the tile script's 32 for the released model's
/// 64-latent tiles, half the tile for smaller ones (`--input-size` below 512), so the default
/// works at every native size.
pub fn default_tile_overlap(tile: usize) -> usize {
    32.min(tile / 2)
}

/// Tiles per UNet call: 1 without a free-memory figure (the CPU, where batching does not pay),
/// else as many as half the free memory holds at `row_bytes` per row and `rows_per_tile` rows
/// per tile, between 1 and [`MAX_AUTO_TILE_BATCH`]. Half, because the allocator fragments and
/// cuBLAS takes workspace on top of the estimate.
pub fn auto_tile_batch(free_bytes: Option<u64>, row_bytes: u64, rows_per_tile: usize) -> usize {
    let Some(free) = free_bytes else {
        return 1;
    };
    let per_tile = row_bytes.max(1) * rows_per_tile.max(1) as u64;
    ((free / 2 / per_tile) as usize).clamp(1, MAX_AUTO_TILE_BATCH)
}

impl RestoreSettings {
    /// The sizes of restoring a `width x height` image to `target` with the model's native
    /// size `native`, or why it cannot be done within [`RestoreSettings::max_pixels`].
    pub fn plan(
        &self,
        native: usize,
        width: usize,
        height: usize,
        target: TargetSize,
    ) -> Result<RestorePlan> {
        let native = self.native_size.unwrap_or(native);
        check_native_size(native)?;
        let (out_w, out_h) = target.output_size(width, height)?;
        let up = (native as f64 / out_w.min(out_h) as f64).max(1.0);
        let (proc_w, proc_h) = ((out_w as f64 * up) as usize, (out_h as f64 * up) as usize);
        let (padded_w, padded_h) = (proc_w.div_ceil(32) * 32, proc_h.div_ceil(32) * 32);
        let pixels = (padded_w as u128) * (padded_h as u128);
        if pixels > self.max_pixels as u128 {
            return Err(Error::Input(format!(
                "restoring to {out_w}x{out_h} means processing {padded_w}x{padded_h} pixels ({:.0} MP, about {:.1} GB of image buffers), more than the limit of {:.0} MP; lower --scale/--size/--long-side or raise --max-megapixels",
                pixels as f64 / 1e6,
                pixels as f64 * BYTES_PER_PROCESSED_PIXEL as f64 / 1e9,
                self.max_pixels as f64 / 1e6
            )));
        }
        let (patches, patch_w, patch_h) =
            if padded_w <= self.patch_size && padded_h <= self.patch_size {
                (1, padded_w, padded_h)
            } else {
                let all = patches(padded_h, padded_w, self.patch_size, self.patch_stride);
                (all.len(), all[0].w, all[0].h)
            };
        Ok(RestorePlan {
            out_w,
            out_h,
            proc_w,
            proc_h,
            padded_w,
            padded_h,
            patches,
            patch_w,
            patch_h,
        })
    }

    /// The sampling work of `plan` with latent tiles `tiling` and `latent_factor` pixels a
    /// latent, counted with the tiling's own functions (the ones the samplers use).
    pub fn work(
        &self,
        plan: &RestorePlan,
        latent_factor: usize,
        tiling: &Tiling,
    ) -> Result<SamplingWork> {
        let (lh, lw) = (plan.patch_h / latent_factor, plan.patch_w / latent_factor);
        let calls_per_step = tiling.calls_per_step(lh, lw)?;
        Ok(SamplingWork {
            patches: plan.patches,
            tiles_per_patch: tiling.tile_count(lh, lw)?,
            steps: self.steps,
            rows_per_tile: match Branches::for_guidance(Some(self.guidance)) {
                Branches::Cond => 1,
                Branches::UncondCond => 2,
            },
            tiles_per_batch: if tiling.fits_one_tile(lh, lw) {
                1
            } else {
                tiling.tiles_per_batch
            },
            unet_calls: plan.patches * calls_per_step * self.steps,
        })
    }

    /// Refuses values no restoration can use: non-finite or out-of-range scalars.
    pub fn validate(&self) -> Result<()> {
        if !(self.guidance.is_finite() && (0.0..=100.0).contains(&self.guidance)) {
            return Err(Error::Input(format!(
                "--cfg {}: must be a number between 0 and 100 (1 turns guidance off)",
                self.guidance
            )));
        }
        if !(self.dec_w.is_finite() && (0.0..=1.0).contains(&self.dec_w)) {
            return Err(Error::Input(format!(
                "--dec-w {}: must be between 0 and 1",
                self.dec_w
            )));
        }
        if self.max_pixels == 0 {
            return Err(Error::Input("--max-megapixels: must be positive".into()));
        }
        if self.tile_batch == Some(0) {
            return Err(Error::Input(
                "--tile-batch 0: must be at least 1 tile per UNet call".into(),
            ));
        }
        Ok(())
    }
}

impl Default for RestoreSettings {
    fn default() -> Self {
        RestoreSettings {
            steps: 200,
            guidance: 4.0,
            seed: 42,
            dec_w: 0.5,
            color_fix: ColorFix::Adain,
            tile_overlap: None,
            patch_size: 1280,
            patch_stride: 1000,
            native_size: None,
            max_pixels: DEFAULT_MAX_PIXELS,
            tile_batch: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_sizes() {
        assert_eq!(
            TargetSize::Scale(4.0).output_size(32, 24).unwrap(),
            (128, 96)
        );
        // Fractional scales truncate like the reference's int().
        assert_eq!(
            TargetSize::Scale(2.5).output_size(33, 21).unwrap(),
            (82, 52)
        );
        assert_eq!(
            TargetSize::Size(2048, 1536).output_size(10, 10).unwrap(),
            (2048, 1536)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(400, 300).unwrap(),
            (1000, 750)
        );
        assert_eq!(
            TargetSize::LongSide(1000).output_size(300, 400).unwrap(),
            (750, 1000)
        );
        assert!(TargetSize::Scale(0.0).output_size(32, 24).is_err());
        assert!(TargetSize::Scale(f64::NAN).output_size(32, 24).is_err());
        assert!(
            TargetSize::Scale(0.01).output_size(32, 24).is_err(),
            "empty output"
        );
    }

    /// Windows of `size` every `stride` along `n` until one reaches the end (the last one
    /// moved back to end there), counted by walking them.
    fn walk_windows(n: usize, size: usize, stride: usize) -> usize {
        if n <= size {
            return 1;
        }
        let mut starts = std::collections::BTreeSet::new();
        let mut start = 0;
        loop {
            starts.insert(start.min(n - size));
            if start + size >= n {
                break;
            }
            start += stride;
        }
        starts.len()
    }

    #[test]
    fn default_tile_overlap_is_the_tile_scripts_or_half_a_small_tile() {
        assert_eq!(default_tile_overlap(64), 32, "the released model's tiles");
        assert_eq!(default_tile_overlap(160), 32);
        assert_eq!(default_tile_overlap(8), 4, "--input-size 64");
        assert_eq!(default_tile_overlap(1), 0);
    }

    #[test]
    fn work_of_the_readme_first_command() {
        // `pfstorer restore old_photo.jpg` on a 512 px photo with the released model's sizes:
        // 2048 px out, 4 patches of 1280 px, each a 160-latent canvas of 4x4 64-latent tiles.
        let settings = RestoreSettings::default();
        let plan = settings
            .plan(512, 512, 512, TargetSize::Scale(4.0))
            .unwrap();
        let tiling = Tiling {
            tile_size: 64,
            tile_overlap: 32,
            tiles_per_batch: 1,
        };
        let work = settings.work(&plan, 8, &tiling).unwrap();
        assert_eq!((plan.patches, plan.patch_w, plan.patch_h), (4, 1280, 1280));
        assert_eq!(work.tiles_per_patch, 16);
        assert_eq!(work.tile_steps(), 4 * 16 * 200);
        assert_eq!(work.unet_rows(), 2 * 4 * 16 * 200);
        assert_eq!(work.unet_calls, 4 * 16 * 200);
        assert_eq!(work.total_steps(), 800);
        assert_eq!(
            work.to_string(),
            "4 patches x 16 latent tiles x 200 steps = 25600 UNet passes (x2 for CFG), in 12800 UNet calls of up to 1 tile"
        );
        let batched = Tiling {
            tiles_per_batch: 3,
            ..tiling
        };
        let work = settings.work(&plan, 8, &batched).unwrap();
        assert_eq!(
            work.unet_calls,
            4 * 6 * 200,
            "16 tiles in calls of 3: 6 calls"
        );
        // Without guidance every tile is one row.
        let no_cfg = RestoreSettings {
            guidance: 1.0,
            steps: 50,
            ..settings
        };
        let work = no_cfg.work(&plan, 8, &tiling).unwrap();
        assert_eq!(work.unet_rows(), 4 * 16 * 50);
        assert!(!work.to_string().contains("CFG"));
    }

    /// The plan's counts against windows walked one by one, over sizes that hit one tile, one
    /// patch, several patches and clamped last windows.
    #[test]
    fn work_counts_match_a_direct_count() {
        let sizes = [
            (20, 16),
            (128, 128),
            (100, 300),
            (333, 77),
            (700, 500),
            (64, 1000),
        ];
        let targets = [
            TargetSize::Scale(1.0),
            TargetSize::Scale(2.5),
            TargetSize::LongSide(1500),
        ];
        for (native, factor, overlap, patch, stride, per_batch) in [
            (512, 8, 32, 1280, 1000, 1),
            (64, 4, 8, 128, 100, 3),
            (256, 8, 4, 640, 320, 4),
        ] {
            let tile = native / factor;
            let settings = RestoreSettings {
                steps: 7,
                patch_size: patch,
                patch_stride: stride,
                tile_overlap: Some(overlap),
                native_size: Some(native),
                ..RestoreSettings::default()
            };
            let tiling = Tiling {
                tile_size: tile,
                tile_overlap: overlap,
                tiles_per_batch: per_batch,
            };
            for &(w, h) in &sizes {
                for target in targets {
                    let plan = settings.plan(native, w, h, target).unwrap();
                    let work = settings.work(&plan, factor, &tiling).unwrap();
                    let patches = walk_windows(plan.padded_w, patch, stride)
                        * walk_windows(plan.padded_h, patch, stride);
                    let (pw, ph) = (plan.padded_w.min(patch), plan.padded_h.min(patch));
                    let (lw, lh) = (pw / factor, ph / factor);
                    let tiles = walk_windows(lw, tile, tile - overlap)
                        * walk_windows(lh, tile, tile - overlap);
                    let calls = if tiles == 1 {
                        1
                    } else {
                        tiles.div_ceil(per_batch)
                    };
                    let case = format!("{w}x{h} {target:?} native {native} patch {patch}");
                    assert_eq!(work.patches, patches, "{case}");
                    assert_eq!(work.tiles_per_patch, tiles, "{case}");
                    assert_eq!(work.unet_calls, patches * calls * 7, "{case}");
                    assert_eq!(work.unet_rows(), 2 * patches * tiles * 7, "{case}");
                }
            }
        }
    }

    #[test]
    fn tile_batch_follows_free_memory() {
        let row = bytes_per_unet_row(320, 64);
        assert_eq!(row, 64 * 320 * 64 * 64 * 4);
        assert_eq!(
            auto_tile_batch(None, row, 2),
            1,
            "no figure (CPU): one tile"
        );
        assert_eq!(auto_tile_batch(Some(0), row, 2), 1, "never below one");
        // Half the free memory, two rows a tile.
        assert_eq!(auto_tile_batch(Some(2 * 2 * 3 * row), row, 2), 3);
        assert_eq!(auto_tile_batch(Some(2 * 2 * 3 * row - 1), row, 2), 2);
        assert_eq!(auto_tile_batch(Some(2 * 3 * row), row, 1), 3);
        assert_eq!(
            auto_tile_batch(Some(140_000_000_000), row, 2),
            MAX_AUTO_TILE_BATCH
        );
        let e = RestoreSettings {
            tile_batch: Some(0),
            ..RestoreSettings::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("--tile-batch 0"), "{e}");
    }
}
