//! Face work around the restorer: identity descriptors ([`embed`]).
//!
//! Conventions of every module here: images are [`crate::imaging::ImageF32`] (interleaved HWC
//! f32, RGB order, values in [0, 1]); landmarks are ordered left eye, right eye, nose, left mouth
//! corner, right mouth corner (as RetinaFace emits them, image left/right); coordinates are pixels
//! with OpenCV's convention (pixel centre at integer coordinates). Steps are plain functions of
//! their inputs returning values.

pub mod embed;
