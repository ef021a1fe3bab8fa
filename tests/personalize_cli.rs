//! End-to-end `pfstorer personalize` and `pfstorer ids` with the tiny fixture model.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write_refs(dir: &Path, count: usize, side: u32) -> Vec<PathBuf> {
    (0..count)
        .map(|k| {
            let img = image::RgbImage::from_fn(side + 8 * k as u32, side, |x, y| {
                let v = ((x * 7 + y * 3 + 40 * k as u32) % 256) as u8;
                image::Rgb([v, (y * 4 % 256) as u8, (x * 2 % 256) as u8])
            });
            let path = dir.join(format!("ref{k}.png"));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

fn pfstorer(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .env("PFSTORER_HOME", home)
        .output()
        .expect("run pfstorer")
}

fn model_flags() -> Vec<String> {
    common::model_flags()
}

fn personalize(home: &Path, refs: &[PathBuf], extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec![
        "personalize".into(),
        "--refs-aligned".into(),
        "--refs".into(),
    ];
    args.extend(refs.iter().map(|p| p.to_string_lossy().into_owned()));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(model_flags());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    pfstorer(home, &args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn personalize_then_list_show_and_remove() {
    let root = common::scratch("cli-pers");
    let home = root.join("home");
    let refs_dir = root.join("refs");
    std::fs::create_dir_all(&refs_dir).unwrap();
    let refs = write_refs(&refs_dir, 3, 72);
    let flags = ["--id", "alice", "--steps", "2", "--size", "64", "--quiet"];

    let out = personalize(&home, &refs, &flags);
    assert!(out.status.success(), "personalize failed: {}", stderr(&out));
    let file = home.join("identities/alice.identity.safetensors");
    assert!(file.is_file(), "identity file missing");

    let list = pfstorer(&home, &["ids", "list"]);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(String::from_utf8_lossy(&list.stdout).starts_with("alice\t"));
    let show = pfstorer(&home, &["ids", "show", "alice", "--json"]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["format"], "pfstorer-identity/1", "{shown}");
    assert!(
        shown["base_fingerprint"]
            .as_str()
            .is_some_and(|f| f.len() == 64),
        "{shown}"
    );
    // The references' dlib-ID descriptors are stored, and `ids show` summarises them.
    let summary = pfstorer(&home, &["ids", "show", "alice"]);
    let summary = String::from_utf8_lossy(&summary.stdout).into_owned();
    assert!(summary.contains("dlib-ID:"), "{summary}");

    // Resume from a checkpoint (here: the 2-iteration identity) to 3 iterations.
    let carol = root.join("carol.identity.safetensors");
    std::fs::copy(&file, root.join("carol.identity.safetensors.checkpoint")).unwrap();
    let carol_s = carol.to_string_lossy().into_owned();
    let resumed = personalize(
        &home,
        &refs,
        &[
            "--id", "carol", "--out", &carol_s, "--steps", "3", "--size", "64", "--quiet",
            "--resume",
        ],
    );
    assert!(
        resumed.status.success(),
        "resume failed: {}",
        stderr(&resumed)
    );
    let show = pfstorer(&home, &["ids", "show", "--json", &carol_s]);
    let shown: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["iterations_done"], "3", "{shown}");
    assert!(!root.join("carol.identity.safetensors.checkpoint").exists());

    // An existing identity is refused without --force and left untouched.
    let before = std::fs::read(&file).unwrap();
    let again = personalize(&home, &refs, &flags);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);

    // Bad references.
    let too_few = personalize(&home, &refs[..2], &["--id", "bob", "--size", "64"]);
    assert!(
        stderr(&too_few).contains("between 3 and 20"),
        "{}",
        stderr(&too_few)
    );
    // The same photo under another name (the same path twice is one reference).
    let copy = root.join("copy_of_first.png");
    std::fs::copy(&refs[0], &copy).unwrap();
    let dup = vec![refs[0].clone(), refs[1].clone(), copy];
    let dup_out = personalize(&home, &dup, &["--id", "bob", "--size", "64"]);
    assert!(
        stderr(&dup_out).contains("duplicate"),
        "{}",
        stderr(&dup_out)
    );
    let tiny_dir = root.join("tiny");
    std::fs::create_dir_all(&tiny_dir).unwrap();
    let tiny = write_refs(&tiny_dir, 3, 32);
    let tiny_out = personalize(&home, &tiny, &["--id", "bob", "--size", "64"]);
    assert!(
        stderr(&tiny_out).contains("at least 64x64"),
        "{}",
        stderr(&tiny_out)
    );
    let junk = refs_dir.join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let bad = vec![refs[0].clone(), refs[1].clone(), junk];
    let bad_out = personalize(&home, &bad, &["--id", "bob", "--size", "64"]);
    assert!(!bad_out.status.success());
    assert!(
        stderr(&bad_out).contains("junk.png"),
        "{}",
        stderr(&bad_out)
    );
    assert!(!home.join("identities/bob.identity.safetensors").exists());

    // A truncated identity file: clear error.
    let cut = root.join("cut.identity.safetensors");
    std::fs::write(&cut, &before[..before.len() / 3]).unwrap();
    let cut_out = pfstorer(&home, &["ids", "show", cut.to_str().unwrap()]);
    assert!(
        stderr(&cut_out).contains("truncated or corrupt"),
        "{}",
        stderr(&cut_out)
    );

    let rm = pfstorer(&home, &["ids", "rm", "alice"]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert!(!file.exists());
    std::fs::remove_dir_all(&root).unwrap();
}
