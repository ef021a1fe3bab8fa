//! The rules every file pfstorer writes follows, in one place:
//!
//! - one atomic writer: a temporary file in the target's directory (created by `tempfile`),
//!   filled, fsynced, then renamed over the target, or linked without clobbering when replacing
//!   is not allowed; on any error the target is untouched and the temporary file removed;
//! - a replaced file keeps its permission bits (a new one gets the usual 0o666 minus umask);
//! - temporary files still in flight when SIGINT or SIGTERM arrives are removed before exiting;
//! - output locations are checked before any compute ([`check_output_location`]), and an output
//!   never replaces an input ([`same_file`]), with or without `--force`.

use crate::error::{Error, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Whether an existing target may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Fail when the target exists (also when it appears while writing).
    NoClobber,
    /// Replace the target (`--force`).
    Replace,
}

impl WriteMode {
    pub fn from_force(force: bool) -> Self {
        if force {
            WriteMode::Replace
        } else {
            WriteMode::NoClobber
        }
    }
}

/// Error for an existing output that may not be replaced.
pub fn exists_error(path: &Path) -> Error {
    Error::Input(format!(
        "{}: already exists (use --force to overwrite)",
        path.display()
    ))
}

/// Refuses to replace an existing file (or anything else at that name) unless `force`.
pub fn check_overwrite(path: &Path, force: bool) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok() && !force {
        return Err(exists_error(path));
    }
    Ok(())
}

/// Temporary files being written, removed by the signal handler.
static IN_FLIGHT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Installs the SIGINT/SIGTERM handler that removes in-flight temporary files and exits with
/// status 130. Called once by the binary; library users keep their own signal handling.
pub fn install_signal_cleanup() {
    let _ = ctrlc::set_handler(|| {
        remove_in_flight();
        std::process::exit(130);
    });
}

fn remove_in_flight() {
    if let Ok(set) = IN_FLIGHT.lock() {
        remove_all(&set);
    }
}

fn remove_all(paths: &BTreeSet<PathBuf>) {
    for path in paths {
        let _ = std::fs::remove_file(path);
    }
}

fn register(path: &Path) {
    if let Ok(mut set) = IN_FLIGHT.lock() {
        set.insert(path.to_path_buf());
    }
}

fn unregister(path: &Path) {
    if let Ok(mut set) = IN_FLIGHT.lock() {
        set.remove(path);
    }
}

/// Writes `path` atomically: `write` fills a temporary file (given by its path) in the same
/// directory, which is then synced and moved into place according to `mode`.
pub fn write_atomic<F>(path: &Path, mode: WriteMode, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let existing = std::fs::metadata(path).ok();
    if let Some(meta) = &existing {
        if meta.is_dir() {
            return Err(Error::Input(format!(
                "{}: is a directory, not a file name",
                path.display()
            )));
        }
        if mode == WriteMode::NoClobber {
            return Err(exists_error(path));
        }
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let temp = builder.tempfile_in(&dir).map_err(|e| Error::io(&dir, e))?;
    let temp_path = temp.path().to_path_buf();
    register(&temp_path);
    let result = (|| {
        write(&temp_path)?;
        let file = std::fs::File::open(&temp_path).map_err(|e| Error::io(&temp_path, e))?;
        file.sync_all().map_err(|e| Error::io(&temp_path, e))?;
        if let Some(meta) = &existing {
            // A replaced file keeps its mode (the temporary file is 0o666 minus umask).
            std::fs::set_permissions(&temp_path, meta.permissions())
                .map_err(|e| Error::io(&temp_path, e))?;
        }
        let persisted = match mode {
            WriteMode::Replace => temp.persist(path).map(|_| ()),
            WriteMode::NoClobber => temp.persist_noclobber(path).map(|_| ()),
        };
        persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                exists_error(path)
            } else {
                Error::io(path, e.error)
            }
        })?;
        // Make the rename itself durable; best effort (not every file system allows it).
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    // After a successful persist the temporary name is gone; after a failure `temp` was dropped
    // (removing it) inside the closure or the persist error.
    let _ = std::fs::remove_file(&temp_path);
    unregister(&temp_path);
    result
}

/// The files (not directories) directly in `dir` that `keep` accepts, sorted by path.
pub fn list_files(dir: &Path, keep: impl Fn(&Path) -> bool) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && keep(&path) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// pfstorer's data directory (identities, the fingerprint cache): `$PFSTORER_HOME` if set,
/// else `$XDG_DATA_HOME/pfstorer`, else `~/.local/share/pfstorer` (the platform's data
/// directory elsewhere).
pub fn data_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("PFSTORER_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    match dirs::data_dir() {
        Some(data) => Ok(data.join("pfstorer")),
        None => Err(Error::Input(
            "cannot locate the data directory: set PFSTORER_HOME or HOME".into(),
        )),
    }
}

/// [`write_atomic`] of an in-memory buffer.
pub fn write_bytes(path: &Path, bytes: &[u8], mode: WriteMode) -> Result<()> {
    write_atomic(path, mode, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Whether `a` and `b` name the same file: the same inode when both exist (hard links and
/// symlinks included), else the same canonical location.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return ma.dev() == mb.dev() && ma.ino() == mb.ino();
        }
    }
    match (canonical_location(a), canonical_location(b)) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// The canonical path of `p`, or of its directory joined with its name when `p` does not exist.
fn canonical_location(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let name = p.file_name()?;
    let dir = match p.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d,
        None => Path::new("."),
    };
    Some(std::fs::canonicalize(dir).ok()?.join(name))
}

/// What identifies an existing file: device and inode on Unix (hard links and symlinks
/// included), the canonical path elsewhere.
#[cfg(unix)]
pub type FileId = (u64, u64);
#[cfg(not(unix))]
pub type FileId = PathBuf;

/// The [`FileId`] of an existing file.
pub fn file_id(p: &Path) -> Option<FileId> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        std::fs::canonicalize(p).ok()
    }
}

/// The error for an output that is the input `input`.
pub fn is_an_input_error(output: &Path, input: &Path) -> Error {
    Error::Input(format!(
        "{}: is an input ({}); pfstorer never writes over an input, choose another output name",
        output.display(),
        input.display()
    ))
}

/// Refuses an output that is one of `inputs`, whatever `--force` says.
pub fn check_not_an_input<'a>(
    output: &Path,
    inputs: impl IntoIterator<Item = &'a Path>,
) -> Result<()> {
    match inputs.into_iter().find(|input| same_file(output, input)) {
        Some(input) => Err(is_an_input_error(output, input)),
        None => Ok(()),
    }
}

/// Checks, before any compute, that a file can be written at `path`: the name is usable (see
/// [`check_output_name`]) and its directory exists (or can be created) and accepts new files.
pub fn check_output_location(path: &Path, force: bool) -> Result<()> {
    check_output_name(path, force)?;
    check_writable_dir(&parent_dir(path))
}

/// The resumable training checkpoint kept beside the output `out` (`<out>.checkpoint`).
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_os_string();
    name.push(".checkpoint");
    PathBuf::from(name)
}

/// The directory `path` would be written in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> PathBuf {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    }
}

/// The name itself: not a directory (or a link to one), not a dangling or looping symlink, and
/// not an existing file unless `force`.
pub fn check_output_name(path: &Path, force: bool) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Error::Input(format!(
            "{}: is a directory, not a file name",
            path.display()
        ))),
        Ok(meta) if meta.file_type().is_symlink() && std::fs::metadata(path).is_err() => {
            Err(Error::Input(format!(
                "{}: is a dangling or looping symbolic link; remove it or choose another output",
                path.display()
            )))
        }
        Ok(_) if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) => Err(Error::Input(format!(
            "{}: links to a directory, not a file",
            path.display()
        ))),
        Ok(_) if !force => Err(exists_error(path)),
        _ => Ok(()),
    }
}

/// The directory exists or can be created, and a file can be created in it.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    if let Ok(meta) = std::fs::metadata(dir) {
        if !meta.is_dir() {
            return Err(Error::Input(format!(
                "{}: is not a directory, cannot hold outputs",
                dir.display()
            )));
        }
    } else {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Input(format!(
                "{}: cannot create the output directory ({e})",
                dir.display()
            ))
        })?;
    }
    tempfile::Builder::new()
        .prefix(".pfstorer-probe.")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| {
            Error::Input(format!(
                "{}: cannot write outputs there ({e})",
                dir.display()
            ))
        })
}

/// `s` with control characters (terminal escapes among them) shown as `\u{..}` escapes, for
/// printing names and metadata that come from files.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`printable`] of a path.
pub fn printable_path(p: &Path) -> String {
    printable(&p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("pfstorer-fsutil-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn no_clobber_and_replace() {
        let d = tmp("write");
        let d = d.path();
        let p = d.join("a.txt");
        write_bytes(&p, b"one", WriteMode::NoClobber).unwrap();
        let err = write_bytes(&p, b"two", WriteMode::NoClobber).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"one");
        write_bytes(&p, b"three", WriteMode::Replace).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        // Nothing but the file is left behind.
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 1);
        // A failing writer leaves the target and no temporary file.
        let err = write_atomic(&p, WriteMode::Replace, |_| Err(Error::Input("boom".into())));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"three");
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 1);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn replacing_keeps_the_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("mode");
        let d = d.path();
        let p = d.join("w.bin");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_bytes(&p, b"y", WriteMode::Replace).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let fresh = d.join("new.bin");
        write_bytes(&fresh, b"z", WriteMode::NoClobber).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_ne!(mode & 0o044, 0, "a new file is not owner-only: {mode:o}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn output_locations_are_checked_up_front() {
        let d = tmp("loc");
        let d = d.path();
        let sub = d.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        assert!(check_output_location(&sub, true)
            .unwrap_err()
            .to_string()
            .contains("directory"));
        let dangling = d.join("dangling.png");
        std::os::unix::fs::symlink(d.join("nowhere"), &dangling).unwrap();
        assert!(check_output_location(&dangling, true)
            .unwrap_err()
            .to_string()
            .contains("symbolic link"));
        let file = d.join("f.png");
        std::fs::write(&file, b"x").unwrap();
        assert!(check_output_location(&file, false).is_err());
        check_output_location(&file, true).unwrap();
        check_output_location(&d.join("new/deeper/out.png"), false).unwrap();
        // Below a regular file nothing can be created.
        assert!(check_output_location(&file.join("x.png"), false).is_err());
        assert!(same_file(&file, &d.join("sub/../f.png")));
        assert!(!same_file(&file, &d.join("g.png")));
        assert!(check_not_an_input(&d.join("./f.png"), [file.as_path()]).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn the_signal_handler_removes_files_in_flight() {
        let d = tmp("signal");
        let d = d.path();
        let f = d.join(".x.png.abc.tmp");
        std::fs::write(&f, b"partial").unwrap();
        // The registry is global (other tests write in parallel): check the membership, and
        // run the handler's removal on this file alone.
        register(&f);
        let registered = IN_FLIGHT.lock().unwrap().contains(&f);
        unregister(&f);
        assert!(registered && !IN_FLIGHT.lock().unwrap().contains(&f));
        remove_all(&BTreeSet::from([f.clone()]));
        assert!(!f.exists());
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("a\u{1b}[31mb\n"), "a\\u{1b}[31mb\\u{a}");
        assert_eq!(printable("ok é"), "ok é");
    }
}
