//! The base-model fingerprint is cached per (path, size, mtime) in the data directory, so a
//! restore with `--id` does not re-hash a 5 GB checkpoint every run; a changed file is re-hashed.
//! (Own test binary: it sets PFSTORER_HOME for the process.)

mod common;

use pfstorer::weights::TensorStore;
use pfstorer::weights::{base_fingerprint, base_fingerprint_cached};
use std::time::{Duration, SystemTime};

#[test]
fn fingerprint_cache_hits_and_invalidates_on_change() {
    let root = common::scratch("fp");
    std::env::set_var("PFSTORER_HOME", root.join("home"));
    let model = root.join("model.safetensors");
    std::fs::copy(common::fixture("stablesr/model.safetensors"), &model).unwrap();

    let direct = base_fingerprint(&TensorStore::open(&model).unwrap()).unwrap();
    let cached = base_fingerprint_cached(&model).unwrap();
    assert_eq!(cached, direct);
    let cache_file = root.join("home/fingerprints.json");
    let text = std::fs::read_to_string(&cache_file).expect("cache written");
    assert!(text.contains(&direct), "{text}");

    // A hit is served from the cache: plant a marker value and read it back.
    let planted = text.replace(&direct, "planted-value");
    std::fs::write(&cache_file, planted).unwrap();
    assert_eq!(base_fingerprint_cached(&model).unwrap(), "planted-value");

    // A new modification time is a miss: the real hash again, and the cache is updated.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(file);
    assert_eq!(base_fingerprint_cached(&model).unwrap(), direct);

    // An unreadable cache is only a miss.
    std::fs::write(&cache_file, "not json").unwrap();
    assert_eq!(base_fingerprint_cached(&model).unwrap(), direct);
    let _ = std::fs::remove_dir_all(&root);
}
