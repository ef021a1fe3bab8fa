//! The hostile-input tests' harness: the `pfstorer` binary run under a time limit (and a peak
//! memory bound where a case is about memory), the one-line-error assertions, folder snapshots,
//! and crafted files (a PNG with a lying header, a torch zip around a given pickle).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Wall-clock limit of a command that runs no model (refused on a flag, a size plan or a hostile
/// file, or an `eval`/`ids` command): these take 0.02–0.6 s here (debug build, the tiny model
/// read at most), so 10 s is over 10x that on a slow, loaded machine.
pub const REFUSAL: Duration = Duration::from_secs(10);

/// Limit of a command that runs the tiny model (a restore or a 1–2 step personalize at 64 px:
/// 2–15 s here, 4.6 s for one restore with the machine's 2 cores busy): about 10x.
pub const FULL_RUN: Duration = Duration::from_secs(180);

/// Peak memory allowed to a command that is about memory (refused for what it would take, or a
/// batch that goes on past such a file): a whole tiny-model restore at 64 px peaks at about 60 MB
/// here (VmHWM), a refusal at 2–10 MB; the hostile inputs claim 30 GB or more. 512 MB is 8x a
/// whole restore.
pub const REFUSAL_PEAK_BYTES: u64 = 512 << 20;

pub fn run_within(home: &Path, args: &[String], limit: Duration) -> super::child::Finished {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pfstorer"));
    command
        .args(args)
        .env("PFSTORER_HOME", home)
        .env("HF_HUB_OFFLINE", "1");
    let done = super::child::run_within(command, limit);
    println!(
        "$ pfstorer {}\n-- status {:?} in {:.2?}, peak RSS {:?} MB\n-- stderr\n{}",
        args.join(" "),
        done.output.status.code(),
        done.elapsed,
        done.peak_rss.map(|b| b >> 20),
        String::from_utf8_lossy(&done.output.stderr)
    );
    done
}

/// A command that runs the model (or may): bounded by [`FULL_RUN`].
pub fn run(home: &Path, args: &[String]) -> Output {
    run_within(home, args, FULL_RUN).output
}

/// A command that runs no model: bounded by [`REFUSAL`].
pub fn run_refused(home: &Path, args: &[String]) -> Output {
    run_within(home, args, REFUSAL).output
}

/// A command refused for the memory it would need: bounded by [`REFUSAL`] and
/// [`REFUSAL_PEAK_BYTES`].
pub fn run_refused_small(home: &Path, args: &[String]) -> Output {
    let done = run_within(home, args, REFUSAL);
    assert_peak_within(&done);
    done.output
}

/// The child's peak memory is within [`REFUSAL_PEAK_BYTES`] (where the platform reports it).
pub fn assert_peak_within(done: &super::child::Finished) {
    if let Some(peak) = done.peak_rss {
        assert!(
            peak <= REFUSAL_PEAK_BYTES,
            "peak memory {} MB (bound {} MB)",
            peak >> 20,
            REFUSAL_PEAK_BYTES >> 20
        );
    }
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

pub fn p(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

pub fn restore_args(inputs: &[&Path], extra: &[&str]) -> Vec<String> {
    let mut args = vec!["restore".to_string()];
    args.extend(inputs.iter().map(|i| p(i)));
    args.extend(strings(extra));
    args.extend(super::fast_sampling_flags());
    args.extend(super::model_flags());
    args.push("--quiet".into());
    args
}

/// Replaces the value of `flag` in `args`.
pub fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.to_string();
}

pub fn small_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 9) as u8, (y * 7) as u8, 90]))
        .save(path)
        .unwrap();
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed command: exit status 1, and its error is one line.
pub fn assert_one_line_failure(o: &Output) -> String {
    assert_one_line_failure_with(o, 1)
}

/// A flag no input can satisfy: exit status 2 (a usage error), and its error is one line.
pub fn assert_usage_failure(o: &Output) -> String {
    assert_one_line_failure_with(o, 2)
}

/// The exit status `code`, exactly one `error:` line, and no panic or backtrace text (a panic
/// exits 101 and prints "panicked at").
pub fn assert_one_line_failure_with(o: &Output, code: i32) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "must fail: {err}");
    assert_eq!(o.status.code(), Some(code), "an error, not an abort: {err}");
    assert_no_panic(&err);
    let error_lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error_lines.len(), 1, "one error line: {err}");
    // No doubled message ("X: X").
    let parts: Vec<&str> = error_lines[0].split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "doubled message: {err}");
    }
    err
}

pub fn assert_no_panic(err: &str) {
    for text in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!err.contains(text), "panic text {text:?}: {err}");
    }
}

/// A batch with failed items: exit status 1, no panic text, one `error:` summary line, and for
/// each of `files` exactly one one-line `failed <file>: <why>` report naming it.
pub fn assert_batch_failure(o: &Output, files: &[&str]) -> String {
    let err = assert_one_line_failure(o);
    let failed: Vec<&str> = err.lines().filter(|l| l.starts_with("failed ")).collect();
    assert_eq!(failed.len(), files.len(), "one line per failed file: {err}");
    for file in files {
        let lines = failed.iter().filter(|l| l.contains(file)).count();
        assert_eq!(lines, 1, "one `failed` line names {file}: {err}");
    }
    err
}

pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    super::child::snapshot(dir)
}

/// `dir` is byte-identical to `before` apart from `allowed` outputs.
pub fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Vec<u8>>, allowed: &[&Path]) {
    super::child::assert_unchanged_except("files after the command", dir, before, allowed);
}

/// Runs `f` on its own thread and fails if it has not returned within `limit` (the thread is
/// left behind: the test fails instead of hanging).
pub fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = send.send(f());
    });
    match receive.recv_timeout(limit) {
        Ok(value) => value,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("not done within {limit:?}"),
        Err(e) => panic!("the call panicked ({e})"),
    }
}

pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG whose header claims `w x h` RGB pixels, with a few bytes of data.
pub fn lying_png(path: &Path, w: u32, h: u32) {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        png.extend_from_slice(&body);
        png.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(b"IEND", &[]);
    std::fs::write(path, png).unwrap();
}

pub fn torch_zip(path: &Path, pickle: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.finish().unwrap();
}

/// The fixture checkpoint with one tensor's stored dtype relabelled (same byte size).
pub fn relabelled(dir: &Path, tensor: &str, dtype: &str) -> PathBuf {
    let bytes = std::fs::read(super::fixture("stablesr/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header[tensor]["dtype"], "F32");
    header[tensor]["dtype"] = dtype.into();
    let text = serde_json::to_vec(&header).unwrap();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    let path = dir.join("relabelled.safetensors");
    std::fs::write(&path, out).unwrap();
    path
}
