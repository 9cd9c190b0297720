use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Args, Subcommand};
use kvpool::{BlockKey, Error, KvBackendExt, PutOutcome};

use crate::{ConfigArgs, OutputArgs};

#[derive(Debug, Subcommand)]
pub(crate) enum StoreCommand {
    /// Store the bytes of --file (or stdin) under --key.
    Put(KeyFileArgs),
    /// Write the value of --key to --file (or stdout). Exit 1 when absent.
    Get(KeyFileArgs),
    /// Print whether --key is present. Exit 1 when absent.
    Exists(KeyArgs),
    /// Remove --key.
    Rm(KeyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct KeyArgs {
    /// The key in vllm-ascend string form:
    /// {model}@pcp{p}@dcp{d}@head_or_tp_rank:{h}@pp_rank:{pp}@{64 hex}
    #[arg(long)]
    key: String,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Args)]
pub(crate) struct KeyFileArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// File to read from (put) or write to (get); `-` or absent for stdin/stdout.
    #[arg(long)]
    file: Option<PathBuf>,
}

pub(crate) fn run(cmd: StoreCommand) -> kvpool::Result<ExitCode> {
    let key_args = match &cmd {
        StoreCommand::Put(a) | StoreCommand::Get(a) => &a.key,
        StoreCommand::Exists(a) | StoreCommand::Rm(a) => a,
    };
    let key = BlockKey::parse(&key_args.key)?;
    let json = key_args.output.json;
    // Read input before connecting, so a missing file leaves the store untouched.
    let input = match &cmd {
        StoreCommand::Put(a) => Some(read_input(a.file.as_ref())?),
        _ => None,
    };
    let config = key_args.config.load(None)?;
    let rt = crate::runtime();
    let backend = rt.block_on(kvpool::open(&config))?;
    let result = rt.block_on(async {
        match &cmd {
            StoreCommand::Put(_) => {
                let value = input.expect("read above");
                let len = value.len();
                let outcome = match backend.put_bytes(key.clone(), value).await? {
                    PutOutcome::Stored => "stored",
                    PutOutcome::Exists => "exists",
                    PutOutcome::Failed(e) => return Err(e),
                };
                report(json, &key, outcome, Some(len));
                Ok(ExitCode::SUCCESS)
            }
            StoreCommand::Get(a) => match backend.get_bytes(&key).await? {
                Some(value) => {
                    write_output(a.file.as_ref(), &value)?;
                    if a.file.is_some() || json {
                        report(json, &key, "hit", Some(value.len()));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    report(json, &key, "miss", None);
                    Ok(ExitCode::FAILURE)
                }
            },
            StoreCommand::Exists(_) => {
                let present = backend.exists(std::slice::from_ref(&key)).await?[0];
                report(json, &key, if present { "present" } else { "absent" }, None);
                Ok(if present {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
            StoreCommand::Rm(_) => {
                backend.remove(std::slice::from_ref(&key)).await?;
                report(json, &key, "removed", None);
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    let closed = rt.block_on(backend.close());
    let code = result?;
    closed?;
    Ok(code)
}

fn report(json: bool, key: &BlockKey, outcome: &str, len: Option<usize>) {
    if json {
        println!(
            "{}",
            serde_json::json!({ "key": key.to_string(), "outcome": outcome, "bytes": len })
        );
    } else {
        match len {
            Some(n) => eprintln!("{outcome}: {key} ({n} bytes)"),
            None => println!("{outcome}"),
        }
    }
}

fn read_input(file: Option<&PathBuf>) -> kvpool::Result<Bytes> {
    let mut buf = Vec::new();
    match file.filter(|p| p.as_os_str() != "-") {
        Some(path) => {
            buf = std::fs::read(path).map_err(|e| {
                Error::invalid_argument(format!("cannot read --file {}", path.display()))
                    .set_source(e)
            })?
        }
        None => {
            std::io::stdin().read_to_end(&mut buf).map_err(|e| {
                Error::invalid_argument("cannot read the value from stdin").set_source(e)
            })?;
        }
    }
    Ok(Bytes::from(buf))
}

fn write_output(file: Option<&PathBuf>, value: &[u8]) -> kvpool::Result<()> {
    let result = match file.filter(|p| p.as_os_str() != "-") {
        Some(path) => std::fs::write(path, value),
        None => std::io::stdout().write_all(value),
    };
    result.map_err(|e| Error::invalid_argument("cannot write the value out").set_source(e))
}
