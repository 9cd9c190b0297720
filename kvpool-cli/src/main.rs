//! kvpool-cli: the `kvpool` command line — check, store, bench, replay (with the trace
//! generator and plots), demo and soak — over the `kvpool` facade, which links the backends.

mod bench;
mod check;
mod demo;
mod replay;
mod soak;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use kvpool::config::ConfigSources;
use kvpool::{Config, Error, ErrorKind};

#[derive(Debug, Parser)]
#[command(name = "kvpool", version, about = "A KV-cache pool for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the config, open the backend, print it and its capabilities.
    Check(check::CheckArgs),
    /// Raw string-key operations on the configured backend.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Measure put/get/exists throughput against memcpy in the same run.
    Bench(bench::BenchArgs),
    /// Replay a Mooncake-format request trace through an eviction policy.
    Replay(Box<replay::ReplayArgs>),
    /// Run a multi-turn workload through an in-process pool, verifying every byte.
    Demo(demo::DemoArgs),
    /// Run a long mixed put/exists/get load against a backend, verifying every loaded
    /// byte and watching errors, latency and RSS.
    Soak(Box<soak::SoakArgs>),
}

/// Options shared by commands that open a backend.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConfigArgs {
    /// A kvpool TOML config file (default: $KVPOOL_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A JSON object layered on top, as vLLM's kv_connector_extra_config.
    #[arg(long, value_name = "JSON")]
    extra_config: Option<String>,
}

impl ConfigArgs {
    pub(crate) fn load(&self, backend: Option<&str>) -> kvpool::Result<Config> {
        let mut extra = match &self.extra_config {
            Some(text) => serde_json::from_str::<serde_json::Value>(text).map_err(|e| {
                Error::config_invalid(format!("--extra-config is not valid JSON: {e}"))
            })?,
            None => serde_json::Value::Object(Default::default()),
        };
        if let Some(backend) = backend {
            match extra.as_object_mut() {
                Some(obj) => {
                    obj.insert("backend".into(), backend.into());
                }
                None => {
                    return Err(Error::config_invalid(
                        "--extra-config must be a JSON object",
                    ))
                }
            }
        }
        let has_extra = extra.as_object().is_some_and(|o| !o.is_empty()) || !extra.is_object();
        Config::load(&ConfigSources {
            file: self.config.clone(),
            extra_config: has_extra.then_some(extra),
            use_env: true,
        })
    }
}

/// `--json` output switch shared by all commands.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct OutputArgs {
    /// Print one machine-readable JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A progress bar that only appears on a terminal, for work that may take over a second.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len} ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KVPOOL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check(args) => check::run(args),
        Command::Store(cmd) => store::run(cmd),
        Command::Bench(args) => bench::run(args),
        Command::Replay(args) => replay::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Soak(args) => soak::run(*args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            match e.kind() {
                ErrorKind::ConfigInvalid | ErrorKind::InvalidArgument => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
