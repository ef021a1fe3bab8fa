//! Hostile and faulty input, one case per finding of the hostile-input review: every case crafts
//! its input here and asserts a clear one-line error naming the file or flag, a non-zero exit,
//! the batch going on past a bad file, and that no file changed that the user did not ask to
//! change (nothing written outside the output location).

mod common;

use common::hostile::*;
use pfstorer::personalize::identity::Identity;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn scratch(name: &str) -> common::Scratch {
    common::scratch(&format!("hostile-{name}"))
}

// ---------------------------------------------------------------------------------------------
// 1. Data loss

#[test]
fn eval_report_never_replaces_an_existing_file_or_an_input() {
    let dir = scratch("eval");
    let (restored, gt) = (dir.join("restored"), dir.join("gt"));
    std::fs::create_dir_all(&restored).unwrap();
    std::fs::create_dir_all(&gt).unwrap();
    small_png(&restored.join("a.png"), 16, 16);
    small_png(&gt.join("a.png"), 16, 16);
    let before = snapshot(&dir);
    let eval = |out: &Path, force: bool| {
        let mut args = strings(&["eval", "--quiet", "--restored"]);
        args.push(p(&restored));
        args.push("--gt".into());
        args.push(p(&gt));
        args.push("-o".into());
        args.push(p(out));
        if force {
            args.push("--force".into());
        }
        run_refused(&dir, &args)
    };
    // An input photo as the report, with and without --force.
    for force in [false, true] {
        let err = assert_one_line_failure(&eval(&gt.join("a.png"), force));
        assert!(err.contains("is an input"), "{err}");
        assert_eq!(snapshot(&dir), before, "nothing changed");
    }
    // An existing report: refused without --force, replaced with it.
    let report = dir.join("report.csv");
    std::fs::write(&report, "keep me").unwrap();
    let before = snapshot(&dir);
    let err = assert_one_line_failure(&eval(&report, false));
    assert!(
        err.contains("report.csv") && err.contains("--force"),
        "{err}"
    );
    assert_unchanged(&dir, &before, &[]);
    let replaced = eval(&report, true);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    assert!(std::fs::read_to_string(&report).unwrap().contains("psnr"));
    assert_unchanged(&dir, &before, &[&report]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restore_never_writes_over_its_input_even_with_force() {
    let dir = scratch("self");
    let input = dir.join("p.png");
    small_png(&input, 16, 16);
    let before = snapshot(&dir);
    let o = run_refused(
        &dir,
        &restore_args(&[&input], &["--suffix", "", "--force", "-o", &p(&dir)]),
    );
    let err = assert_batch_failure(&o, &["p.png"]);
    assert!(err.contains("0 done, 0 skipped, 1 failed"), "{err}");
    assert!(err.contains("is an input"), "{err}");
    assert_eq!(snapshot(&dir), before, "the input is untouched");
}

// ---------------------------------------------------------------------------------------------
// 2. Path traversal

#[test]
fn suffix_with_path_separators_is_refused_before_anything_is_written() {
    let dir = scratch("suffix");
    let deep = dir.join("a/b/c/d");
    std::fs::create_dir_all(&deep).unwrap();
    let input = deep.join("p.png");
    small_png(&input, 16, 16);
    let before = snapshot(&dir);
    for suffix in ["/../../../../escaped", "x/y", "..\\up"] {
        let err = assert_usage_failure(&run_refused(
            &dir,
            &restore_args(&[&input], &["--suffix", suffix]),
        ));
        assert!(err.contains("--suffix"), "{err}");
        assert_eq!(snapshot(&dir), before, "no file and no directory created");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Allocation bounds

#[test]
fn oversized_images_fail_per_file_and_the_batch_goes_on() {
    let dir = scratch("alloc");
    let liar = dir.join("liar.png");
    lying_png(&liar, 100_000, 100_000);
    assert!(std::fs::metadata(&liar).unwrap().len() < 400);
    let strip = dir.join("strip.png");
    image::RgbImage::new(100_000, 8).save(&strip).unwrap();
    let good = dir.join("good.png");
    small_png(&good, 16, 12);
    let out = dir.join("out");
    let before = snapshot(&dir);
    // The fast test flags process at 64 px (the default is 512, which alone puts the strip
    // past the default 64 MP); a 16 MP limit keeps the same case. The good file runs the model:
    // a full run's time, and the peak of one small restore.
    let done = run_within(
        &dir,
        &restore_args(
            &[&liar, &strip, &good],
            &["-o", &p(&out), "--max-megapixels", "16"],
        ),
        FULL_RUN,
    );
    assert_peak_within(&done);
    let o = done.output;
    let err = assert_batch_failure(&o, &["liar.png", "strip.png"]);
    assert!(err.contains("1 done, 0 skipped, 2 failed"), "{err}");
    assert!(err.contains("liar.png") && err.contains("limit"), "{err}");
    assert!(
        err.contains("strip.png") && err.contains("--max-megapixels"),
        "{err}"
    );
    assert!(out.join("good_restored.png").is_file());
    assert!(!out.join("liar_restored.png").exists() && !out.join("strip_restored.png").exists());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1, "one output");
    assert_unchanged(&dir, &before, &[&out]);
}

#[test]
fn absurd_sizes_from_flags_and_configs_are_refused_up_front() {
    let dir = scratch("flags");
    let input = dir.join("p.png");
    small_png(&input, 256, 256);
    // Output sizes: per file, before the model is read (the base path does not exist).
    let missing_base = dir.join("no-such-model.safetensors");
    let before = snapshot(&dir);
    // A scale no photo can use is a usage error before anything else.
    let mut args = vec!["restore".to_string(), p(&input)];
    args.extend(strings(&[
        "--scale",
        "1e9",
        "--quiet",
        "--base",
        &p(&missing_base),
    ]));
    let err = assert_usage_failure(&run_refused_small(&dir, &args));
    assert!(err.contains("at most 64"), "{err}");
    for flags in [&["--scale", "40"][..], &["--size", "100000x100000"]] {
        let mut args = vec!["restore".to_string(), p(&input)];
        args.extend(strings(flags));
        args.extend(strings(&["--quiet", "--base", &p(&missing_base)]));
        args.extend(strings(&[
            "--config",
            &p(&common::fixture("stablesr/config.yaml")),
        ]));
        let err = assert_batch_failure(&run_refused_small(&dir, &args), &["p.png"]);
        assert!(
            err.contains("0 done, 0 skipped, 1 failed") && err.contains("MP"),
            "{err}"
        );
        assert!(
            !err.contains("no-such-model"),
            "refused before the model: {err}"
        );
    }
    let mut args = restore_args(&[&input], &[]);
    set_flag(&mut args, "--input-size", "100000000");
    let err = assert_usage_failure(&run_refused_small(&dir, &args));
    assert!(err.contains("--input-size"), "{err}");
    assert_unchanged(&dir, &before, &[]);
    // image_size in the YAML.
    let yaml = std::fs::read_to_string(common::fixture("stablesr/config.yaml")).unwrap();
    let huge: String = yaml
        .lines()
        .map(|l| match l.trim_start().strip_prefix("image_size:") {
            Some(_) if l.starts_with("    image_size") => {
                format!(
                    "{}image_size: 100000000\n",
                    &l[..l.len() - l.trim_start().len()]
                )
            }
            _ => format!("{l}\n"),
        })
        .collect();
    assert_ne!(
        huge, yaml,
        "the fixture config has a model-level image_size"
    );
    let cfg = dir.join("huge.yaml");
    std::fs::write(&cfg, huge).unwrap();
    let mut args = restore_args(&[&input], &[]);
    set_flag(&mut args, "--config", &p(&cfg));
    let before = snapshot(&dir);
    let err = assert_one_line_failure(&run_refused_small(&dir, &args));
    assert!(
        err.contains("huge.yaml") && err.contains("image_size"),
        "{err}"
    );
    assert_unchanged(&dir, &before, &[]);
    // personalize --size.
    let mut args = strings(&[
        "personalize",
        "--refs-aligned",
        "--id",
        "x",
        "--size",
        "102400",
        "--refs",
    ]);
    for k in 0..3 {
        let r = dir.join(format!("r{k}.png"));
        small_png(&r, 64 + k, 64);
        args.push(p(&r));
    }
    args.extend(common::model_flags());
    let before_refs = snapshot(&dir);
    let err = assert_one_line_failure(&run_refused_small(&dir, &args));
    assert!(err.contains("--size 102400"), "{err}");
    assert_unchanged(&dir, &before_refs, &[]);
    assert_eq!(
        before_refs.len(),
        before.len() + 3,
        "only the three reference photos were added"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Hostile checkpoints

#[test]
fn hostile_checkpoints_are_refused_without_running_out_of_memory_or_stack() {
    let dir = scratch("ckpt");
    // A memo clone bomb: x = [x, x] twenty-five times over (2^25 values from ~250 bytes).
    let mut bomb = b"\x80\x02]q\x00".to_vec();
    for _ in 0..40 {
        bomb.extend_from_slice(b"](h\x00h\x00eq\x00");
    }
    bomb.push(b'.');
    // A value nested two million levels deep in 2 MB (TUPLE1 of TUPLE1 of ...).
    let mut deep = b"\x80\x02N".to_vec();
    deep.extend(std::iter::repeat_n(0x85u8, 2_000_000));
    deep.push(b'.');
    // A string claiming 4 GB.
    let liar = b"\x80\x02X\xff\xff\xff\xff".to_vec();
    for (name, pickle, why) in [
        ("bomb.ckpt", bomb, "values"),
        ("deep.ckpt", deep, "deeper"),
        ("liar.ckpt", liar, "ends inside"),
    ] {
        let path = dir.join(name);
        torch_zip(&path, &pickle);
        let msg = match pfstorer::weights::TensorStore::open(&path) {
            Ok(_) => panic!("{name} accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg.contains(name) && msg.contains(why), "{msg}");
        assert!(!msg.contains('\n'));
        // And through the CLI: a one-line error, exit 1.
        let input = dir.join("p.png");
        small_png(&input, 16, 16);
        let before = snapshot(&dir);
        let mut args = restore_args(&[&input], &[]);
        set_flag(&mut args, "--base", &p(&path));
        let err = assert_one_line_failure(&run_refused_small(&dir, &args));
        assert!(err.contains(name), "{err}");
        assert_unchanged(&dir, &before, &[]);
    }
}

#[test]
fn a_float_tensor_relabelled_as_integer_is_refused() {
    let dir = scratch("dtype");
    let key = "model.diffusion_model.out.2.weight";
    let path = relabelled(&dir, key, "I32");
    let cfg = common::tiny_config();
    let msg = pfstorer::model::base::BaseModel::load(
        &path,
        cfg,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        msg.contains(key) && msg.contains("not floating-point"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Non-finite values

#[test]
fn non_finite_and_out_of_range_flags_are_refused() {
    let dir = scratch("nan");
    let input = dir.join("p.png");
    small_png(&input, 16, 16);
    for (flag, value) in [
        ("--cfg", "nan"),
        ("--cfg", "inf"),
        ("--dec-w", "nan"),
        ("--dec-w", "1.5"),
        ("--id-strength", "nan"),
        ("--max-megapixels", "nan"),
    ] {
        let before = snapshot(&dir);
        let err =
            assert_usage_failure(&run_refused(&dir, &restore_args(&[&input], &[flag, value])));
        assert!(err.contains(flag), "{flag} {value}: {err}");
        assert_unchanged(&dir, &before, &[]);
    }
}

#[test]
fn non_finite_or_zero_config_scalars_are_refused() {
    let dir = scratch("yaml-nan");
    let yaml = std::fs::read_to_string(common::fixture("stablesr/config.yaml")).unwrap();
    let line = yaml
        .lines()
        .find(|l| l.trim_start().starts_with("scale_factor:"))
        .expect("scale_factor line");
    for bad in ["0", ".nan", "-1"] {
        let indent = &line[..line.len() - line.trim_start().len()];
        let text = yaml.replace(line, &format!("{indent}scale_factor: {bad}"));
        let path = dir.join("bad.yaml");
        std::fs::write(&path, text).unwrap();
        let msg = pfstorer::config::BaseModelConfig::from_yaml_file(&path)
            .expect_err("refused")
            .to_string();
        assert!(
            msg.contains("bad.yaml") && msg.contains("scale_factor"),
            "{bad}: {msg}"
        );
    }
    let cfw = std::fs::read_to_string(common::fixture("stablesr/cfw.yaml")).unwrap();
    let path = dir.join("cfw.yaml");
    let text = if cfw.contains("fusion_w:") {
        let line = cfw.lines().find(|l| l.contains("fusion_w:")).unwrap();
        cfw.replace(line, &line.replace(line.trim_start(), "fusion_w: .nan"))
    } else {
        cfw.replace("params:\n", "params:\n    fusion_w: .nan\n")
    };
    std::fs::write(&path, text).unwrap();
    let msg = pfstorer::config::CfwConfig::from_yaml_file(&path)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("fusion_w"), "{msg}");
}

/// Trains a 1-iteration identity through the CLI; returns its path.
fn trained_identity(dir: &Path, refs: &[PathBuf], name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{name}.identity.safetensors"));
    let mut args = strings(&[
        "personalize",
        "--refs-aligned",
        "--id",
        name,
        "--size",
        "64",
        "--quiet",
    ]);
    args.extend(strings(extra));
    args.extend(strings(&["--out", &p(&out), "--refs"]));
    args.extend(refs.iter().map(|r| p(r)));
    args.extend(common::model_flags());
    let before = snapshot(dir);
    let o = run(dir, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // The output, and the checkpoint fingerprint cache of PFSTORER_HOME (here `dir`).
    assert_unchanged(dir, &before, &[&out, &dir.join("fingerprints.json")]);
    out
}

fn refs(dir: &Path, count: u32, shift: u32) -> Vec<PathBuf> {
    (0..count)
        .map(|k| {
            let path = dir.join(format!("ref{}_{k}.png", shift));
            image::RgbImage::from_fn(64 + 8 * k, 64, |x, y| {
                image::Rgb([
                    ((x * 7 + 40 * k + shift) % 256) as u8,
                    (y * 4) as u8,
                    (x * 2) as u8,
                ])
            })
            .save(&path)
            .unwrap();
            path
        })
        .collect()
}

/// `identity` with `edit` applied to its tensors and metadata, saved at `path`.
fn tampered(identity: &Path, path: &Path, edit: impl FnOnce(&mut Identity)) -> PathBuf {
    let mut id = Identity::load_file(identity).unwrap();
    edit(&mut id);
    id.save(path, true).unwrap();
    path.to_path_buf()
}

#[test]
fn identities_with_nan_or_wrong_shapes_are_refused() {
    let dir = scratch("identity");
    let refs = refs(&dir, 3, 0);
    let good = trained_identity(&dir, &refs, "ann", &["--steps", "1"]);
    let gamma_key = Identity::load_file(&good)
        .unwrap()
        .tensors
        .keys()
        .find(|k| k.ends_with(".gamma"))
        .unwrap()
        .clone();
    let nan = tampered(&good, &dir.join("nan.identity.safetensors"), |id| {
        let g = &id.tensors[&gamma_key];
        let v = (g.ones_like().unwrap() * f64::NAN).unwrap();
        id.tensors.insert(gamma_key.clone(), v);
    });
    let msg = Identity::load_file(&nan).unwrap_err().to_string();
    assert!(msg.contains("nan.identity") && msg.contains("NaN"), "{msg}");
    let width = Identity::load_file(&good).unwrap().tensors["token.embedding"].dims()[1];
    let wrong = tampered(&good, &dir.join("wrong.identity.safetensors"), |id| {
        let t = candle_core::Tensor::zeros(
            (2, width / 2),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        id.tensors.insert("token.embedding".into(), t.clone());
        id.tensors.insert("token.init_embedding".into(), t);
    });
    let msg = Identity::load_file(&wrong).unwrap_err().to_string();
    assert!(
        msg.contains("token.embedding") && msg.contains("[1, width]"),
        "{msg}"
    );
    // Through restore: a one-line error, no output.
    let input = dir.join("p.png");
    small_png(&input, 16, 16);
    let out = dir.join("out.png");
    let before = snapshot(&dir);
    let err = assert_one_line_failure(&run_refused(
        &dir,
        &restore_args(&[&input], &["--id", &p(&nan), "-o", &p(&out)]),
    ));
    assert!(err.contains("NaN") && err.contains("nan.identity"), "{err}");
    assert_unchanged(&dir, &before, &[]);
    // Same block places, another head count: the message says what differs.
    let heads = tampered(&good, &dir.join("heads.identity.safetensors"), |id| {
        let mut hosts: serde_json::Value = serde_json::from_str(&id.metadata["hosts"]).unwrap();
        let h = &mut hosts[0];
        let (heads, d_head) = (h["heads"].as_u64().unwrap(), h["d_head"].as_u64().unwrap());
        h["heads"] = (heads * 2).into();
        h["d_head"] = (d_head / 2).max(1).into();
        id.metadata.insert("hosts".into(), hosts.to_string());
    });
    let before = snapshot(&dir);
    let err = assert_one_line_failure(&run_refused(
        &dir,
        &restore_args(&[&input], &["--id", &p(&heads), "-o", &p(&out)]),
    ));
    assert!(
        err.contains("heads") && err.contains("does not fit"),
        "{err}"
    );
    assert_unchanged(&dir, &before, &[]);
}

// ---------------------------------------------------------------------------------------------
// 6. --resume belongs to one run

#[test]
fn resume_refuses_a_checkpoint_of_another_run() {
    let dir = scratch("resume");
    let refs_a = refs(&dir, 3, 0);
    let refs_b = refs(&dir, 3, 77);
    let done = trained_identity(&dir, &refs_a, "bob", &["--steps", "1", "--seed", "5"]);
    let out = dir.join("bob2.identity.safetensors");
    let checkpoint = dir.join("bob2.identity.safetensors.checkpoint");
    let resume = |refs: &[PathBuf], extra: &[&str]| {
        let mut args = strings(&[
            "personalize",
            "--refs-aligned",
            "--id",
            "bob",
            "--quiet",
            "--resume",
            "--steps",
            "2",
        ]);
        args.extend(strings(extra));
        args.extend(strings(&["--out", &p(&out), "--refs"]));
        args.extend(refs.iter().map(|r| p(r)));
        args.extend(common::model_flags());
        run(&dir, &args)
    };
    std::fs::copy(&done, &checkpoint).unwrap();
    let before = snapshot(&dir);
    for (refs, extra, why) in [
        (
            &refs_b,
            &["--seed", "5", "--size", "64"][..],
            "other reference photos",
        ),
        (&refs_a, &["--seed", "6", "--size", "64"], "seed"),
        (&refs_a, &["--seed", "5", "--size", "128"], "size"),
    ] {
        let err = assert_one_line_failure(&resume(refs, extra));
        assert!(
            err.contains("belongs to another run") && err.contains(why),
            "{err}"
        );
        assert!(err.contains("bob2.identity"), "names the checkpoint: {err}");
        assert_unchanged(&dir, &before, &[]);
    }
    for claimed in ["999", "0", "x"] {
        tampered(&done, &checkpoint, |id| {
            id.metadata.insert("iterations_done".into(), claimed.into());
        });
        let before = snapshot(&dir);
        let err = assert_one_line_failure(&resume(&refs_a, &["--seed", "5", "--size", "64"]));
        assert!(err.contains("belongs to another run"), "{claimed}: {err}");
        assert_unchanged(&dir, &before, &[]);
    }
    // The genuine checkpoint resumes: it becomes the output; nothing else changes.
    std::fs::copy(&done, &checkpoint).unwrap();
    let before = snapshot(&dir);
    let o = resume(&refs_a, &["--seed", "5", "--size", "64"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_unchanged(&dir, &before, &[&out, &checkpoint]);
    assert_eq!(
        Identity::load_file(&out).unwrap().metadata["iterations_done"],
        "2"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Output locations are checked before the compute

#[cfg(unix)]
#[test]
fn unusable_output_locations_fail_before_the_model_is_loaded() {
    let dir = scratch("outloc");
    let input = dir.join("p.png");
    small_png(&input, 16, 16);
    let missing_base = dir.join("no-such-model.safetensors");
    let a_file = dir.join("plain.txt");
    std::fs::write(&a_file, "x").unwrap();
    // The default output name (next to the input) taken by a directory.
    let a_dir = dir.join("p_restored.png");
    std::fs::create_dir_all(&a_dir).unwrap();
    let dangling = dir.join("dangling.png");
    std::os::unix::fs::symlink(dir.join("nowhere"), &dangling).unwrap();
    let before = snapshot(&dir);
    for (out, why) in [
        (Some(a_file.join("out.png")), "cannot"),
        (None, "directory"),
        (Some(dangling.clone()), "symbolic link"),
    ] {
        let mut args = strings(&["restore", &p(&input), "--force", "--quiet"]);
        args.extend(strings(&["--base", &p(&missing_base)]));
        if let Some(out) = out {
            args.extend(strings(&["-o", &p(&out)]));
        }
        let err = assert_batch_failure(&run_refused(&dir, &args), &["p.png"]);
        assert!(
            err.contains("1 failed") && err.contains(why),
            "{why}: {err}"
        );
        assert_unchanged(&dir, &before, &[]);
        assert!(
            !err.contains("no-such-model"),
            "checked before the model: {err}"
        );
    }
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(a_dir.is_dir());
}

// ---------------------------------------------------------------------------------------------
// 8. Smaller findings

#[test]
fn terminal_escapes_in_file_names_are_printed_escaped() {
    let dir = scratch("escape");
    let evil = dir.join("evil\u{1b}[2J.png");
    std::fs::write(&evil, b"not an image").unwrap();
    let before = snapshot(&dir);
    let o = run_refused(&dir, &restore_args(&[&evil], &[]));
    let err = assert_batch_failure(&o, &["evil\\u{1b}[2J.png"]);
    assert!(!err.contains('\u{1b}'), "raw escape printed: {err:?}");
    assert_unchanged(&dir, &before, &[]);
}

#[cfg(unix)]
#[test]
fn ids_rm_removes_a_looping_symlink_itself() {
    let home = scratch("ids");
    let ids = home.join("identities");
    std::fs::create_dir_all(&ids).unwrap();
    let link = ids.join("loop.identity.safetensors");
    std::os::unix::fs::symlink(&link, &link).unwrap();
    let other = ids.join("kept.identity.safetensors");
    std::fs::write(&other, b"another identity").unwrap();
    let before = snapshot(&home);
    let o = run_refused(&home, &strings(&["ids", "rm", "loop"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link).is_err(), "link removed");
    assert_unchanged(&home, &before, &[&link]);
    let err = assert_one_line_failure(&run_refused(&home, &strings(&["ids", "rm", "loop"])));
    assert!(
        err.contains("no stored identity") && err.contains("loop"),
        "{err}"
    );
    assert_unchanged(&home, &before, &[&link]);
}

#[cfg(unix)]
#[test]
fn convert_keeps_the_mode_of_a_replaced_file_and_refuses_its_input() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("convert");
    let input = common::fixture("stablesr/cfw.ckpt");
    let out = dir.join("cfw.safetensors");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = snapshot(&dir);
    let o = run(
        &dir,
        &strings(&["convert", &p(&input), &p(&out), "--force"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o644
    );
    assert_unchanged(&dir, &before, &[&out]);
    // Onto itself: an input is never replaced.
    let copy = dir.join("copy.ckpt");
    std::fs::copy(&input, &copy).unwrap();
    let before = snapshot(&dir);
    let err = assert_one_line_failure(&run_refused(
        &dir,
        &strings(&["convert", &p(&copy), &p(&copy), "--force"]),
    ));
    assert!(
        err.contains("is an input") && err.contains("copy.ckpt"),
        "{err}"
    );
    assert_unchanged(&dir, &before, &[]);
}

/// Time limit of the YAML depth refusal: it takes under 5 ms here (debug build); 1 s is far
/// over 10x that, and far under the seconds a recursive parse of 100k levels takes when the
/// depth budget is gone.
const YAML_REFUSAL: Duration = Duration::from_secs(1);

#[test]
fn deeply_nested_yaml_is_refused_quickly() {
    let dir = scratch("yaml-deep");
    let path = dir.join("deep.yaml");
    for text in [
        format!("model: {}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!(
            "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusionSRTextWTFFHQ\n  params: {}1{}\n",
            "{a: ".repeat(100_000),
            "}".repeat(100_000)
        ),
    ] {
        std::fs::write(&path, text).unwrap();
        let start = std::time::Instant::now();
        let msg = within(YAML_REFUSAL, {
            let path = path.clone();
            move || {
                pfstorer::config::BaseModelConfig::from_yaml_file(&path)
                    .expect_err("refused")
                    .to_string()
            }
        });
        let took = start.elapsed();
        assert!(msg.contains("deep.yaml"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
        println!("refused in {took:?}: {msg}");
    }
    // The nested mapping is refused for its depth, by name.
    let msg = pfstorer::config::BaseModelConfig::from_yaml_file(&path)
        .expect_err("refused")
        .to_string();
    assert!(msg.contains("nested deeper"), "{msg}");
}
