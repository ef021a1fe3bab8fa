//! Replays every fuzz seed and every recorded crash input (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz harnesses: each must return without a panic,
//! an abort or unbounded memory. Fuzzing itself is not part of `cargo test`; see the README.

#[path = "../fuzz/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};

fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        let dir = root.join(dir).join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs for fuzz target {target}");
    files
}

fn replay(target: &str, harness: fn(&[u8])) {
    for path in inputs(target) {
        println!("{target}: {}", path.display());
        harness(&std::fs::read(&path).unwrap());
    }
}

#[test]
fn image_decode_inputs() {
    replay("image_decode", harness::image_decode);
}

#[test]
fn checkpoint_inputs() {
    replay("checkpoint", harness::checkpoint);
}

#[test]
fn identity_inputs() {
    replay("identity", harness::identity);
}

#[test]
fn yaml_config_inputs() {
    replay("yaml_config", harness::yaml_config);
}
