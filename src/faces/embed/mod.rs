//! Face identity descriptors: dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1`,
//! the 128-d descriptor of `dlib.face_recognition_model_v1.compute_face_descriptor`).
//!
//! Input: aligned 150x150 RGB chips ([`ImageF32`], values in [0, 1]; dlib's
//! `get_face_chip(size=150, padding=0.25)` or the matching 5-point template). dlib reads 8-bit
//! pixels, so each value is first quantised to `round(255·v)` (exact for images decoded from
//! 8-bit files), then normalised as dlib's `input_rgb_image_sized<150>`:
//! `(level - mean_c) / 256` with the means [`INPUT_MEAN_RGB`], planar RGB. The network is in
//! [`net`]; descriptors are its raw output (dlib does not normalise them). Two chips show the same
//! person when their descriptors are closer than [`SAME_PERSON_THRESHOLD`] (Euclidean).
//!
//! Weights: `assets/dlib_face_recognition_resnet_v1.safetensors` (converted from the
//! `face-recognition-models` 0.3.0 `.dat` by `scripts/faces/convert_dlib_resnet.py`, CC0),
//! embedded in the library so that [`Embedder::load_embedded`] works offline.

mod net;

pub use net::{add_zero_padded, DESCRIPTOR_DIM};

use crate::error::{Error, Result};
use crate::imaging::ImageF32;
use candle_core::{Device, Tensor};
use std::path::Path;

/// Side of the square input chip (`input_rgb_image_sized<150>`).
pub const CHIP_SIZE: usize = 150;
/// Per-channel means dlib subtracts (red, green, blue; 8-bit levels), as stored in the model's
/// input layer.
pub const INPUT_MEAN_RGB: [f32; 3] = [122.782, 117.001, 104.298];
/// dlib's divisor after subtracting the mean.
const INPUT_SCALE: f32 = 256.0;
/// dlib's decision threshold: descriptors closer than this are the same person.
pub const SAME_PERSON_THRESHOLD: f32 = 0.6;
/// Chips per forward pass (bounds the activations' memory; dlib batches by 16 too).
const MAX_BATCH: usize = 16;

/// The converted weights, embedded.
static EMBEDDED_WEIGHTS: &[u8] =
    include_bytes!("../../../assets/dlib_face_recognition_resnet_v1.safetensors");

/// A 128-d face descriptor.
pub type Descriptor = [f32; DESCRIPTOR_DIM];

/// dlib's face-recognition ResNet, ready to embed chips.
pub struct Embedder {
    net: net::ResNet,
    device: Device,
}

impl Embedder {
    /// The network from the weights embedded in the library.
    pub fn load_embedded(device: &Device) -> Result<Self> {
        Self::from_safetensors_bytes(EMBEDDED_WEIGHTS, device)
    }

    /// The network from a converted safetensors file (f16 or f32; computed in f32).
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_safetensors_bytes(&bytes, device)
    }

    fn from_safetensors_bytes(bytes: &[u8], device: &Device) -> Result<Self> {
        let weights = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| Error::Weights(format!("dlib ResNet safetensors: {e}")))?;
        let net = net::ResNet::from_tensors(&weights, device)?;
        Ok(Embedder {
            net,
            device: device.clone(),
        })
    }

    /// Descriptors of 150x150 RGB chips, in order (see the module doc for the input convention).
    pub fn embed(&self, chips: &[ImageF32]) -> Result<Vec<Descriptor>> {
        let mut descriptors = Vec::with_capacity(chips.len());
        for batch in chips.chunks(MAX_BATCH) {
            let input = chips_to_input(batch, &self.device)?;
            let output = self.forward(&input)?.to_vec2::<f32>()?;
            for row in output {
                let descriptor: Descriptor = row.try_into().map_err(|row: Vec<f32>| {
                    Error::Weights(format!("descriptor of length {}", row.len()))
                })?;
                descriptors.push(descriptor);
            }
        }
        Ok(descriptors)
    }

    /// Descriptors [N, 128] (f32) of an input already normalised as [`chips_to_input`] does,
    /// [N, 3, 150, 150] on the embedder's device.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = input.dims4()?;
        if (channels, height, width) != (3, CHIP_SIZE, CHIP_SIZE) {
            return Err(Error::Input(format!(
                "face embedder input is {:?}, expected [N, 3, {CHIP_SIZE}, {CHIP_SIZE}]",
                input.dims()
            )));
        }
        self.net.forward(input)
    }
}

/// The network input [N, 3, 150, 150] (f32, planar RGB) of the chips: each value quantised to an
/// 8-bit level, minus dlib's channel mean, over 256.
pub fn chips_to_input(chips: &[ImageF32], device: &Device) -> Result<Tensor> {
    let plane = CHIP_SIZE * CHIP_SIZE;
    let mut data = vec![0f32; chips.len() * 3 * plane];
    for (index, chip) in chips.iter().enumerate() {
        if (chip.width, chip.height, chip.channels) != (CHIP_SIZE, CHIP_SIZE, 3) {
            return Err(Error::Input(format!(
                "face chip {index} is {}x{}x{}, expected {CHIP_SIZE}x{CHIP_SIZE}x3 (RGB)",
                chip.width, chip.height, chip.channels
            )));
        }
        let planes = &mut data[index * 3 * plane..(index + 1) * 3 * plane];
        for (pixel, rgb) in chip.data.chunks_exact(3).enumerate() {
            for (c, &value) in rgb.iter().enumerate() {
                let level = (value.clamp(0.0, 1.0) * 255.0).round();
                planes[c * plane + pixel] = (level - INPUT_MEAN_RGB[c]) / INPUT_SCALE;
            }
        }
    }
    Ok(Tensor::from_vec(
        data,
        (chips.len(), 3, CHIP_SIZE, CHIP_SIZE),
        device,
    )?)
}

/// The 150x150 chip of the face at `landmarks` in `img`: the similarity fit onto dlib's chip
/// template (its mean face at padding 0.25), border 0, as the identity fixtures make them.
pub fn chip_at(img: &ImageF32, landmarks: &crate::faces::align::Landmarks) -> Result<ImageF32> {
    use crate::faces::align::{align, Template};
    Ok(align(img, landmarks, &Template::dlib_chip(), &[0.0])?.crop)
}

impl Embedder {
    /// The descriptors of the faces at `landmarks` in `img` ([`chip_at`], then [`Embedder::embed`]).
    pub fn embed_at(
        &self,
        img: &ImageF32,
        landmarks: &[crate::faces::align::Landmarks],
    ) -> Result<Vec<Descriptor>> {
        if landmarks.is_empty() {
            return Ok(Vec::new());
        }
        let chips = landmarks
            .iter()
            .map(|lm| chip_at(img, lm))
            .collect::<Result<Vec<_>>>()?;
        self.embed(&chips)
    }
}

/// Euclidean distance between two descriptors (accumulated in f64, as dlib's `length`).
pub fn descriptor_distance(a: &Descriptor, b: &Descriptor) -> f32 {
    descriptor_distance_slices(a, b)
}

/// [`descriptor_distance`] of descriptors held as slices (stored identities, JSON).
pub fn descriptor_distance_slices(a: &[f32], b: &[f32]) -> f32 {
    let squared: f64 = a
        .iter()
        .zip(b)
        .map(|(p, q)| {
            let d = f64::from(*p) - f64::from(*q);
            d * d
        })
        .sum();
    squared.sqrt() as f32
}

/// Whether two descriptors are closer than dlib's same-person threshold.
pub fn same_person(a: &Descriptor, b: &Descriptor) -> bool {
    descriptor_distance(a, b) < SAME_PERSON_THRESHOLD
}
