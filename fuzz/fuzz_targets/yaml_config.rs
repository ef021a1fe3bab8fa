//! The model YAML parsers (diffusion and CFW configs), including the `<arch>.json` lookup.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::yaml_config(data));
