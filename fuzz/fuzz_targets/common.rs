//! Shared by the fuzz targets: the readers under test take paths, so each input is written to
//! one scratch file per process first.

use std::path::PathBuf;

pub fn scratch_file(data: &[u8], ext: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("pfstorer-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&path, data).expect("scratch file");
    path
}
