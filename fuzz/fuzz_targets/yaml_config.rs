//! The model YAML parsers (diffusion and CFW configs), including the `<arch>.json` lookup.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use pfstorer::config::{BaseModelConfig, CfwConfig};

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "yaml");
    let _ = BaseModelConfig::from_yaml_file(&path);
    let _ = CfwConfig::from_yaml_file(&path);
});
