//! Image work before and after the model: loading/saving, resizing, colour correction.

pub mod colorfix;
pub mod filter;
pub mod io;
pub mod patches;
pub mod resize;
pub mod tensor;
pub mod warp;

/// An interleaved (HWC) float image, values nominally in [0, 1], channels in RGB order
/// (1 = gray, 3 = RGB, 4 = RGBA).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageF32 {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl ImageF32 {
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            width * height * channels,
            "ImageF32 size mismatch"
        );
        ImageF32 {
            width,
            height,
            channels,
            data,
        }
    }

    /// The `side` x `side` square whose top-left pixel is `(x0, y0)` (must lie inside).
    pub fn crop_square(&self, x0: usize, y0: usize, side: usize) -> Self {
        let c = self.channels;
        let mut data = Vec::with_capacity(side * side * c);
        for y in y0..y0 + side {
            let row = (y * self.width + x0) * c;
            data.extend_from_slice(&self.data[row..row + side * c]);
        }
        Self::new(side, side, c, data)
    }

    pub fn zeros(width: usize, height: usize, channels: usize) -> Self {
        Self::new(
            width,
            height,
            channels,
            vec![0.0; width * height * channels],
        )
    }

    #[inline]
    pub fn at(&self, x: usize, y: usize, c: usize) -> f32 {
        self.data[(y * self.width + x) * self.channels + c]
    }

    #[inline]
    pub fn at_mut(&mut self, x: usize, y: usize, c: usize) -> &mut f32 {
        &mut self.data[(y * self.width + x) * self.channels + c]
    }
}
