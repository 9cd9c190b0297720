//! `kvpool replay`: hit rates from a Mooncake-format trace, offline through
//! the eviction policy alone, or with real bytes through a backend.
//!
//! - One capacity and one policy: the totals of one replay (as before).
//! - `--sweep` (or several `--policy`): a table of token hit ratio per
//!   capacity and policy against the unbounded maximum, optionally drawn
//!   with `--plot`.
//! - `--payload SIZE --backend B`: every block becomes a value that is put,
//!   loaded and verified, so the figures are the pool's own.

mod payload;
mod plot;
mod sweep;
mod trace;
mod workload;

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use kvpool::eviction::DEFAULT_POLICY;
use kvpool::size::ByteSize;
use kvpool::Error;
use trace::{parse_watermark, read_trace, ReplayOptions, Replayer, TraceRequest};
use workload::Workload;

use crate::{ConfigArgs, OutputArgs};

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The trace: one JSON object per line with `input_length` and `hash_ids`
    /// (and `timestamp` in ms, for --respect-timestamps).
    #[arg(required_unless_present = "generate", conflicts_with = "generate")]
    trace: Option<PathBuf>,
    /// Replay a generated workload instead of a file: chat, system-prompts or agents.
    #[arg(long, value_name = "KIND")]
    generate: Option<String>,
    /// Seed of --generate.
    #[arg(long, default_value_t = 1, requires = "generate")]
    seed: u64,
    /// Size of --generate: 1.0 is 9-33 thousand requests.
    #[arg(long, default_value_t = 1.0, requires = "generate")]
    scale: f64,
    /// Also write the generated trace to FILE (JSON lines, Mooncake's format).
    #[arg(long, value_name = "FILE", requires = "generate")]
    save_trace: Option<PathBuf>,
    /// Pool capacity in tokens (rounded down to whole blocks).
    #[arg(long, conflicts_with_all = ["capacity_blocks", "sweep"])]
    capacity_tokens: Option<u64>,
    /// Pool capacity in blocks.
    #[arg(long, conflicts_with = "sweep")]
    capacity_blocks: Option<u64>,
    /// Capacities in tokens to compare, e.g. 1e5,1e6,3e6,1e7,5e7 (k, M, G suffixes work too).
    #[arg(long, value_name = "LIST")]
    sweep: Option<String>,
    /// Tokens per block (the trace's hash_ids are 512-token blocks).
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// Eviction policy: chain (the backends' default) or lru. Repeat it, or
    /// give a comma-separated list, to compare (a sweep compares lru and
    /// chain unless told otherwise).
    #[arg(long, value_delimiter = ',')]
    policy: Vec<String>,
    /// Batch eviction as the backends do it: HIGH,RATIO (e.g. 0.9,0.05).
    /// Default: evict one block at a time when full.
    #[arg(long, value_name = "HIGH,RATIO")]
    watermark: Option<String>,
    /// Draw the sweep: hit ratio against capacity on a log axis, one line per
    /// policy (FILE ends in .svg or .png).
    #[arg(long, value_name = "FILE", requires = "sweep")]
    plot: Option<PathBuf>,
    /// Move real bytes: one value of SIZE per block (e.g. 64KiB), put, loaded
    /// and verified through --backend.
    #[arg(long, value_name = "SIZE", requires = "backend", conflicts_with_all = ["sweep", "watermark"])]
    payload: Option<ByteSize>,
    /// The backend --payload goes through (overrides the config's `backend`).
    #[arg(long, requires = "payload")]
    backend: Option<String>,
    /// With --payload: send each request at its trace timestamp.
    #[arg(long, requires = "payload")]
    respect_timestamps: bool,
    /// With --respect-timestamps: replay this many times faster than recorded.
    #[arg(long, default_value_t = 1.0, requires = "respect_timestamps")]
    speed: f64,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Counts bytes read so the progress bar can follow the file.
struct Counting<R> {
    inner: R,
    bar: indicatif::ProgressBar,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// The requests to replay and what to call them in reports.
struct Trace {
    name: String,
    requests: Vec<TraceRequest>,
}

pub(crate) fn run(args: ReplayArgs) -> kvpool::Result<ExitCode> {
    let policies = policies(&args)?;
    let base = ReplayOptions {
        block_tokens: args.block_tokens,
        policy: policies[0].clone(),
        capacity_blocks: args.capacity_blocks,
        watermark: args.watermark.as_deref().map(parse_watermark).transpose()?,
    };
    let mut opts = base.clone();
    if let Some(tokens) = args.capacity_tokens {
        opts = opts.with_capacity_tokens(tokens)?;
    }
    if args.watermark.is_some() && opts.capacity_blocks.is_none() && args.sweep.is_some() {
        // A sweep always has capacities; validate the watermark against one.
        opts.capacity_blocks = Some(1);
    }
    opts.validate()?;
    let capacities = args
        .sweep
        .as_deref()
        .map(|list| sweep::parse_capacities(list, args.block_tokens))
        .transpose()?;
    if let Some(plot) = &args.plot {
        plot::check_path(plot)?;
    }
    if args.payload.is_some() && policies.len() > 1 {
        return Err(Error::invalid_argument(
            "--payload replays one policy; give --policy once",
        ));
    }

    let trace = load(&args)?;
    if let Some(size) = args.payload {
        let payload_args = payload::PayloadArgs {
            size,
            backend: args
                .backend
                .clone()
                .expect("clap: --payload requires --backend"),
            config: args.config.clone(),
            policy: (!args.policy.is_empty()).then(|| policies[0].clone()),
            respect_timestamps: args.respect_timestamps,
            speed: args.speed,
        };
        return payload::run(&trace.requests, &opts, &payload_args, args.output.json);
    }
    if capacities.is_some() || policies.len() > 1 {
        let capacities = match capacities {
            Some(c) => c,
            None => vec![opts
                .capacity_blocks
                .map_or(sweep::Capacity::Unbounded, |blocks| {
                    sweep::Capacity::Blocks {
                        tokens: blocks * args.block_tokens,
                        blocks,
                    }
                })],
        };
        let table = sweep::run(&trace.requests, &base, &capacities, &policies)?;
        if let Some(path) = &args.plot {
            plot::draw(path, &trace.name, &table)?;
        }
        if args.output.json {
            println!("{}", serde_json::to_string(&table).expect("serializable"));
        } else {
            sweep::print(&trace.name, &table, args.plot.as_deref());
        }
        return Ok(ExitCode::SUCCESS);
    }

    let mut replayer = Replayer::new(&opts)?;
    for request in &trace.requests {
        replayer.feed(request);
    }
    let report = replayer.report();
    if args.output.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        let capacity = report.capacity_blocks.map_or("unbounded".to_string(), |b| {
            format!("{b} blocks ({} tokens)", b * args.block_tokens)
        });
        println!("requests         {}", report.requests);
        println!("policy           {}", report.policy);
        println!("capacity         {capacity}");
        println!("token hit ratio  {:.3}", report.token_hit_ratio);
        println!("block hit ratio  {:.3}", report.block_hit_ratio);
        println!("evictions        {}", report.evictions);
    }
    Ok(ExitCode::SUCCESS)
}

/// The policies asked for, canonical and de-duplicated, each checked by name.
fn policies(args: &ReplayArgs) -> kvpool::Result<Vec<String>> {
    let asked: Vec<String> = if args.policy.is_empty() {
        if args.sweep.is_some() {
            vec!["lru".into(), DEFAULT_POLICY.into()]
        } else {
            vec![DEFAULT_POLICY.into()]
        }
    } else {
        args.policy.clone()
    };
    let mut out: Vec<String> = Vec::new();
    for name in asked {
        let name = name.trim().to_ascii_lowercase();
        let canonical = kvpool::eviction::policy_by_name::<u64>(&name)
            .map_err(|e| Error::invalid_argument(format!("--policy: {}", e.message())))?
            .name()
            .to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

fn load(args: &ReplayArgs) -> kvpool::Result<Trace> {
    if let Some(kind) = &args.generate {
        let workload: Workload = kind
            .parse()
            .map_err(|e: Error| Error::invalid_argument(format!("--generate: {}", e.message())))?;
        let requests = workload.generate(args.seed, args.scale)?;
        if let Some(path) = &args.save_trace {
            save(path, &requests)?;
        }
        return Ok(Trace {
            name: format!("generated {workload} (seed {})", args.seed),
            requests,
        });
    }
    let path = args.trace.as_ref().expect("clap: TRACE or --generate");
    let file = File::open(path).map_err(|e| {
        Error::invalid_argument(format!("cannot open trace {}", path.display())).set_source(e)
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = crate::progress(len, "read trace");
    let reader = BufReader::new(Counting {
        inner: file,
        bar: bar.clone(),
    });
    let requests = read_trace(reader)
        .map(|r| r.map_err(|e| e.with_context("trace", path.display())))
        .collect::<kvpool::Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    Ok(Trace { name, requests })
}

fn save(path: &Path, requests: &[TraceRequest]) -> kvpool::Result<()> {
    let fail = |e: std::io::Error| {
        Error::invalid_argument(format!("cannot write --save-trace {}", path.display()))
            .set_source(e)
    };
    let mut out = BufWriter::new(File::create(path).map_err(fail)?);
    for r in requests {
        serde_json::to_writer(&mut out, r).expect("a trace request serializes");
        out.write_all(b"\n").map_err(fail)?;
    }
    out.flush().map_err(fail)
}
