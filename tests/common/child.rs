//! Running the `pfstorer` binary as a child under a wall-clock limit, with its peak memory, and
//! snapshots of folders to show that a command changed nothing it was not asked to.
//!
//! A child that outlives its limit is killed and the test fails (a hang fails instead of hanging
//! the suite). Peak memory (Linux) is the child's own high-water mark `VmHWM`, sampled every 2 ms
//! while it runs: memory a hostile input makes it fill takes far longer than that to grow, and
//! an allocation it survives stays in the high-water mark until it exits.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What a bounded run produced.
pub struct Finished {
    pub output: Output,
    /// The child's peak resident set size in bytes (`None` where the platform does not say).
    pub peak_rss: Option<u64>,
    pub elapsed: Duration,
}

/// Runs `command` (stdout and stderr captured) and fails the test if it runs past `limit`.
pub fn run_within(mut command: Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the child");
    // Drained on their own threads so a chatty child cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (status, peak_rss) = wait_bounded(&mut child, start, limit);
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    Finished {
        output,
        peak_rss,
        elapsed: start.elapsed(),
    }
}

#[cfg(target_os = "linux")]
fn wait_bounded(
    child: &mut std::process::Child,
    start: Instant,
    limit: Duration,
) -> (std::process::ExitStatus, Option<u64>) {
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = None;
    loop {
        // VmHWM of the running child: its own image's high-water mark (fresh at exec). The
        // resource usage `wait4` reports would also count the test process, whose memory the
        // child shared until its exec.
        if let Some(hwm) = std::fs::read_to_string(&status_file)
            .ok()
            .and_then(|text| vm_hwm_bytes(&text))
        {
            peak = Some(peak.unwrap_or(0).max(hwm));
        }
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return (status, peak);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not finish within {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `VmHWM:   1234 kB` of a `/proc/<pid>/status` text, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(not(target_os = "linux"))]
fn wait_bounded(
    child: &mut std::process::Child,
    start: Instant,
    limit: Duration,
) -> (std::process::ExitStatus, Option<u64>) {
    loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            return (status, None);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the child did not finish within {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every entry under `dir` with its bytes (a symbolic link or other non-file: its link target
/// or nothing), keyed by path.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                out.insert(path.clone(), b"<dir>".to_vec());
                stack.push(path);
            } else if meta.is_file() {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(path.clone(), target.to_string_lossy().as_bytes().to_vec());
            } else {
                out.insert(path.clone(), Vec::new());
            }
        }
    }
    out
}

/// Asserts that `dir` holds exactly the entries of `before`, byte for byte, apart from paths at
/// or under `allowed` (outputs the command was asked to write).
pub fn assert_unchanged_except(
    what: &str,
    dir: &Path,
    before: &BTreeMap<PathBuf, Vec<u8>>,
    allowed: &[&Path],
) {
    let ok = |p: &Path| allowed.iter().any(|a| p.starts_with(a));
    let after = snapshot(dir);
    for (path, bytes) in before.iter().filter(|(p, _)| !ok(p)) {
        match after.get(path) {
            None => panic!("{what}: {} was removed", path.display()),
            Some(now) => assert!(now == bytes, "{what}: {} changed", path.display()),
        }
    }
    for path in after.keys().filter(|p| !ok(p)) {
        assert!(
            before.contains_key(path),
            "{what}: {} was created",
            path.display()
        );
    }
}
