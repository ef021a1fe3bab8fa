//! Faces in photos, apart from the restorer (as facexlib is from GFPGAN): detection
//! (RetinaFace), numbering and selection, alignment to the model's crop, paste-back into the
//! upscaled photo, the picture of numbered faces, and the identity embedding (dlib's ResNet) that
//! tells whose face is whose. The restorer sees only aligned crops.
//!
//! The flow of a whole-photo restore: [`retinaface::RetinaFace::detect`] ->
//! [`select::select`] -> [`align::align`] (crop at the model's size, taken from the original
//! photo) -> the restorer on the crops -> [`paste::match_color`] -> [`paste::paste`] onto
//! [`paste::upscale_background`].
//!
//! Conventions shared by every step of this module:
//! * Images are [`crate::imaging::ImageF32`]: interleaved HWC f32, RGB order, values in [0, 1].
//!   Each model converts to its own input format in one tested function (RetinaFace:
//!   [`retinaface::preprocess`], BGR·255 minus the mean).
//! * Coordinates are pixels with OpenCV's convention: the centre of pixel (column x, row y) is at
//!   the integer point (x, y).
//! * Five-point landmarks are ordered left eye, right eye, nose, left mouth corner, right mouth
//!   corner, as RetinaFace emits them; "left" means image left.
//! * Steps are plain functions of their inputs returning values; no step keeps hidden state.

pub mod align;
pub mod boxes;
pub mod draw;
pub mod embed;
pub mod matching;
pub mod paste;
pub mod retinaface;
pub mod select;
