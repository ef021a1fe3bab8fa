//! `--shard K/N|auto`: which files of a batch this process restores, so that N processes (a
//! Slurm job array, `xargs -P` workers on several GPUs) cover a folder with no coordination.
//!
//! Convention: `K/N` is 1-based, `1 <= K <= N` (`--shard 1/4` ... `--shard 4/4`), as people
//! write it by hand. `auto` reads Slurm's job-array variables: the 0-based shard is
//! `(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP` (step 1 when unset)
//! and the count is `SLURM_ARRAY_TASK_COUNT`, so `--array=0-7`, `--array=1-8` and
//! `--array=10-24:2` all work; an array with gaps (`--array=1,3,7`) is refused.
//!
//! Split: a file belongs to shard `mix64(fnv1a(file name)) mod N` (0-based). The decision
//! depends on the file's name only, never on the rest of the list or on how its folder was
//! spelled (`photos/`, `./photos`, an absolute path), so every file lands in exactly one shard
//! even when the tasks start at different times over a folder still being filled, and a rerun
//! of one task with `--skip-existing` after files were added still owns the same old files.
//! Files with the same name in different folders go to the same shard. The split is even in
//! expectation (a hash, not a stride): each shard gets close to 1/N of the files, within a
//! few percent for thousands of files. The list itself keeps its order (arguments in order,
//! folders sorted by name); output names are chosen over the whole list before the split.

use clap::Args;
use std::fmt;
use std::path::Path;

/// The `--shard` flag of `restore`.
#[derive(Debug, Clone, Default, Args)]
pub struct ShardFlag {
    /// Restore only this process's share of the inputs: K/N (1-based, 1 <= K <= N) or auto
    /// (from SLURM_ARRAY_TASK_ID, _MIN and _COUNT). Each file goes to one shard by a hash of
    /// its file name, so N processes cover every file exactly once; see "Large collections"
    /// in the README.
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<String>,
}

impl ShardFlag {
    /// The shard named by the flag (`None` without it), reading Slurm's variables for `auto`.
    pub fn resolve(&self) -> anyhow::Result<Option<Shard>> {
        match &self.shard {
            None => Ok(None),
            Some(spec) => parse_shard(spec, |name| std::env::var(name).ok()).map(Some),
        }
    }
}

/// One shard of a batch: `index` is 0-based, `index < count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    index: usize,
    count: usize,
}

impl Shard {
    /// The 0-based shard `index` of `count`.
    pub fn new(index: usize, count: usize) -> anyhow::Result<Self> {
        if count == 0 || index >= count {
            anyhow::bail!("shard {index} of {count}: needs 0 <= index < count");
        }
        Ok(Shard { index, count })
    }

    /// 0-based index.
    pub fn index(self) -> usize {
        self.index
    }

    pub fn count(self) -> usize {
        self.count
    }

    /// Whether `path` belongs to this shard.
    pub fn owns(self, path: &Path) -> bool {
        shard_of(path, self.count) == self.index
    }
}

/// `K/N`, 1-based as `--shard` takes it.
impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index + 1, self.count)
    }
}

/// The 0-based shard of `path` among `count` (`count > 0`), from its file name alone.
pub fn shard_of(path: &Path, count: usize) -> usize {
    let name = path.file_name().unwrap_or(path.as_os_str());
    let hash = crate::seeds::mix64(crate::seeds::fnv1a(name.as_encoded_bytes()));
    (hash % count as u64) as usize
}

/// Parses `K/N` (1-based) or `auto`; `env` looks up an environment variable (`auto` only).
/// The error is one line naming the flag.
pub fn parse_shard(spec: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Shard> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("auto") {
        return shard_from_slurm(env)
            .map_err(|why| anyhow::anyhow!("--shard auto: {why}; or give --shard K/N"));
    }
    let bad = |why: &str| anyhow::anyhow!("--shard {spec}: {why}");
    let (k, n) = spec
        .split_once('/')
        .ok_or_else(|| bad("expected K/N (1-based, e.g. 1/4) or auto"))?;
    let number = |text: &str| text.trim().parse::<usize>().ok();
    let (Some(k), Some(n)) = (number(k), number(n)) else {
        return Err(bad("K and N must be whole numbers (1-based K/N, e.g. 1/4)"));
    };
    if n == 0 {
        return Err(bad("N must be at least 1"));
    }
    if k == 0 {
        return Err(bad(&format!(
            "K is 1-based: the shards are 1/{n} to {n}/{n}"
        )));
    }
    if k > n {
        return Err(bad(&format!("K must be between 1 and {n}")));
    }
    Shard::new(k - 1, n)
}

/// The shard of this Slurm array task; the error says which variable is missing or wrong.
fn shard_from_slurm(env: impl Fn(&str) -> Option<String>) -> Result<Shard, String> {
    let read = |name: &str| -> Result<Option<usize>, String> {
        match env(name) {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse::<usize>()
                .map(Some)
                .map_err(|_| format!("{name}={v:?} is not a whole number")),
        }
    };
    let need = |name: &str| -> Result<usize, String> {
        read(name)?.ok_or_else(|| format!("{name} is not set (not a Slurm job array task)"))
    };
    let id = need("SLURM_ARRAY_TASK_ID")?;
    let count = need("SLURM_ARRAY_TASK_COUNT")?;
    let min = need("SLURM_ARRAY_TASK_MIN")?;
    let step = read("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
    let offset = id
        .checked_sub(min)
        .ok_or_else(|| format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}"))?;
    let index = offset / step;
    if count == 0 || offset % step != 0 || index >= count {
        return Err(format!(
            "task {id} of an array from {min} with {count} tasks (step {step}) is not a \
             contiguous range; use --array=A-B or --array=A-B:S"
        ));
    }
    Ok(Shard { index, count })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// Photo-archive-like names: camera counters, dated names, a few odd ones.
    fn names(len: usize) -> Vec<PathBuf> {
        (0..len)
            .map(|i| match i % 3 {
                0 => PathBuf::from(format!("photos/IMG_{i:04}.JPG")),
                1 => PathBuf::from(format!("photos/2019-07-{:02} {i}.png", i % 28 + 1)),
                _ => PathBuf::from(format!("/abs/scan {i} (copy).tif")),
            })
            .collect()
    }

    #[test]
    fn one_based_specs_parse() {
        assert_eq!(
            parse_shard("1/1", no_env).unwrap(),
            Shard::new(0, 1).unwrap()
        );
        assert_eq!(
            parse_shard("3/4", no_env).unwrap(),
            Shard::new(2, 4).unwrap()
        );
        assert_eq!(parse_shard(" 4/4 ", no_env).unwrap().to_string(), "4/4");
    }

    #[test]
    fn impossible_specs_are_one_line_errors_naming_the_flag() {
        for spec in [
            "3/2", "0/0", "0/3", "1/0", "x/2", "1/y", "-1/2", "1.5/2", "12", "", "auto2", "1/2/3",
        ] {
            let err = parse_shard(spec, no_env).expect_err(spec).to_string();
            assert!(err.starts_with("--shard "), "{spec}: {err}");
            assert!(!err.contains('\n'), "{spec}: {err}");
        }
    }

    #[test]
    fn every_file_lands_in_exactly_one_shard() {
        for len in [0, 1, 2, 3, 7, 13, 101] {
            let files = names(len);
            for count in 1..=5 {
                let shards: Vec<Shard> =
                    (0..count).map(|k| Shard::new(k, count).unwrap()).collect();
                for file in &files {
                    let owners = shards.iter().filter(|s| s.owns(file)).count();
                    assert_eq!(owners, 1, "{} with {count} shards", file.display());
                }
            }
        }
    }

    #[test]
    fn the_owner_depends_on_the_file_name_only() {
        for count in 1..=9 {
            for file in names(50) {
                let name = PathBuf::from(file.file_name().unwrap());
                let elsewhere = Path::new("/mnt/other/../x").join(&name);
                assert_eq!(shard_of(&file, count), shard_of(&name, count));
                assert_eq!(shard_of(&file, count), shard_of(&elsewhere, count));
            }
        }
    }

    /// A hash, not a stride: still, each of N shards of a few thousand files gets close to its
    /// share (the binomial spread is about 3% of a share here; 15% is five of those).
    #[test]
    fn shards_are_balanced() {
        let files = names(4000);
        for count in [2, 3, 5, 8, 16] {
            let mut sizes = vec![0usize; count];
            for f in &files {
                sizes[shard_of(f, count)] += 1;
            }
            let share = files.len() as f64 / count as f64;
            for (k, &n) in sizes.iter().enumerate() {
                let off = (n as f64 - share).abs() / share;
                assert!(off < 0.15, "shard {k} of {count}: {n} files vs {share}");
            }
        }
    }

    #[test]
    fn slurm_arrays_map_to_zero_based_shards() {
        // --array=0-3: task ids 0..=3.
        for id in 0..4 {
            let env = env_of(&[
                ("SLURM_ARRAY_TASK_ID", &id.to_string()),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
            ]);
            assert_eq!(
                parse_shard("auto", env).unwrap(),
                Shard::new(id, 4).unwrap()
            );
        }
        // --array=1-4: id 1 is the first shard (printed 1/4).
        let env = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
        ]);
        assert_eq!(parse_shard("AUTO", env).unwrap().to_string(), "1/4");
        // --array=10-16:2: ids 10, 12, 14, 16.
        let env = env_of(&[
            ("SLURM_ARRAY_TASK_ID", "14"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_MIN", "10"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(parse_shard("auto", env).unwrap(), Shard::new(2, 4).unwrap());
    }

    #[test]
    fn auto_without_a_usable_array_is_refused() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[
                ("SLURM_ARRAY_TASK_ID", "1"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            &[
                ("SLURM_ARRAY_TASK_ID", "x"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
            ],
            // --array=1,3,7: three tasks, id 7 is not the third of a range.
            &[
                ("SLURM_ARRAY_TASK_ID", "7"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
            ],
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1"),
            ],
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_COUNT", "0"),
                ("SLURM_ARRAY_TASK_MIN", "0"),
            ],
        ];
        for pairs in cases {
            let err = parse_shard("auto", env_of(pairs)).expect_err("refused");
            let line = err.to_string();
            assert!(line.starts_with("--shard auto: "), "{pairs:?}: {line}");
            assert!(!line.contains('\n'), "{line}");
        }
    }
}
