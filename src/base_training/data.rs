//! The face data set of base training: HQ images from folders, an order per epoch, and each
//! sample's augmentation and synthetic LQ, all drawn from generators seeded by
//! `(seed, epoch, position)`, so that any rank, any batch split and any resumed run see the same
//! samples.

use crate::degrade::{degrade_image, Preset};
use crate::error::{Error, Result};
use crate::imaging::io::{has_image_extension, load_image};
use crate::imaging::resize::{resize_torch, TorchInterp};
use crate::imaging::ImageF32;
use crate::seeds::{mix64, GOLDEN};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Images with a side below this are skipped as tiny.
pub const MIN_SIDE: usize = 64;
/// Folder depth searched below each data folder (FFHQ nests one level).
const MAX_DEPTH: usize = 8;

/// The usable images of the data folders, sorted, and what was skipped with the reason.
#[derive(Debug, Clone)]
pub struct FaceDataset {
    pub folders: Vec<PathBuf>,
    pub files: Vec<PathBuf>,
    pub skipped: Vec<(PathBuf, String)>,
}

impl FaceDataset {
    /// Lists every file below `folders` and keeps the images whose header decodes with both
    /// sides at least [`MIN_SIDE`]; the rest is recorded in `skipped`. An unreadable folder or
    /// no usable image at all is an error.
    pub fn scan(folders: &[PathBuf]) -> Result<Self> {
        if folders.is_empty() {
            return Err(Error::Input("--data: give at least one folder".into()));
        }
        let mut seen = BTreeSet::new();
        let mut all = Vec::new();
        for folder in folders {
            if !folder.is_dir() {
                return Err(Error::Input(format!(
                    "--data {}: not a folder",
                    crate::fsutil::printable_path(folder)
                )));
            }
            walk(folder, 0, &mut seen, &mut all)?;
        }
        let mut files = Vec::new();
        let mut skipped = Vec::new();
        for path in all {
            match check_image(&path) {
                Ok(()) => files.push(path),
                Err(why) => skipped.push((path, why)),
            }
        }
        if files.is_empty() {
            let names: Vec<String> = folders
                .iter()
                .map(|f| crate::fsutil::printable_path(f))
                .collect();
            return Err(Error::Input(format!(
                "--data {}: no usable images ({} files skipped)",
                names.join(", "),
                skipped.len()
            )));
        }
        Ok(FaceDataset {
            folders: folders.to_vec(),
            files,
            skipped,
        })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// One line on the skipped files (count and the first few names), or `None`.
    pub fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        const SHOWN: usize = 5;
        let parts: Vec<String> = self
            .skipped
            .iter()
            .take(SHOWN)
            .map(|(p, why)| format!("{} ({why})", crate::fsutil::printable_path(p)))
            .collect();
        let more = self.skipped.len().saturating_sub(SHOWN);
        Some(format!(
            "{} files skipped: {}{}",
            self.skipped.len(),
            parts.join(", "),
            if more > 0 {
                format!(", and {more} more")
            } else {
                String::new()
            }
        ))
    }
}

fn walk(
    dir: &Path,
    depth: usize,
    seen: &mut BTreeSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    // Canonical paths guard against symlink loops and folders given twice.
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) || depth > MAX_DEPTH {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, depth + 1, seen, out)?;
        } else if path.is_file() {
            let canonical = path.canonicalize().unwrap_or_else(|_| path.clone());
            if seen.insert(canonical) {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// Why `path` cannot be a training image, from its name and header alone (cheap for 70,000
/// files; a body that fails to decode later is skipped then).
fn check_image(path: &Path) -> std::result::Result<(), String> {
    if !has_image_extension(path) {
        return Err("not an image".into());
    }
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("unreadable: {e}"))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("unreadable: {e}"))?;
    if (w as usize) < MIN_SIDE || (h as usize) < MIN_SIDE {
        return Err(format!("tiny: {w}x{h}"));
    }
    Ok(())
}

/// The generator of one sample's draws.
pub fn sample_rng(seed: u64, epoch: usize, position: usize) -> StdRng {
    let z = seed
        ^ mix64((epoch as u64).wrapping_mul(GOLDEN) ^ 0xE90C)
        ^ (position as u64).wrapping_mul(GOLDEN);
    StdRng::seed_from_u64(mix64(z))
}

/// The order of the data set in `epoch` (a Fisher-Yates shuffle seeded by seed and epoch).
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = StdRng::seed_from_u64(mix64(seed ^ mix64(epoch as u64 ^ 0x0DE5)));
    let mut order: Vec<usize> = (0..len).collect();
    for i in (1..len).rev() {
        order.swap(i, rng.gen_range(0..=i));
    }
    order
}

/// How the samples of an epoch are split into steps, micro-batches and ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sharding {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub world_size: usize,
}

impl Sharding {
    /// Samples one update consumes across all ranks.
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.grad_accum * self.world_size
    }

    /// Whole steps in an epoch of `len` samples (the remainder of the shuffled order is left
    /// for that epoch, as a sampler with `drop_last` does).
    pub fn steps_per_epoch(&self, len: usize) -> usize {
        len / self.global_batch()
    }

    /// Positions (into the epoch order) of `rank`'s samples in micro-batch `micro` of step
    /// `step_in_epoch`: ranks take consecutive slices of each micro-batch, so the union over
    /// ranks is the micro-batch one rank with `world_size` times the batch would take.
    pub fn positions(&self, step_in_epoch: usize, micro: usize, rank: usize) -> Vec<usize> {
        let start = step_in_epoch * self.global_batch()
            + micro * self.batch_size * self.world_size
            + rank * self.batch_size;
        (start..start + self.batch_size).collect()
    }
}

/// The sample settings of the recipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleRecipe {
    /// Square training size in pixels.
    pub size: usize,
    /// Probability that the HQ image itself is the LQ input.
    pub p_hq: f64,
}

/// An HQ/LQ pair ready for the VAE, and the generator its later draws (posterior and
/// diffusion noise, timestep) continue from.
pub struct PreparedSample {
    pub hq: ImageF32,
    pub lq: ImageF32,
    pub rng: StdRng,
}

/// With probability 0.5 the whole image resized to `size`², else a random `size`² crop (an
/// image smaller than that is first resized so its short side is `size`); then a horizontal
/// flip with probability 0.5; the LQ is the heavy degradation of the result at the same size,
/// or with probability `p_hq` the HQ itself.
pub fn prepare_sample(
    img: &ImageF32,
    recipe: &SampleRecipe,
    mut rng: StdRng,
) -> Result<PreparedSample> {
    if img.channels != 3 {
        return Err(Error::Input(format!(
            "training image with {} channels (RGB expected)",
            img.channels
        )));
    }
    let size = recipe.size;
    let hq = if rng.gen_bool(0.5) {
        resize_torch(img, size, size, TorchInterp::Bicubic)?
    } else {
        let short = img.width.min(img.height);
        let scaled = if short < size {
            let (w, h) = (
                (img.width * size).div_ceil(short).max(size),
                (img.height * size).div_ceil(short).max(size),
            );
            resize_torch(img, w, h, TorchInterp::Bicubic)?
        } else {
            img.clone()
        };
        let x0 = rng.gen_range(0..=scaled.width - size);
        let y0 = rng.gen_range(0..=scaled.height - size);
        scaled.crop_square(x0, y0, size)
    };
    let mut hq = if rng.gen_bool(0.5) { hflip(&hq) } else { hq };
    hq.data.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
    let lq = if rng.gen_bool(recipe.p_hq) {
        hq.clone()
    } else {
        let seed: u64 = rng.gen();
        degrade_image(&hq, Preset::Heavy, seed)?.0
    };
    Ok(PreparedSample { hq, lq, rng })
}

fn hflip(img: &ImageF32) -> ImageF32 {
    let c = img.channels;
    let mut data = Vec::with_capacity(img.data.len());
    for y in 0..img.height {
        for x in (0..img.width).rev() {
            let at = (y * img.width + x) * c;
            data.extend_from_slice(&img.data[at..at + c]);
        }
    }
    ImageF32::new(img.width, img.height, c, data)
}

/// Loads image `index` of `files` as RGB in [0, 1].
pub fn load_rgb(path: &Path) -> Result<ImageF32> {
    Ok(load_image(path)?.rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_each_step_once_and_match_a_single_rank() {
        let dp = Sharding {
            batch_size: 2,
            grad_accum: 3,
            world_size: 4,
        };
        let single = Sharding {
            batch_size: 8,
            grad_accum: 3,
            world_size: 1,
        };
        assert_eq!(dp.global_batch(), 24);
        assert_eq!(dp.steps_per_epoch(100), 4);
        for step in 0..dp.steps_per_epoch(100) {
            let mut all = Vec::new();
            for micro in 0..3 {
                let mut union: Vec<usize> =
                    (0..4).flat_map(|r| dp.positions(step, micro, r)).collect();
                assert_eq!(union, single.positions(step, micro, 0));
                all.append(&mut union);
            }
            let expected: Vec<usize> = (step * 24..(step + 1) * 24).collect();
            all.sort();
            assert_eq!(all, expected, "step {step}: disjoint and complete");
        }
    }

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch_and_repeat_by_seed() {
        let a = epoch_order(50, 7, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 7, 0));
        assert_ne!(a, epoch_order(50, 7, 1));
        assert_ne!(a, epoch_order(50, 8, 0));
    }

    #[test]
    fn samples_are_square_in_range_and_deterministic() {
        let w = 90;
        let h = 70;
        let data: Vec<f32> = (0..w * h * 3).map(|i| (i % 97) as f32 / 96.0).collect();
        let img = ImageF32::new(w, h, 3, data);
        let recipe = SampleRecipe {
            size: 64,
            p_hq: 0.5,
        };
        let mut kinds = BTreeSet::new();
        for position in 0..12 {
            let a = prepare_sample(&img, &recipe, sample_rng(3, 0, position)).unwrap();
            let b = prepare_sample(&img, &recipe, sample_rng(3, 0, position)).unwrap();
            assert_eq!(a.hq, b.hq);
            assert_eq!(a.lq, b.lq);
            assert_eq!(
                (a.hq.width, a.hq.height, a.lq.width, a.lq.height),
                (64, 64, 64, 64)
            );
            assert!(a.hq.data.iter().all(|v| (0.0..=1.0).contains(v)));
            kinds.insert(a.hq == a.lq);
        }
        assert_eq!(kinds.len(), 2, "p_hq 0.5 gives both HQ and degraded inputs");
        // A small image is scaled up before the crop.
        let small = ImageF32::new(40, 30, 3, vec![0.5; 40 * 30 * 3]);
        let s = prepare_sample(&small, &recipe, sample_rng(1, 2, 3)).unwrap();
        assert_eq!((s.hq.width, s.hq.height), (64, 64));
    }

    #[test]
    fn flip_and_crop_move_the_right_pixels() {
        let img = ImageF32::new(3, 2, 3, (0..18).map(|v| v as f32).collect());
        let f = hflip(&img);
        assert_eq!(&f.data[0..3], &img.data[6..9]);
        let c = img.crop_square(1, 0, 2);
        assert_eq!(&c.data[0..3], &img.data[3..6]);
        assert_eq!(&c.data[6..9], &img.data[12..15]);
    }
}
