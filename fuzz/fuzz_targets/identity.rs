//! Identity files (safetensors with pfstorer metadata), through the validating loader.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::identity(data));
