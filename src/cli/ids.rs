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
    /// Print an identity's metadata (name or path).
    Show { id: String },
    /// Delete a stored identity.
    Rm { name: String },
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
        IdsCommand::Show { id } => {
            let identity = Identity::load(&id)?;
            // Metadata comes from the file: escape anything a terminal would act on.
            for (k, v) in &identity.metadata {
                println!("{}: {}", printable(k), printable(v));
            }
        }
        IdsCommand::Rm { name } => {
            identity::validate_name(&name)?;
            let path = identity::resolve(&name)?;
            // The stored entry itself goes, also when it is a broken or looping symlink; a
            // link is removed, never what it points to.
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
                    return Err(Error::Input(format!("no stored identity named {name:?}")).into())
                }
            }
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            eprintln!("removed {}", printable_path(&path));
        }
    }
    Ok(())
}
