//! `pfstorer ids list|show|rm`: the identities stored by name.

use crate::error::Error;
use crate::fsutil::{printable, printable_path};
use crate::personalize::identity::{self, Identity};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct IdsArgs {
    #[command(subcommand)]
    pub command: IdsCommand,
}

#[derive(Debug, Subcommand)]
pub enum IdsCommand {
    /// List stored identities (name, date, size, references).
    List,
    /// Summarise an identity (name or path): name, base, date, iterations, references, size.
    Show {
        id: String,
        /// Print the whole stored metadata as one JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Delete an identity: a name in the identity directory, or the path of an identity file
    /// (checked to be one before it is removed).
    Rm { id: String },
}

pub fn run(args: IdsArgs) -> anyhow::Result<()> {
    match args.command {
        IdsCommand::List => {
            let stored = identity::list_stored()?;
            if stored.is_empty() {
                eprintln!("no identities in {}", identity::identities_dir()?.display());
            }
            for (name, path) in stored {
                let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                let name = printable(&name);
                match Identity::load_file(&path) {
                    Ok(id) => println!(
                        "{name}\t{}\t{:.1} MB\t{} refs",
                        printable(id.metadata.get("date").map(String::as_str).unwrap_or("?")),
                        bytes as f64 / 1e6,
                        id.reference_count().unwrap_or(0)
                    ),
                    Err(e) => println!("{name}\tunreadable: {}", printable(&e.to_string())),
                }
            }
        }
        IdsCommand::Show { id, json } => {
            let path = identity::resolve(&id)?;
            let identity = Identity::load(&id)?;
            if json {
                println!("{}", show_json(&identity, &path)?);
            } else {
                print!("{}", show_summary(&identity, &path)?);
            }
        }
        IdsCommand::Rm { id } => {
            let path = identity::resolve(&id)?;
            if identity::is_path_argument(&id) {
                // A path is removed only when its header says it is an identity.
                identity::check_identity_file(&path)?;
            } else {
                // A name: the entry of the identity directory itself goes, also when it is a
                // broken or looping symlink; a link is removed, never what it points to.
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {
                        return Err(Error::Input(format!(
                            "{} is a directory, not an identity",
                            printable_path(&path)
                        ))
                        .into())
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(Error::Input(format!(
                            "no stored identity named {:?} in {}; `pfstorer ids list` shows them",
                            printable(&id),
                            printable_path(&identity::identities_dir()?)
                        ))
                        .into())
                    }
                }
            }
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            eprintln!("removed {}", printable_path(&path));
        }
    }
    Ok(())
}

/// The stored metadata as one JSON object: JSON-valued entries parsed, the rest as strings,
/// plus `path`, `bytes` and `references`.
fn show_json(identity: &Identity, path: &std::path::Path) -> anyhow::Result<String> {
    let mut object = serde_json::Map::new();
    for (k, v) in &identity.metadata {
        let value = match serde_json::from_str::<serde_json::Value>(v) {
            Ok(parsed) if parsed.is_object() || parsed.is_array() => parsed,
            _ => serde_json::Value::String(v.clone()),
        };
        object.insert(k.clone(), value);
    }
    object.insert("path".into(), path.display().to_string().into());
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    object.insert("bytes".into(), bytes.into());
    object.insert("references".into(), identity.reference_count()?.into());
    Ok(serde_json::to_string_pretty(&serde_json::Value::Object(
        object,
    ))?)
}

/// `ids show` for people: one `key: value` line per fact, escaped for the terminal.
fn show_summary(identity: &Identity, path: &std::path::Path) -> anyhow::Result<String> {
    let meta = &identity.metadata;
    let get = |k: &str| {
        meta.get(k)
            .map(|v| printable(v))
            .unwrap_or_else(|| "?".into())
    };
    let training: serde_json::Value = meta
        .get("training")
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    let planned = training["iterations"]
        .as_u64()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "?".into());
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let base = get("base_fingerprint");
    let short_base = base.get(..16).unwrap_or(&base).to_string();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12}{v}\n"));
    line("name:", get("name"));
    line("file:", printable_path(path));
    line("size:", format!("{:.1} MB", bytes as f64 / 1e6));
    line("created:", get("date"));
    line("by:", get("version"));
    line(
        "base:",
        format!("{short_base}… (sha256 of the base weights)"),
    );
    line(
        "iterations:",
        format!("{} of {planned}", get("iterations_done")),
    );
    line("references:", identity.reference_count()?.to_string());
    if let Some(seed) = training.get("seed") {
        line("seed:", seed.to_string());
    }
    if let Some(size) = training.get("size") {
        line("size (px):", size.to_string());
    }
    match identity.reference_embeddings()? {
        Some(e) if !e.is_empty() => {
            let mean = identity.embedding_mean()?.unwrap_or_default();
            let spread: Vec<f32> = e
                .iter()
                .map(|v| crate::faces::embed::descriptor_distance_slices(v, &mean))
                .collect();
            let max = spread.iter().copied().fold(0.0f32, f32::max);
            line(
                "dlib-ID:",
                format!(
                    "{} reference descriptors, distance to their mean {:.2}-{max:.2} (same person under {})",
                    e.len(),
                    spread.iter().copied().fold(f32::INFINITY, f32::min),
                    crate::faces::embed::SAME_PERSON_THRESHOLD
                ),
            );
        }
        _ => line(
            "dlib-ID:",
            "none (made before face embeddings: restore cannot match it to faces automatically)"
                .into(),
        ),
    }
    line(
        "strength:",
        "1.0 by default (restore --id-strength changes it)".into(),
    );
    out.push_str("(all stored metadata: pfstorer ids show --json)\n");
    Ok(out)
}
