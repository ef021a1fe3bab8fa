//! `pfstorer ids list|show|rm`: the identities stored by name.

use crate::error::Error;
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
                match Identity::load_file(&path) {
                    Ok(id) => println!(
                        "{name}\t{}\t{:.1} MB\t{} refs",
                        id.metadata.get("date").map(String::as_str).unwrap_or("?"),
                        bytes as f64 / 1e6,
                        id.reference_count().unwrap_or(0)
                    ),
                    Err(e) => println!("{name}\tunreadable: {e}"),
                }
            }
        }
        IdsCommand::Show { id } => {
            let identity = Identity::load(&id)?;
            for (k, v) in &identity.metadata {
                println!("{k}: {v}");
            }
        }
        IdsCommand::Rm { name } => {
            identity::validate_name(&name)?;
            let path = identity::resolve(&name)?;
            if !path.is_file() {
                return Err(Error::Input(format!("no stored identity named {name:?}")).into());
            }
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            eprintln!("removed {}", path.display());
        }
    }
    Ok(())
}
