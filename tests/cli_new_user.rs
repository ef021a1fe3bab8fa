//! What a new user trips over, through the binary: `ids rm` never deletes what is not an
//! identity, outputs are in the format their extension names, scripts see one line per
//! finished file, inputs that are not regular files are refused at once, flags are checked
//! before anything is read or created, and personalize reads folders and checkpoints.
//! Every run here has a non-terminal stderr (a pipe), as a script's would.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn pfstorer(home: &Path, cwd: &Path, args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .env("PFSTORER_HOME", home)
        .current_dir(cwd)
        .output()
        .expect("run pfstorer")
}

/// [`pfstorer`] that fails the test instead of hanging when the process outlives `limit`
/// (a blocked FIFO read would otherwise hang the suite).
fn pfstorer_within(home: &Path, cwd: &Path, args: &[String], limit: Duration) -> Output {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .env("PFSTORER_HOME", home)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run pfstorer");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().ok();
            child.wait().ok();
            panic!("{args:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A one-line error: exactly one line on stderr, starting `error:`, no panic text.
fn assert_one_line_error(o: &Output, code: i32, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(code), "exit status; stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{needle:?} not in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            } else {
                out.insert(path, Vec::new());
            }
        }
    }
    out
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 % 256) as u8,
            (y * 11 % 256) as u8,
            ((x + y) * 5 % 256) as u8,
        ])
    })
}

/// A safetensors file with one tensor and the given metadata.
fn write_safetensors(path: &Path, metadata: &[(&str, &str)]) {
    let bytes: Vec<u8> = [1.0f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &bytes).unwrap();
    let meta: std::collections::HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let data = safetensors::tensor::serialize([("w", view)], Some(meta)).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn ids_rm_never_deletes_what_is_not_an_identity() {
    let dir = common::scratch("ids-rm");
    let home = dir.join("home");
    let work = dir.join("work");
    std::fs::create_dir_all(home.join("identities")).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("victim.txt"), "my notes\n").unwrap();
    gradient(16, 16).save(work.join("photo.png")).unwrap();
    write_safetensors(&work.join("model.safetensors"), &[("format", "pt")]);
    write_safetensors(
        &work.join("bob.identity.safetensors"),
        &[("format", pfstorer::personalize::identity::FORMAT)],
    );
    let before = snapshot(&dir);

    // Names resolve only in the identity directory, never to a file of the current one.
    for name in ["victim.txt", "photo.png"] {
        let o = pfstorer(&home, &work, &strings(&["ids", "rm", name]));
        assert_one_line_error(&o, 1, "no stored identity named");
    }
    // Paths are removed only when the header says identity.
    for (path, why) in [
        ("./victim.txt", "not a pfstorer identity"),
        ("./photo.png", "not a pfstorer identity"),
        ("model.safetensors", "without pfstorer identity metadata"),
        ("./missing.safetensors", "missing.safetensors"),
    ] {
        let o = pfstorer(&home, &work, &strings(&["ids", "rm", path]));
        assert_one_line_error(&o, 1, why);
        let o = pfstorer(&home, &work, &strings(&["ids", "show", path]));
        assert_eq!(o.status.code(), Some(1), "ids show {path}: {}", stderr(&o));
    }
    // restore --id refuses the same files before any model is read.
    let o = pfstorer(
        &home,
        &work,
        &strings(&["restore", "photo.png", "--id", "./victim.txt"]),
    );
    assert_one_line_error(&o, 1, "not a pfstorer identity");
    assert_eq!(snapshot(&dir), before, "a refused command changed files");

    // A real identity file given by path goes.
    let o = pfstorer(
        &home,
        &work,
        &strings(&["ids", "rm", "./bob.identity.safetensors"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!work.join("bob.identity.safetensors").exists());
    assert!(work.join("victim.txt").exists() && work.join("model.safetensors").exists());
}

#[test]
fn inputs_that_are_not_regular_files_are_refused_at_once() {
    let dir = common::scratch("not-regular");
    let home = dir.join("home");
    let fifo = dir.join("pipe.png");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    // A sparse file larger than the input limit costs no disk.
    let huge = dir.join("huge.png");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(pfstorer::imaging::io::MAX_INPUT_FILE_BYTES + 1)
        .unwrap();
    let mut flags = common::model_flags();
    flags.extend(common::fast_sampling_flags());
    for (input, why) in [
        (fifo.display().to_string(), "not a regular file"),
        ("/dev/zero".to_string(), "not a regular file"),
        (huge.display().to_string(), "larger than"),
    ] {
        let mut args = vec!["restore".to_string(), input.clone()];
        args.extend(["-o".into(), dir.join("out").display().to_string()]);
        args.extend(flags.clone());
        // Generous for a slow machine: a FIFO read would block forever, /dev/zero fill memory.
        let o = pfstorer_within(&home, &dir, &args, Duration::from_secs(60));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{input}: {err}");
        assert!(err.contains(why), "{input}: {err}");
        assert!(err.contains("0 done, 0 skipped, 1 failed"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // In a folder the lister passes over the FIFO and takes the image beside it.
    let folder = dir.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    assert!(Command::new("mkfifo")
        .arg(folder.join("pipe.png"))
        .status()
        .unwrap()
        .success());
    gradient(16, 12).save(folder.join("ok.png")).unwrap();
    let o = pfstorer(
        &home,
        &dir,
        &[
            vec!["degrade".to_string(), folder.display().to_string()],
            strings(&["--preset", "light", "-o", "deg"]),
        ]
        .concat(),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("1 done, 0 skipped, 0 failed"), "{err}");
    assert!(!err.contains("pipe.png"), "{err}");
}

#[test]
fn flags_are_checked_before_anything_is_read_or_created() {
    let dir = common::scratch("flags-first");
    let home = dir.join("home");
    let inputs = dir.join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    for k in 0..3 {
        gradient(20 + k, 16)
            .save(inputs.join(format!("{k}.png")))
            .unwrap();
    }
    let out = dir.join("new_out");
    let base = |extra: &[&str]| {
        let mut args = vec!["restore".to_string(), inputs.display().to_string()];
        args.extend(["-o".into(), out.display().to_string()]);
        args.extend(strings(extra));
        args.extend(common::model_flags());
        args
    };
    for (extra, needle) in [
        (&["--scale", "0"][..], "--scale 0"),
        (&["-s", "nan"][..], "--scale NaN"),
        (&["--long-side", "0"][..], "--long-side 0"),
        (&["--ext", "gif"][..], "--ext gif"),
        (&["--quality", "0"][..], "--quality 0"),
        (&["--cfg=-1"][..], "--cfg -1"),
        (&["--suffix", "a/b"][..], "--suffix"),
    ] {
        let o = pfstorer(&home, &dir, &base(extra));
        assert_one_line_error(&o, 2, needle);
        assert!(!out.exists(), "{extra:?} created the output folder");
    }
    // An existing output folder is not the reason given either.
    std::fs::create_dir_all(&out).unwrap();
    let o = pfstorer(&home, &dir, &base(&["--scale", "0"]));
    assert_one_line_error(&o, 2, "--scale 0");
    // -o with an unknown extension for one file.
    let o = pfstorer(
        &home,
        &dir,
        &[
            vec![
                "restore".to_string(),
                inputs.join("0.png").display().to_string(),
            ],
            strings(&["-o", "x.gif"]),
            common::model_flags(),
        ]
        .concat(),
    );
    assert_one_line_error(&o, 2, "unknown image extension");
}

fn magic(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()[..12].to_vec()
}

#[test]
fn outputs_follow_their_extension_and_scripts_see_each_file() {
    let dir = common::scratch("formats");
    let home = dir.join("home");
    let input = dir.join("face.png");
    gradient(24, 20).save(&input).unwrap();
    let deep = dir.join("deep.png");
    let pixels = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(20, 16, |x, y| {
        image::Rgb([x as u16 * 2000, y as u16 * 3000, 40000])
    });
    image::DynamicImage::ImageRgb16(pixels).save(&deep).unwrap();
    let mut flags = common::model_flags();
    flags.extend(common::fast_sampling_flags());
    flags.extend(strings(&["-s", "2"]));
    let run = |args: Vec<String>| {
        let o = pfstorer(&home, &dir, &[args, flags.clone()].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        stderr(&o)
    };

    // -o t.jpg writes JPEG, with the settings in a comment; one line for the finished file.
    let jpg = dir.join("t.jpg");
    let err = run(vec![
        "restore".into(),
        input.display().to_string(),
        "-o".into(),
        jpg.display().to_string(),
    ]);
    assert_eq!(&magic(&jpg)[..3], &[0xFF, 0xD8, 0xFF]);
    let comments = pfstorer::imaging::io::jpeg_comments(&std::fs::read(&jpg).unwrap());
    let text = comments.concat();
    assert!(text.contains("pfstorer:seed: 42"), "{comments:?}");
    assert!(text.contains("pfstorer:steps: 2"), "{comments:?}");
    let line = format!("{} -> {} (", input.display(), jpg.display());
    assert_eq!(err.matches(&line).count(), 1, "{err}");
    // The plan line counts steps and the output size as users do.
    assert!(err.contains("face.png: 48x40 output, 2 steps"), "{err}");
    assert!(
        !err.contains("UNet passes"),
        "tile details only with -v: {err}"
    );

    // --ext for names pfstorer makes: webp (lossless), tif (16-bit stays 16-bit), auto.
    let out = dir.join("out");
    let err = run(vec![
        "restore".into(),
        "-i".into(),
        input.display().to_string(),
        "-i".into(),
        deep.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--ext".into(),
        "webp".into(),
        "-v".into(),
    ]);
    assert!(
        err.contains("UNet passes"),
        "-v shows the tile details: {err}"
    );
    assert!(err.contains("not stored in webp outputs"), "{err}");
    for stem in ["face", "deep"] {
        let m = magic(&out.join(format!("{stem}_restored.webp")));
        assert_eq!((&m[..4], &m[8..12]), (&b"RIFF"[..], &b"WEBP"[..]));
        assert!(err.contains(&format!("{stem}_restored.webp (")), "{err}");
    }
    let err = run(vec![
        "restore".into(),
        deep.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "--ext".into(),
        "tif".into(),
    ]);
    let tif = out.join("deep_restored.tif");
    assert_eq!(&magic(&tif)[..4], b"II*\0");
    let decoded = image::open(&tif).unwrap();
    assert_eq!(decoded.color(), image::ColorType::Rgb16, "{err}");
    std::fs::copy(&input, dir.join("photo.jpg")).ok();
    gradient(24, 20).save(dir.join("photo.jpg")).unwrap();
    run(vec![
        "restore".into(),
        dir.join("photo.jpg").display().to_string(),
        "--ext".into(),
        "auto".into(),
    ]);
    assert_eq!(
        &magic(&dir.join("photo_restored.jpg"))[..3],
        &[0xFF, 0xD8, 0xFF]
    );

    // -q: no per-file line.
    let err = run(vec![
        "restore".into(),
        input.display().to_string(),
        "-o".into(),
        dir.join("quiet.png").display().to_string(),
        "-q".into(),
    ]);
    assert!(!err.contains(" -> "), "{err}");
    assert_eq!(&magic(&dir.join("quiet.png"))[..4], b"\x89PNG");
}

#[test]
fn personalize_reads_folders_checkpoints_and_ids_show_summarises() {
    let dir = common::scratch("personalize-folder");
    let home = dir.join("home");
    let refs = dir.join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    for k in 0..3u32 {
        image::RgbImage::from_fn(72 + 8 * k, 72, |x, y| {
            image::Rgb([
                ((x * 7 + y * 3 + 40 * k) % 256) as u8,
                (y * 4 % 256) as u8,
                (x * 2 % 256) as u8,
            ])
        })
        .save(refs.join(format!("ref{k}.png")))
        .unwrap();
    }
    let id_file = dir.join("bob.identity.safetensors");
    let args = [
        strings(&["personalize", "--refs-aligned", "--refs"]),
        vec![refs.display().to_string()],
        strings(&[
            "--id",
            "bob",
            "--steps",
            "3",
            "--size",
            "64",
            "--checkpoint-every",
            "2",
            "-o",
        ]),
        vec![id_file.display().to_string()],
        common::model_flags(),
    ]
    .concat();
    let o = pfstorer(&home, &dir, &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("training will take about"), "{err}");
    assert!(err.contains("(3 iterations)"), "{err}");
    assert!(err.contains("iteration 2/3"), "checkpoint line: {err}");
    assert!(id_file.is_file());
    assert!(
        !pfstorer::fsutil::checkpoint_path(&id_file).exists(),
        "the checkpoint goes when the run finishes"
    );

    let o = pfstorer(
        &home,
        &dir,
        &strings(&["ids", "show", &id_file.display().to_string()]),
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "name:",
        "bob",
        "iterations:",
        "3 of 3",
        "references:",
        "size:",
    ] {
        assert!(out.contains(needle), "{needle:?} in {out}");
    }
    let o = pfstorer(
        &home,
        &dir,
        &strings(&["ids", "show", "--json", &id_file.display().to_string()]),
    );
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["name"], "bob");
    assert_eq!(json["references"], 3);
    assert_eq!(json["training"]["iterations"], 3);

    // restore --id says which identity file it used.
    let input = dir.join("face.png");
    gradient(24, 20).save(&input).unwrap();
    let args = [
        vec!["restore".to_string(), input.display().to_string()],
        strings(&["--id", &id_file.display().to_string(), "-s", "1"]),
        common::fast_sampling_flags(),
        common::model_flags(),
    ]
    .concat();
    let o = pfstorer(&home, &dir, &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("identity: bob from {}", id_file.display())),
        "{err}"
    );
    assert!(err.contains("matches"), "{err}");
}

/// The README's "Try it offline" command, run as written (the binary and `$T` aside, which
/// point at this build and the fixture root): it must work without flags the README leaves out.
#[test]
fn the_readme_offline_command_runs_as_written() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = &readme[readme.find("**Try it offline**").expect("README section")..];
    let block = after
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the section's sh block");
    let joined = block.replace("\\\n", " ");
    let mut variables: BTreeMap<String, String> = BTreeMap::new();
    let mut command = None;
    for line in joined.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("cargo ") {
            continue; // this build is the one under test
        }
        if let Some((name, _)) = line.split_once('=').filter(|(n, _)| !n.contains(' ')) {
            // `T=tests/fixtures/stablesr`: the fixture root in use (PFSTORER_FIXTURES too).
            let model = common::fixture("stablesr/model.safetensors");
            let value = model.parent().unwrap().display().to_string();
            variables.insert(format!("${name}"), value);
            continue;
        }
        command = Some(line.to_string());
    }
    let command = command.expect("a pfstorer command");
    let mut words = command.split_whitespace();
    assert!(words.next().unwrap().ends_with("pfstorer"), "{command}");
    let args: Vec<String> = words
        .map(|w| {
            variables
                .iter()
                .fold(w.to_string(), |w, (name, value)| w.replace(name, value))
        })
        .collect();
    let dir = common::scratch("readme-offline");
    let input = args
        .iter()
        .find(|a| a.ends_with(".jpg") || a.ends_with(".png"))
        .expect("an input photo in the command")
        .clone();
    gradient(96, 80).save(dir.join(&input)).unwrap();
    let o = pfstorer(&dir.join("home"), &dir, &args);
    assert!(o.status.success(), "{command}\n{}", stderr(&o));
    let output = args[args.iter().position(|a| a == "-o").unwrap() + 1].clone();
    let restored = image::open(dir.join(&output)).unwrap();
    assert_eq!((restored.width(), restored.height()), (96, 80), "{command}");
}
