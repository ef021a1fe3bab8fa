//! Replays every fuzz seed and every recorded crash input (`fuzz/seeds/<target>/`,
//! `fuzz/regressions/<target>/`) through the fuzz harnesses: each must return without a panic,
//! an abort or unbounded memory. Each crash input must also end in its documented outcome
//! (`fuzz/regressions/outcomes.tsv`: the error kind and message fragments), so a reader that
//! stops refusing it, or refuses it for another reason, fails here. Fuzzing itself is not part
//! of `cargo test`; see the README and `.ci/run`.

#[path = "../fuzz/harness.rs"]
mod harness;

use pfstorer::config::BaseModelConfig;
use pfstorer::personalize::identity::Identity;
use pfstorer::weights::TensorStore;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for dir in ["seeds", "regressions"] {
        files.extend(files_in(&fuzz_dir().join(dir).join(target)));
    }
    assert!(!files.is_empty(), "no inputs for fuzz target {target}");
    files
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
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

/// One line of `outcomes.tsv`: the error kind and the fragments of its message.
struct Outcome {
    kind: String,
    fragments: Vec<String>,
}

/// `(target, file) -> outcome` from `fuzz/regressions/outcomes.tsv`.
fn documented_outcomes() -> BTreeMap<(String, String), Outcome> {
    let path = fuzz_dir().join("regressions/outcomes.tsv");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let cols: Vec<&str> = line.split('\t').collect();
        assert!(cols.len() >= 4, "{}: short line {line:?}", path.display());
        let key = (cols[0].to_string(), cols[1].to_string());
        let outcome = Outcome {
            kind: cols[2].to_string(),
            fragments: cols[3..].iter().map(|s| s.to_string()).collect(),
        };
        assert!(
            out.insert(key, outcome).is_none(),
            "duplicate line {line:?}"
        );
    }
    out
}

fn kind(e: &pfstorer::Error) -> &'static str {
    match e {
        pfstorer::Error::Candle(_) => "Candle",
        pfstorer::Error::Io { .. } => "Io",
        pfstorer::Error::Config(_) => "Config",
        pfstorer::Error::Weights(_) => "Weights",
        pfstorer::Error::Input(_) => "Input",
        pfstorer::Error::Tokenizer(_) => "Tokenizer",
    }
}

/// What the reader under a target's harness makes of `path`: `Ok(())`, or the error's kind and
/// message. The image harness's first byte picks a size; the rest is the file.
fn outcome_of(target: &str, path: &Path) -> Result<(), (String, String)> {
    let typed = |r: pfstorer::Result<()>| r.map_err(|e| (kind(&e).to_string(), e.to_string()));
    match target {
        "checkpoint" => typed(TensorStore::open(path).map(|_| ())),
        "identity" => typed(Identity::load_file(path).map(|_| ())),
        "yaml_config" => typed(BaseModelConfig::from_yaml_file(path).map(|_| ())),
        "image_decode" => {
            let bytes = std::fs::read(path).unwrap();
            let file = bytes.get(1..).unwrap_or_default();
            pfstorer::imaging::io::decode_image_within(file, harness::MAX_PIXELS)
                .map(|_| ())
                .map_err(|message| ("decode".to_string(), message))
        }
        other => panic!("outcomes.tsv: unknown target {other}"),
    }
}

#[test]
fn every_crash_input_ends_in_its_documented_outcome() {
    let documented = documented_outcomes();
    let mut stored = Vec::new();
    for entry in std::fs::read_dir(fuzz_dir().join("regressions")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.is_dir() {
            let target = dir.file_name().unwrap().to_string_lossy().into_owned();
            for file in files_in(&dir) {
                let name = file.file_name().unwrap().to_string_lossy().into_owned();
                stored.push(((target.clone(), name), file));
            }
        }
    }
    for key in documented.keys() {
        assert!(
            stored.iter().any(|(k, _)| k == key),
            "outcomes.tsv lists {}/{}, which is not stored",
            key.0,
            key.1
        );
    }
    assert!(!stored.is_empty(), "no stored crash inputs");
    for ((target, name), path) in &stored {
        let want = documented
            .get(&(target.clone(), name.clone()))
            .unwrap_or_else(|| panic!("{target}/{name}: no documented outcome in outcomes.tsv"));
        match outcome_of(target, path) {
            Ok(()) => panic!(
                "{target}/{name}: accepted, documented as a {} error",
                want.kind
            ),
            Err((kind, message)) => {
                println!("{target}/{name}: {kind}: {message}");
                assert_eq!(kind, want.kind, "{target}/{name}: {message}");
                assert!(
                    !message.contains('\n'),
                    "{target}/{name}: one line: {message}"
                );
                for fragment in &want.fragments {
                    assert!(
                        message.contains(fragment.as_str()),
                        "{target}/{name}: {fragment:?} not in {message:?}"
                    );
                }
            }
        }
    }
}
