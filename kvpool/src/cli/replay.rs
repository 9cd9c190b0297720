//! `kvpool replay`: offline hit rates from a Mooncake-format trace.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use kvpool::replay::{parse_watermark, read_trace, ReplayOptions, Replayer};
use kvpool::Error;

use super::OutputArgs;

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The trace: one JSON object per line with `input_length` and `hash_ids`.
    trace: PathBuf,
    /// Pool capacity in tokens (rounded down to whole blocks).
    #[arg(long, conflicts_with = "capacity_blocks")]
    capacity_tokens: Option<u64>,
    /// Pool capacity in blocks.
    #[arg(long)]
    capacity_blocks: Option<u64>,
    /// Tokens per block (the trace's hash_ids are 512-token blocks).
    #[arg(long, default_value_t = 512)]
    block_tokens: u64,
    /// Eviction policy.
    #[arg(long, default_value = "lru")]
    policy: String,
    /// Batch eviction as the backends do it: HIGH,RATIO (e.g. 0.9,0.05).
    /// Default: evict one block at a time when full.
    #[arg(long, value_name = "HIGH,RATIO")]
    watermark: Option<String>,
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

pub(crate) fn run(args: ReplayArgs) -> kvpool::Result<ExitCode> {
    let mut opts = ReplayOptions {
        block_tokens: args.block_tokens,
        policy: args.policy.clone(),
        capacity_blocks: args.capacity_blocks,
        watermark: args.watermark.as_deref().map(parse_watermark).transpose()?,
    };
    if let Some(tokens) = args.capacity_tokens {
        opts = opts.with_capacity_tokens(tokens)?;
    }
    let mut replayer = Replayer::new(&opts)?;
    let file = File::open(&args.trace).map_err(|e| {
        Error::invalid_argument(format!("cannot open trace {}", args.trace.display())).set_source(e)
    })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = super::progress(len, "replay");
    let reader = BufReader::new(Counting {
        inner: file,
        bar: bar.clone(),
    });
    for request in read_trace(reader) {
        let request = request.map_err(|e| e.with_context("trace", args.trace.display()))?;
        replayer.feed(&request);
    }
    bar.finish_and_clear();
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
