//! Faces: alignment to a template, the restorer on the aligned crop, paste-back (facexlib's
//! `FaceRestoreHelper` split into plain functions of their inputs, with no hidden state).
//!
//! Conventions for every file here: images are [`crate::imaging::ImageF32`] (interleaved HWC
//! f32, RGB order, values in [0, 1]); the 5 landmarks are left eye, right eye, nose, left mouth
//! corner, right mouth corner (as RetinaFace emits them, image left/right); coordinates are
//! pixels with OpenCV's convention (pixel centres at integer coordinates).

pub mod align;
pub mod paste;
