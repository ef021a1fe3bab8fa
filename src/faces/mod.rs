//! Faces in photos: detection (RetinaFace), and around it the alignment, paste-back and identity
//! steps of the restore flow.
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

pub mod boxes;
pub mod retinaface;
