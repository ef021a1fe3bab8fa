//! The checkpoint reader (torch zip + pickle, or safetensors) and every stored tensor loaded
//! through the checked weight loader, as a model build does.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::checkpoint(data));
