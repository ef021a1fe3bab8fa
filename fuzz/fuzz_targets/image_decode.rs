//! Image decoding and the restore pre-processing of one image: decode with a pixel limit, plan
//! the sizes, convert to a tensor, upscale (bicubic, as the reference) and reflect-pad.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::image_decode(data));
