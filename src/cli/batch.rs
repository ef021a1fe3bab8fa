//! Pieces every batch subcommand (`degrade`, `restore`) shares: turning the command-line inputs
//! into a file list, naming outputs, the existing-output policy, progress and the final summary.
//!
//! Input expansion: a file is taken as is (whatever its extension; a non-image then fails with
//! a reason); a directory contributes its image files (by extension, not recursive, sorted by
//! name); a pattern with `*`, `?` or `[...]` in its last component matches files of that
//! directory (for shells that do not expand, and for quoted patterns). Anything else, and a
//! pattern matching nothing, becomes a failed item. Repeated paths are kept once.
//!
//! Output naming: `<stem><suffix>.<ext>` in the output directory. Inputs that share a stem
//! (`a.jpg`, `a.png`) carry their extension in the stem instead (`a_jpg<suffix>`, `a_png<suffix>`);
//! inputs from different directories with the same file name get `_2`, `_3`, ... in input order.

use crate::imaging::io::has_image_extension;
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// One entry of the expanded input list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputItem {
    /// A file to process.
    File(PathBuf),
    /// A command-line argument that yields nothing usable, with the reason.
    Invalid { arg: PathBuf, reason: String },
}

/// Expands files, directories and patterns; see the module documentation.
pub fn expand_inputs(args: &[PathBuf]) -> Vec<InputItem> {
    let mut items = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |items: &mut Vec<InputItem>, path: PathBuf| {
        if seen.insert(path.clone()) {
            items.push(InputItem::File(path));
        }
    };
    for arg in args {
        let invalid = |reason: &str| InputItem::Invalid {
            arg: arg.clone(),
            reason: reason.to_string(),
        };
        if arg.is_dir() {
            match crate::fsutil::list_files(arg, has_image_extension) {
                Ok(files) if files.is_empty() => items.push(invalid("no image files in directory")),
                Ok(files) => files.into_iter().for_each(|f| push(&mut items, f)),
                Err(e) => items.push(invalid(&format!("cannot list directory ({e})"))),
            }
        } else if arg.is_file() {
            push(&mut items, arg.clone());
        } else if arg.exists() {
            // Reading a FIFO blocks and a device never ends: refused at once, never opened.
            items.push(invalid("not a regular file (a FIFO, device or socket)"));
        } else if let Some(pattern) = arg
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| is_pattern(n))
        {
            let dir = match arg.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let pattern: Vec<char> = pattern.chars().collect();
            let matcher = |p: &Path| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .map(|n| wildcard_match(&pattern, &n.chars().collect::<Vec<_>>()))
                    .unwrap_or(false)
            };
            match crate::fsutil::list_files(&dir, matcher) {
                Ok(files) if files.is_empty() => items.push(invalid("pattern matches no file")),
                Ok(files) => files.into_iter().for_each(|f| push(&mut items, f)),
                Err(e) => items.push(invalid(&format!("cannot list directory ({e})"))),
            }
        } else {
            items.push(invalid("no such file or directory"));
        }
    }
    items
}

fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// Shell-style match of a whole name: `*` any run, `?` one character, `[abc]`/`[a-z]`/`[!a]`
/// one character of a set.
pub fn wildcard_match(pattern: &[char], name: &[char]) -> bool {
    match pattern.first() {
        None => name.is_empty(),
        Some('*') => (0..=name.len()).any(|i| wildcard_match(&pattern[1..], &name[i..])),
        Some('?') => !name.is_empty() && wildcard_match(&pattern[1..], &name[1..]),
        Some('[') => {
            let Some(close) = pattern
                .iter()
                .skip(2)
                .position(|&c| c == ']')
                .map(|i| i + 2)
            else {
                return name.first() == Some(&'[') && wildcard_match(&pattern[1..], &name[1..]);
            };
            let Some(&c) = name.first() else { return false };
            let mut set = &pattern[1..close];
            let negate = matches!(set.first(), Some('!') | Some('^'));
            if negate {
                set = &set[1..];
            }
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == '-' {
                    hit |= set[i] <= c && c <= set[i + 2];
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            hit != negate && wildcard_match(&pattern[close + 1..], &name[1..])
        }
        Some(&p) => name.first() == Some(&p) && wildcard_match(&pattern[1..], &name[1..]),
    }
}

/// Output paths for `inputs`, one each, following the naming rule of the module documentation.
pub fn output_paths(inputs: &[PathBuf], out_dir: &Path, suffix: &str, ext: &str) -> Vec<PathBuf> {
    let stem_of = |p: &PathBuf| {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".to_string())
    };
    let mut stem_count: HashMap<String, usize> = HashMap::new();
    for input in inputs {
        *stem_count.entry(stem_of(input)).or_default() += 1;
    }
    let mut used: HashMap<String, usize> = HashMap::new();
    inputs
        .iter()
        .map(|input| {
            let mut stem = stem_of(input);
            if stem_count[&stem] > 1 {
                if let Some(e) = input.extension() {
                    stem = format!("{stem}_{}", e.to_string_lossy());
                }
            }
            let n = used.entry(stem.clone()).or_default();
            *n += 1;
            if *n > 1 {
                stem = format!("{stem}_{n}");
            }
            out_dir.join(format!("{stem}{suffix}.{ext}"))
        })
        .collect()
}

/// What to do when an output file exists already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingPolicy {
    /// Count the item as failed (the default: nothing is replaced by accident).
    Fail,
    /// Count the item as skipped, without an error.
    Skip,
    /// Replace the file (`--force`).
    Overwrite,
}

impl ExistingPolicy {
    pub fn from_flags(force: bool, skip_existing: bool) -> Self {
        match (force, skip_existing) {
            (true, _) => ExistingPolicy::Overwrite,
            (false, true) => ExistingPolicy::Skip,
            (false, false) => ExistingPolicy::Fail,
        }
    }

    pub fn overwrite(self) -> bool {
        self == ExistingPolicy::Overwrite
    }
}

/// The outcome of one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Skipped(String),
    Failed(String),
}

/// Decides before any work whether an item goes ahead with its output: never over one of the
/// batch's inputs (whatever the policy), never onto a directory or a dangling symlink, only
/// into a directory that accepts files, and over an existing file only as the policy says.
/// The inputs' identities are read once and each output directory is probed once, so a batch
/// of n files costs O(n) file-system calls.
pub struct OutputChecks<'a> {
    inputs: &'a [PathBuf],
    input_ids: HashMap<crate::fsutil::FileId, usize>,
    policy: ExistingPolicy,
    /// Probed directories and, for unusable ones, why.
    probed: HashMap<PathBuf, Option<String>>,
}

impl<'a> OutputChecks<'a> {
    pub fn new(inputs: &'a [PathBuf], policy: ExistingPolicy) -> Self {
        let input_ids = inputs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| crate::fsutil::file_id(p).map(|id| (id, i)))
            .collect();
        OutputChecks {
            inputs,
            input_ids,
            policy,
            probed: HashMap::new(),
        }
    }

    /// `None` when the item goes ahead, else its outcome.
    pub fn check(&mut self, output: &Path) -> Option<Outcome> {
        let failed = |e: crate::Error| Some(Outcome::Failed(e.to_string()));
        // Inputs exist, so only an existing output can be one of them.
        if let Some(&i) = crate::fsutil::file_id(output)
            .as_ref()
            .and_then(|id| self.input_ids.get(id))
        {
            return failed(crate::fsutil::is_an_input_error(output, &self.inputs[i]));
        }
        if std::fs::symlink_metadata(output).is_ok() {
            // Existing: a directory or a broken link is never replaced, a file only as allowed.
            if let Err(e) = crate::fsutil::check_output_name(output, true) {
                return failed(e);
            }
            if let Some(outcome) = check_existing(output, self.policy) {
                return Some(outcome);
            }
        }
        let dir = crate::fsutil::parent_dir(output);
        let why = self.probed.entry(dir).or_insert_with_key(|dir| {
            crate::fsutil::check_writable_dir(dir)
                .err()
                .map(|e| e.to_string())
        });
        why.clone().map(Outcome::Failed)
    }
}

/// A name suffix is a plain file-name fragment: no path separators, so an output always lands
/// in its directory.
pub fn check_suffix(flag: &str, suffix: &str) -> Result<()> {
    if suffix.contains(['/', '\\', '\0']) {
        anyhow::bail!(
            "{flag} {:?}: must be a plain file-name fragment (no '/', '\\' or NUL)",
            crate::fsutil::printable(suffix)
        );
    }
    Ok(())
}

/// Whether an existing output (a file) stops this item, by `policy`.
pub fn check_existing(output: &Path, policy: ExistingPolicy) -> Option<Outcome> {
    if !output.exists() || policy == ExistingPolicy::Overwrite {
        return None;
    }
    Some(match policy {
        ExistingPolicy::Skip => Outcome::Skipped(format!("{} exists", output.display())),
        _ => Outcome::Failed(format!(
            "{} exists (use --force to overwrite or --skip-existing)",
            output.display()
        )),
    })
}

/// Counts and reasons collected over a batch.
#[derive(Debug)]
pub struct Summary {
    pub done: usize,
    /// Faces restored over the batch (a face crop restored whole counts its face; a photo
    /// restored whole without detection, none).
    pub faces: usize,
    pub skipped: Vec<(PathBuf, String)>,
    pub failed: Vec<(PathBuf, String)>,
    /// Output names of recorded inputs, where known (for `--report`).
    pub outputs: HashMap<PathBuf, PathBuf>,
    /// When the batch started (the summary gives its wall time).
    pub started: std::time::Instant,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            done: 0,
            faces: 0,
            skipped: Vec::new(),
            failed: Vec::new(),
            outputs: HashMap::new(),
            started: std::time::Instant::now(),
        }
    }
}

impl Summary {
    /// [`Summary::record`], keeping the item's output name.
    pub fn record_with_output(&mut self, input: &Path, output: &Path, outcome: Outcome) {
        self.outputs
            .insert(input.to_path_buf(), output.to_path_buf());
        self.record(input, outcome);
    }

    pub fn record(&mut self, input: &Path, outcome: Outcome) {
        match outcome {
            Outcome::Done => self.done += 1,
            Outcome::Skipped(why) => self.skipped.push((input.to_path_buf(), why)),
            Outcome::Failed(why) => self.failed.push((input.to_path_buf(), why)),
        }
    }

    /// `N done, M skipped, K failed` (and `; F faces restored` when faces were).
    pub fn line(&self) -> String {
        let faces = if self.faces > 0 {
            format!(
                "; {} face{} restored",
                self.faces,
                if self.faces == 1 { "" } else { "s" }
            )
        } else {
            String::new()
        };
        format!(
            "{} done, {} skipped, {} failed{faces}",
            self.done,
            self.skipped.len(),
            self.failed.len()
        )
    }

    /// The summary line with the batch's wall time, then one line per skipped and failed
    /// item, for stderr.
    pub fn report(&self) -> String {
        use crate::fsutil::{printable, printable_path};
        let mut out = format!(
            "{} in {}",
            self.line(),
            crate::cli::restore::human_duration(self.started.elapsed().as_secs_f64())
        );
        for (input, why) in &self.skipped {
            out.push_str(&format!(
                "\nskipped {}: {}",
                printable_path(input),
                printable(why)
            ));
        }
        for (input, why) in &self.failed {
            out.push_str(&format!(
                "\nfailed {}: {}",
                printable_path(input),
                printable(why)
            ));
        }
        out
    }

    /// Prints the report to stderr; an error when anything failed (so the exit code is not 0).
    pub fn finish(&self) -> Result<()> {
        eprintln!("{}", self.report());
        if self.failed.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("{} of {} inputs failed", self.failed.len(), self.total())
        }
    }

    pub fn total(&self) -> usize {
        self.done + self.skipped.len() + self.failed.len()
    }
}

/// A progress bar on stderr, hidden with `quiet` or when stderr is not a terminal.
pub fn progress_bar(len: usize, quiet: bool) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// Seed for one image of a batch: a mix (SplitMix64) of the base seed and a hash (FNV-1a) of
/// the input's file name, so an image gets the same seed whatever else is in the batch, and
/// different images get unrelated seeds.
pub fn per_image_seed(base: u64, input: &Path) -> u64 {
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = crate::seeds::fnv1a(name.as_bytes());
    crate::seeds::mix64((base ^ hash).wrapping_add(crate::seeds::GOLDEN))
}

/// The error text without a leading `<path>: ` (the summary names the input already).
pub fn reason(err: &crate::Error, path: &Path) -> String {
    let text = err.to_string();
    let prefix = format!("{}: ", path.display());
    text.strip_prefix(&prefix).unwrap_or(&text).to_string()
}

/// One item's failure as the summary shows it, for an `anyhow` chain.
pub fn reason_any(err: &anyhow::Error, path: &Path) -> String {
    let text = super::error_line(err);
    let prefix = format!("{}: ", crate::fsutil::printable_path(path));
    text.strip_prefix(&prefix).unwrap_or(&text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, n: &str) -> bool {
        wildcard_match(
            &p.chars().collect::<Vec<_>>(),
            &n.chars().collect::<Vec<_>>(),
        )
    }

    #[test]
    fn wildcards() {
        assert!(m("*.jpg", "a.jpg"));
        assert!(!m("*.jpg", "a.jpeg"));
        assert!(m("img_??.png", "img_01.png"));
        assert!(m("[ab]*", "b.png"));
        assert!(!m("[!ab]*", "b.png"));
        assert!(m("[0-9].png", "7.png"));
    }

    #[test]
    fn colliding_names() {
        let inputs: Vec<PathBuf> = ["x/a.jpg", "x/a.png", "x/b.png", "y/b.png"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let outs = output_paths(&inputs, Path::new("o"), "_light", "png");
        let names: Vec<_> = outs
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "o/a_jpg_light.png",
                "o/a_png_light.png",
                "o/b_png_light.png",
                "o/b_png_2_light.png"
            ]
        );
    }
}
