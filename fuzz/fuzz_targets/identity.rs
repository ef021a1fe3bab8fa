//! Identity files (safetensors with pfstorer metadata), through the validating loader.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use pfstorer::personalize::identity::Identity;

fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file(data, "identity.safetensors");
    if let Ok(identity) = Identity::load_file(&path) {
        let _ = identity.hosts();
        let _ = identity.reference_count();
        let _ = identity.optimizer_state();
        let _ = identity.check_base("0");
    }
});
