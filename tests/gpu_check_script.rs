//! `scripts/gpu-check.sh` against a fake bundle: shell scripts stand in for the two pfstorer builds,
//! their test executables and `nvidia-smi`, so the matrix plan, the one table and the exit status
//! are checked without a GPU.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn write_exe(path: &Path, body: &str) {
    fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A bench stand-in printing the JSON fields the report reads; `unet` and `restore` seconds given.
fn fake_pfstorer(unet_s: f64, restore_s: f64) -> String {
    format!(
        r#"case "$2" in
  weights) while [[ $# -gt 0 ]]; do [[ $1 == --out-dir ]] && d=$2; shift; done
           echo w > "$d/stablesr_face_random.safetensors"; echo w > "$d/cfw_random.safetensors" ;;
  unet) echo '{{"median_s": {unet_s}}}' ;;
  restore) echo '{{"total_s": {restore_s}, "sample_s": 25.0}}' ;;
  train) echo '{{"median_s": 4.0, "projected_500_s": 2000.0}}' ;;
  train-base) echo '{{"median_step_s": 3.0, "images_per_s": 0.33}}' ;;
esac"#
    )
}

const PASS: &str =
    r#"echo "test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out""#;

/// The bundle (both builds, one test executable each; the cuDNN one fails in bf16) and a folder
/// with a fake `nvidia-smi`.
fn fake_bundle(root: &Path) -> (PathBuf, PathBuf) {
    let bundle = root.join("bundle");
    let bin = root.join("bin");
    for d in [
        bundle.join("tests"),
        bundle.join("tests-cudnn"),
        bin.clone(),
    ] {
        fs::create_dir_all(d).unwrap();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    fs::copy(script, bundle.join("gpu-check.sh")).unwrap();
    write_exe(&bundle.join("pfstorer"), &fake_pfstorer(0.5, 30.0));
    write_exe(&bundle.join("pfstorer-cudnn"), &fake_pfstorer(0.4, 24.0));
    write_exe(&bundle.join("tests/cuda_kernels"), PASS);
    write_exe(
        &bundle.join("tests-cudnn/cuda_kernels"),
        &format!(
            r#"if [[ $PFSTORER_TEST_DTYPE == bf16 && $PFSTORER_TEST_DEVICE == cuda ]]; then
  echo "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out"; exit 101
fi
{PASS}"#
        ),
    );
    write_exe(
        &bin.join("nvidia-smi"),
        r#"if [[ "$*" == *name,driver* ]]; then echo "Fake GPU, 580.00, 1000 MiB"; exit 0; fi
if [[ "$*" == *-lms* ]]; then while true; do echo 900; sleep 0.1; done; fi
echo 400"#,
    );
    (bundle, bin)
}

fn run_check(root: &Path, bundle: &Path, path_prefix: Option<&Path>, args: &[&str]) -> Output {
    let path = std::env::var("PATH").unwrap_or_default();
    let path = match path_prefix {
        Some(p) => format!("{}:{path}", p.display()),
        None => path,
    };
    Command::new("bash")
        .arg(bundle.join("gpu-check.sh"))
        .args(["--work", root.join("work").to_str().unwrap()])
        .args(args)
        .env("PATH", path)
        .env_remove("STABLESR_ROOT")
        .env_remove("OUT")
        .output()
        .expect("bash")
}

#[test]
fn gpu_scripts_are_valid_bash() {
    for script in ["scripts/gpu-check.sh", "scripts/build-cuda.sh"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
        let status = Command::new("bash").arg("-n").arg(path).status().unwrap();
        assert!(status.success(), "{script}");
    }
}

/// `--dry-run` needs no GPU (no nvidia-smi on the path) and plans the whole matrix: parity of each
/// variant in f32 and bf16, weights once, unet and restore per variant and dtype, train per
/// variant in f32.
#[test]
fn dry_run_plans_the_whole_matrix_without_a_gpu() {
    let root = tempfile::tempdir().unwrap();
    let (bundle, _) = fake_bundle(root.path());
    let out = run_check(root.path(), &bundle, None, &["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Vec<&str> = stdout.lines().filter(|l| l.starts_with("plan: ")).collect();
    let count = |section: &str, variant: &str, what: &str, dtype: &str| {
        plan.iter()
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 5 && f[1] == section && f[2] == variant && f[3] == what && f[4] == dtype
            })
            .count()
    };
    for v in ["cuda", "cudnn"] {
        for dt in ["f32", "bf16"] {
            assert_eq!(count("parity", v, "cuda_kernels", dt), 1, "parity {v} {dt}");
            assert_eq!(count("bench", v, "unet", dt), 1, "unet {v} {dt}");
            assert_eq!(count("bench", v, "restore", dt), 1, "restore {v} {dt}");
        }
        assert_eq!(count("bench", v, "train", "f32"), 1, "train {v}");
        assert_eq!(
            count("bench", v, "train", "bf16"),
            0,
            "the trainer is f32 only"
        );
    }
    assert_eq!(count("bench", "cuda", "weights", "-"), 1);
    assert_eq!(
        count("bench", "cuda", "train-base", "f32"),
        1,
        "train-base once"
    );
    assert_eq!(count("bench", "cudnn", "train-base", "f32"), 0);
    assert!(stdout.contains("16 steps"), "{stdout}");
    // The cuDNN build runs its own binary; the restore asks for 200 steps.
    assert!(plan
        .iter()
        .any(|l| l.contains("pfstorer-cudnn bench restore") && l.contains("--steps 200")));
}

/// A full run on the fakes: one table with both builds side by side and their ratio, the parity
/// rows per variant, exit status 1 for the failed parity run.
#[test]
fn full_run_prints_one_table_and_fails_on_a_parity_failure() {
    let root = tempfile::tempdir().unwrap();
    let (bundle, bin) = fake_bundle(root.path());
    let out = run_check(root.path(), &bundle, Some(&bin), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let has_python = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_python {
        // Without python the script prints its raw results instead of the table.
        assert!(
            stdout.contains("parity\tcudnn\tcuda_kernels\tbf16\tfailed"),
            "{stdout}"
        );
        return;
    }
    let row = |start: &str, dtype: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(start) && l.split_whitespace().any(|w| w == dtype))
            .unwrap_or_else(|| panic!("no row '{start}' {dtype} in\n{stdout}"));
        line[start.len()..]
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // dtype, no cuDNN s, cuDNN s, PyTorch s, cuDNN/no, best/PT, ...
    let unet = row("unet fwd", "bf16");
    assert_eq!(
        &unet[unet.len() - 8..unet.len() - 3],
        ["0.500", "0.400", "-", "0.80", "-"]
    );
    let restore = row("restore 512 px, 200 steps: total", "f32");
    assert_eq!(&restore[1..5], ["30.000", "24.000", "-", "0.80"]);
    let train = row("train 512 px: median iteration", "f32");
    assert_eq!(&train[1..3], ["4.000", "4.000"]);
    assert_eq!(
        row("parity cuda_kernels", "bf16"),
        ["bf16", "3/3", "ok", "FAIL", "1/3", "-"]
    );
    assert_eq!(
        row("parity cuda_kernels", "f32"),
        ["f32", "3/3", "ok", "3/3", "ok", "-"]
    );
    let report: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(root.path().join("work/gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(report["variants"], serde_json::json!(["cuda", "cudnn"]));
    assert_eq!(report["parity_failed"], serde_json::json!(true));
    assert_eq!(report["bench_failed"], serde_json::json!(false));
}
