//! `kvpool demo`: the main job on an embedded default.
//!
//! A generated multi-turn chat workload (a system prompt shared by every
//! session, each turn extending its session's history) goes through an
//! in-process pool on the memory backend the way the connector drives it:
//! hash the prompt's full blocks, find the longest present prefix, load it
//! into a paged KV buffer, "compute" the rest and store it. Every loaded byte
//! is checked against what was stored for that block.

use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kvpool::hash::token_block_hashes;
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, Config, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    MemRegion, Namespace, PutOutcome,
};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

use crate::OutputArgs;

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Concurrent chat sessions.
    #[arg(long, default_value_t = 16)]
    sessions: usize,
    /// Turns per session.
    #[arg(long, default_value_t = 6)]
    turns: usize,
    /// Tokens of the system prompt every session shares.
    #[arg(long, default_value_t = 2048)]
    system_tokens: usize,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 128)]
    block_tokens: usize,
    /// KV bytes per token on this rank (all layers, K and V).
    #[arg(long, default_value = "2KiB")]
    kv_bytes_per_token: ByteSize,
    /// Pool capacity.
    #[arg(long, default_value = "1GiB")]
    capacity: ByteSize,
    /// Workload seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Print the pool's Prometheus metrics at the end.
    #[arg(long)]
    metrics: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Default, Serialize)]
struct DemoReport {
    requests: u64,
    prompt_tokens: u64,
    hit_tokens: u64,
    token_hit_ratio: f64,
    blocks_loaded: u64,
    blocks_stored: u64,
    bytes_loaded: u64,
    bytes_stored: u64,
    bytes_verified: u64,
    load_gbps: f64,
    store_gbps: f64,
    seconds: f64,
}

pub(crate) fn run(args: DemoArgs) -> kvpool::Result<ExitCode> {
    if args.block_tokens == 0 || args.kv_bytes_per_token.0 == 0 || args.sessions == 0 {
        return Err(Error::invalid_argument(
            "--block-tokens, --kv-bytes-per-token and --sessions must be positive",
        ));
    }
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "memory": { "capacity": args.capacity.0 },
    }))?;
    let rt = crate::runtime();
    let pool = rt.block_on(kvpool::open(&config))?;
    let bar = crate::progress((args.sessions * args.turns) as u64, "requests");
    let result = rt.block_on(drive(&pool, &args, &bar));
    bar.finish_and_clear();
    rt.block_on(pool.close())?;
    let report = result?;
    if args.output.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!(
            "{} requests, {} prompt tokens, {} sessions sharing a {}-token system prompt",
            report.requests, report.prompt_tokens, args.sessions, args.system_tokens
        );
        println!(
            "token hit ratio  {:.3}  ({} of {} tokens loaded from the pool)",
            report.token_hit_ratio, report.hit_tokens, report.prompt_tokens
        );
        println!(
            "loaded           {} blocks, {:.1} MiB at {:.2} GB/s, every byte verified",
            report.blocks_loaded,
            report.bytes_loaded as f64 / (1 << 20) as f64,
            report.load_gbps
        );
        println!(
            "stored           {} blocks, {:.1} MiB at {:.2} GB/s",
            report.blocks_stored,
            report.bytes_stored as f64 / (1 << 20) as f64,
            report.store_gbps
        );
    }
    if args.metrics {
        print!("{}", kvpool::metrics::global().encode());
    }
    Ok(ExitCode::SUCCESS)
}

/// The KV bytes a model would produce for a block: a pure function of the
/// block hash, so any reader can verify what it loads.
fn kv_bytes(hash: &BlockHash, out: &mut [u8]) {
    let seed = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
    SmallRng::seed_from_u64(seed).fill_bytes(out);
}

async fn drive(
    pool: &Arc<dyn KvBackend>,
    args: &DemoArgs,
    bar: &indicatif::ProgressBar,
) -> kvpool::Result<DemoReport> {
    let block_bytes = args.block_tokens * args.kv_bytes_per_token.0 as usize;
    let block_tokens = NonZeroUsize::new(args.block_tokens)
        .ok_or_else(|| Error::invalid_argument("--block-tokens must be positive"))?;
    let ns = Arc::new(Namespace::single_rank("kvpool-demo-model")?);
    let mut rng = SmallRng::seed_from_u64(args.seed);
    let vocab = 151_000u32;
    let system: Vec<u32> = (0..args.system_tokens)
        .map(|_| rng.gen_range(0..vocab))
        .collect();
    let mut histories: Vec<Vec<u32>> = vec![system; args.sessions];
    let max_blocks = (args.system_tokens + args.turns * 1200) / args.block_tokens + 1;
    // The paged KV buffer of one request, as an engine would register it.
    let kv = MemRegion::alloc(max_blocks * block_bytes);
    let mut expected = vec![0u8; block_bytes];
    let mut report = DemoReport::default();
    let (mut load_time, mut store_time) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();

    // Turns interleave across sessions, as a shared server sees them.
    for _turn in 0..args.turns {
        for history in histories.iter_mut() {
            let user = rng.gen_range(200..700);
            history.extend((0..user).map(|_| rng.gen_range(0..vocab)));
            let hashes = token_block_hashes(history, block_tokens, None, None);
            let keys: Vec<BlockKey> = hashes
                .iter()
                .map(|h| BlockKey::new(ns.clone(), *h))
                .collect();
            let present = pool.exists(&keys).await?;
            let hit = present.iter().take_while(|p| **p).count();

            // Load the present prefix into the request's blocks.
            let t = Instant::now();
            let loads = keys[..hit]
                .iter()
                .enumerate()
                .map(|(i, k)| {
                    Ok((
                        k.clone(),
                        IoVecMut::single(&kv, i * block_bytes, block_bytes)?,
                    ))
                })
                .collect::<kvpool::Result<Vec<_>>>()?;
            let outcomes = pool.get_into(loads).await?;
            load_time += t.elapsed();
            let mut loaded = 0;
            for (i, o) in outcomes.into_iter().enumerate() {
                match o {
                    GetOutcome::Hit => loaded += 1,
                    // Evicted since `exists`: recompute from here on.
                    GetOutcome::Miss => break,
                    GetOutcome::Failed(e) => return Err(e),
                }
                kv_bytes(&hashes[i], &mut expected);
                if kv.read(i * block_bytes, block_bytes)? != expected {
                    return Err(Error::new(
                        ErrorKind::Corrupted,
                        format!(
                            "block {i} of a request loaded bytes that differ from those stored"
                        ),
                    )
                    .with_context("key", &keys[i]));
                }
                report.bytes_verified += block_bytes as u64;
            }

            // "Compute" the remaining blocks and store them.
            for (i, h) in hashes.iter().enumerate().skip(loaded) {
                kv_bytes(h, &mut expected);
                kv.write(i * block_bytes, &expected)?;
            }
            let t = Instant::now();
            let stores = (loaded..keys.len())
                .map(|i| {
                    Ok((
                        keys[i].clone(),
                        IoVec::single(&kv, i * block_bytes, block_bytes)?,
                    ))
                })
                .collect::<kvpool::Result<Vec<_>>>()?;
            for o in pool.put(stores).await? {
                match o {
                    PutOutcome::Stored => {
                        report.blocks_stored += 1;
                        report.bytes_stored += block_bytes as u64;
                    }
                    PutOutcome::Exists => {}
                    PutOutcome::Failed(e) => return Err(e),
                }
            }
            store_time += t.elapsed();

            report.requests += 1;
            report.prompt_tokens += history.len() as u64;
            report.hit_tokens += (loaded * args.block_tokens) as u64;
            report.blocks_loaded += loaded as u64;
            report.bytes_loaded += (loaded * block_bytes) as u64;

            // The model's answer joins the history for the next turn.
            let answer = rng.gen_range(100..400);
            history.extend((0..answer).map(|_| rng.gen_range(0..vocab)));
            bar.inc(1);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.token_hit_ratio = report.hit_tokens as f64 / report.prompt_tokens.max(1) as f64;
    report.load_gbps = report.bytes_loaded as f64 / load_time.as_secs_f64().max(1e-9) / 1e9;
    report.store_gbps = report.bytes_stored as f64 / store_time.as_secs_f64().max(1e-9) / 1e9;
    Ok(report)
}
