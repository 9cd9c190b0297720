//! `kvpool soak`: a long mixed workload against one backend, watching for errors,
//! wrong bytes and memory growth.
//!
//! `--clients` tokio tasks each serve "requests" the way the connector does: a prompt's
//! blocks are hashed as a prefix chain (block i's hash covers block i-1's), `exists`
//! finds the present prefix, `get_into` loads it, and the rest is "computed" and `put`
//! in one batch. Prompts are a shared prefix (a system prompt or document, one of
//! `--prefixes`) followed by a suffix that is either one of `--variants` per prefix,
//! which every client draws from (so clients load what others stored), or, with
//! probability `--new-ratio`, never seen before, so puts of new keys go on for the
//! whole run and a capacity-bound backend keeps evicting, as a serving pool does.
//!
//! A value is a pure function of its key, so every loaded byte is checked against what
//! it must be, whichever client (or earlier run) stored it. A miss (evicted) is a
//! normal outcome; an `Err` or a per-key failure is an error.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use kvpool::hash::token_block_hash;
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion,
    Namespace, PutOutcome,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::{ConfigArgs, OutputArgs};

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 when the run saw no errors and no wrong bytes (and \
                        RSS grew no more than --max-rss-growth-pct, when given); 1 otherwise, \
                        after printing the report; 2 for bad flags or config."
)]
pub(crate) struct SoakArgs {
    /// The backend to soak (overrides the config's `backend`).
    #[arg(long)]
    backend: String,
    /// Concurrent clients, each a tokio task with its own buffers.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long the load runs.
    #[arg(long, default_value_t = 60.0)]
    seconds: f64,
    /// RSS is measured again after this long, and growth is judged from there to the
    /// end (default: a fifth of --seconds).
    #[arg(long)]
    warmup_seconds: Option<f64>,
    /// Bytes per block value.
    #[arg(long, default_value = "64KiB")]
    value_size: ByteSize,
    /// Shared prefixes (system prompts, documents) prompts start with.
    #[arg(long, default_value_t = 32)]
    prefixes: u32,
    /// Blocks in each shared prefix.
    #[arg(long, default_value_t = 8)]
    prefix_blocks: usize,
    /// Suffixes per prefix that clients reuse.
    #[arg(long, default_value_t = 16)]
    variants: u32,
    /// Blocks after the prefix.
    #[arg(long, default_value_t = 8)]
    suffix_blocks: usize,
    /// Fraction of requests whose suffix is new, never stored before.
    #[arg(long, default_value_t = 0.2)]
    new_ratio: f64,
    /// Seed of the reused prompts; runs with the same seed and value size share keys.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also fail (exit 1) when RSS grew more than this percentage from warm-up to the end.
    #[arg(long, value_name = "PCT")]
    max_rss_growth_pct: Option<f64>,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// Latencies are per backend call, in microseconds; up to an hour fits.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Only the first errors are logged one by one; the report counts them all.
const LOGGED_ERRORS: u64 = 10;

/// How long clients may overrun the deadline (a call in flight) before they count as stuck.
const GRACE: Duration = Duration::from_secs(30);

/// Evenly spaced RSS samples in the report's `rss_trace_mb`.
const TRACE_POINTS: u32 = 20;

#[derive(Debug, Serialize)]
struct SoakReport {
    backend: String,
    clients: usize,
    seconds: f64,
    warmup_seconds: f64,
    value_size: u64,
    /// Backend calls: exists + get + put.
    ops: u64,
    /// Outer `Err`s and per-key failures.
    errors: u64,
    /// Loaded bytes that differ from what the key's value must be.
    wrong_bytes: u64,
    /// Loaded values with at least one wrong byte.
    wrong_values: u64,
    requests: u64,
    exists_calls: u64,
    get_calls: u64,
    put_calls: u64,
    blocks_hit: u64,
    blocks_missed: u64,
    blocks_stored: u64,
    blocks_existed: u64,
    bytes_verified: u64,
    /// Blocks loaded / blocks of all prompts.
    block_hit_ratio: f64,
    p50_exists_us: u64,
    p99_exists_us: u64,
    p50_get_us: u64,
    p99_get_us: u64,
    max_get_us: u64,
    p50_put_us: u64,
    p99_put_us: u64,
    max_put_us: u64,
    /// Before the backend opens.
    rss_start_mb: f64,
    /// After the backend opened and the clients' buffers were allocated.
    rss_open_mb: f64,
    /// After the warm-up.
    rss_warm_mb: f64,
    rss_end_mb: f64,
    rss_peak_mb: f64,
    /// (end - warm) / warm, in percent.
    rss_growth_pct: f64,
    rss_trace_mb: Vec<f64>,
    first_error: Option<String>,
}

pub(crate) fn run(args: SoakArgs) -> kvpool::Result<ExitCode> {
    let plan = Plan::from_args(&args)?;
    let rss_start = rss_mb()?;
    let config = args.config.load(Some(&args.backend))?;
    let rt = crate::runtime();
    let backend = rt.block_on(kvpool::open(&config))?;
    let result = rt.block_on(soak(&backend, plan, rss_start));
    // A failed close is reported, but after the numbers, which matter more.
    let closed = rt.block_on(backend.close());
    let report = result?;

    if args.output.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        print_human(&report);
    }
    closed?;
    let rss_bad = args
        .max_rss_growth_pct
        .is_some_and(|max| report.rss_growth_pct > max);
    if report.errors > 0 || report.wrong_bytes > 0 || rss_bad {
        if rss_bad {
            eprintln!(
                "error: RSS grew {:.1}% from warm-up to the end, over --max-rss-growth-pct",
                report.rss_growth_pct
            );
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_human(r: &SoakReport) {
    println!(
        "{} backend, {} clients, {:.0} s ({:.0} s warm-up), {} values",
        r.backend,
        r.clients,
        r.seconds,
        r.warmup_seconds,
        ByteSize(r.value_size)
    );
    println!(
        "ops       {} ({} exists, {} get, {} put calls; {} requests)",
        r.ops, r.exists_calls, r.get_calls, r.put_calls, r.requests
    );
    println!(
        "blocks    {} loaded and verified ({:.1} MiB), {} missed, {} stored, {} already there; hit ratio {:.3}",
        r.blocks_hit,
        r.bytes_verified as f64 / f64::from(1 << 20),
        r.blocks_missed,
        r.blocks_stored,
        r.blocks_existed,
        r.block_hit_ratio
    );
    println!(
        "latency   get p50 {} µs p99 {} µs max {} µs | put p50 {} µs p99 {} µs max {} µs | exists p50 {} µs p99 {} µs",
        r.p50_get_us,
        r.p99_get_us,
        r.max_get_us,
        r.p50_put_us,
        r.p99_put_us,
        r.max_put_us,
        r.p50_exists_us,
        r.p99_exists_us
    );
    println!(
        "rss       start {:.1} MiB, opened {:.1}, warm {:.1}, end {:.1}, peak {:.1}: {:+.2}% after warm-up",
        r.rss_start_mb, r.rss_open_mb, r.rss_warm_mb, r.rss_end_mb, r.rss_peak_mb, r.rss_growth_pct
    );
    println!(
        "errors    {}, wrong bytes {} (in {} values){}",
        r.errors,
        r.wrong_bytes,
        r.wrong_values,
        r.first_error
            .as_deref()
            .map_or(String::new(), |e| format!("; first: {e}"))
    );
}

/// The validated shape of the run.
#[derive(Debug, Clone)]
struct Plan {
    clients: usize,
    seconds: Duration,
    warmup: Duration,
    value_size: usize,
    prefixes: u32,
    prefix_blocks: usize,
    variants: u32,
    suffix_blocks: usize,
    new_ratio: f64,
    seed: u64,
}

impl Plan {
    fn from_args(a: &SoakArgs) -> kvpool::Result<Self> {
        let bad = |m: &str| Err(Error::invalid_argument(m.to_string()));
        if a.clients == 0 {
            return bad("--clients must be at least 1");
        }
        if !(a.seconds > 0.0 && a.seconds.is_finite() && a.seconds <= 1e7) {
            return bad("--seconds must be a positive number of seconds");
        }
        let warmup = a.warmup_seconds.unwrap_or(a.seconds / 5.0);
        if !(warmup >= 0.0 && warmup < a.seconds) {
            return bad("--warmup-seconds must be at least 0 and less than --seconds");
        }
        let value_size = usize::try_from(a.value_size.0)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::invalid_argument("--value-size must be at least 1 byte"))?;
        if a.prefixes == 0 || a.variants == 0 {
            return bad("--prefixes and --variants must be at least 1");
        }
        let blocks = a.prefix_blocks.saturating_add(a.suffix_blocks);
        if blocks == 0 {
            return bad("--prefix-blocks + --suffix-blocks must be at least 1");
        }
        if value_size.checked_mul(blocks).is_none_or(|b| b > 1 << 40) {
            return bad("--value-size x (--prefix-blocks + --suffix-blocks) is too large");
        }
        if !(0.0..=1.0).contains(&a.new_ratio) {
            return bad("--new-ratio must be between 0 and 1");
        }
        if a.max_rss_growth_pct.is_some_and(|p| p.is_nan()) {
            return bad("--max-rss-growth-pct must be a number");
        }
        Ok(Plan {
            clients: a.clients,
            seconds: Duration::from_secs_f64(a.seconds),
            warmup: Duration::from_secs_f64(warmup),
            value_size,
            prefixes: a.prefixes,
            prefix_blocks: a.prefix_blocks,
            variants: a.variants,
            suffix_blocks: a.suffix_blocks,
            new_ratio: a.new_ratio,
            seed: a.seed,
        })
    }

    fn blocks(&self) -> usize {
        self.prefix_blocks + self.suffix_blocks
    }

    /// The block hashes of one prompt: prefix `group`'s chain, then suffix `variant`'s
    /// chain hanging off it. The token lists are stand-ins that make each block distinct;
    /// the chaining is kvpool's real `tokens`-mode hash.
    fn prompt(&self, group: u32, variant: u64, fresh: bool) -> Vec<BlockHash> {
        let mut hashes: Vec<BlockHash> = Vec::with_capacity(self.blocks());
        let seed = [self.seed as u32, (self.seed >> 32) as u32];
        for i in 0..self.prefix_blocks {
            let tokens = [0, seed[0], seed[1], group, i as u32];
            hashes.push(token_block_hash(hashes.last(), &tokens, None, None));
        }
        let (lo, hi) = (variant as u32, (variant >> 32) as u32);
        for i in 0..self.suffix_blocks {
            let tokens = [1 + u32::from(fresh), seed[0], seed[1], lo, hi, i as u32];
            hashes.push(token_block_hash(hashes.last(), &tokens, None, None));
        }
        hashes
    }
}

/// What the clients share.
#[derive(Debug)]
struct Shared {
    backend: Arc<dyn KvBackend>,
    plan: Plan,
    ns: Arc<Namespace>,
    deadline: Instant,
    /// Per-run entropy for new suffixes, so a rerun against a persistent backend
    /// stores new keys again rather than finding the last run's.
    run_nonce: u64,
    errors_logged: AtomicU64,
}

async fn soak(
    backend: &Arc<dyn KvBackend>,
    plan: Plan,
    rss_start: f64,
) -> kvpool::Result<SoakReport> {
    let caps = backend.info().capabilities;
    if let Some(max) = caps.max_value_size {
        if plan.value_size > max {
            return Err(Error::invalid_argument(format!(
                "--value-size {} is over the backend's largest value, {}",
                plan.value_size, max
            )));
        }
    }
    if let Some(max) = caps.max_batch {
        if plan.blocks() > max {
            return Err(Error::invalid_argument(format!(
                "a prompt of {} blocks is over the backend's largest batch, {max}",
                plan.blocks()
            )));
        }
    }
    // The value size is in the model name: keys of another size's run would be refused
    // by get_into (length mismatch), and values must be a pure function of the key.
    let ns = Arc::new(Namespace::single_rank(&format!(
        "kvpool-soak-{}",
        plan.value_size
    ))?);

    // Buffers are allocated, faulted in and registered before any clock starts, so that
    // what RSS does afterwards is the backend's and the workload's.
    let mut regions = Vec::with_capacity(plan.clients);
    for _ in 0..plan.clients {
        let region = MemRegion::alloc(plan.blocks() * plan.value_size);
        region.write(0, &vec![0u8; region.len()])?;
        backend.register(&region).await?;
        regions.push(region);
    }
    let rss_open = rss_mb()?;

    let started = Instant::now();
    let shared = Arc::new(Shared {
        backend: backend.clone(),
        plan: plan.clone(),
        ns,
        deadline: started + plan.seconds,
        run_nonce: rand::random(),
        errors_logged: AtomicU64::new(0),
    });
    let tasks: Vec<_> = regions
        .iter()
        .enumerate()
        .map(|(id, region)| tokio::spawn(client(shared.clone(), id, region.clone())))
        .collect();

    // On a thread of its own: the clients' verification keeps the runtime's workers
    // busy, and a sampler among them would be late for the warm-up point.
    let watch = {
        let (warm_at, deadline) = (started + plan.warmup, shared.deadline);
        tokio::task::spawn_blocking(move || watch_rss(started, warm_at, deadline, rss_open))
    };

    let mut total = ClientStats::new();
    let mut stuck = 0u64;
    let join_by = tokio::time::Instant::from(shared.deadline + GRACE);
    for task in tasks {
        match tokio::time::timeout_at(join_by, task).await {
            Ok(Ok(stats)) => total.merge(stats),
            Ok(Err(e)) => {
                stuck += 1;
                total.note_error(&format!("a client task failed: {e}"));
            }
            Err(_) => {
                stuck += 1;
                total.note_error(&format!(
                    "a client's call did not return within {GRACE:?} after the deadline"
                ));
            }
        }
    }
    total.errors += stuck;
    let elapsed = started.elapsed();
    let watched = watch.await.map_err(|e| {
        Error::new(
            ErrorKind::Unexpected,
            format!("the RSS sampler failed: {e}"),
        )
    })??;
    // Measured while the clients' buffers are still held, as they were at warm-up.
    let rss_end = rss_mb()?;
    drop(regions);
    let rss_peak = watched.peak.max(rss_end);
    let rss_warm = watched.warm.unwrap_or(rss_end);
    let trace = watched.trace;

    let pct = |h: &Histogram<u64>, q: f64| {
        if h.is_empty() {
            0
        } else {
            h.value_at_quantile(q)
        }
    };
    let blocks_total = total.blocks_hit + total.blocks_missed + total.blocks_computed;
    Ok(SoakReport {
        backend: backend.info().scheme.to_string(),
        clients: plan.clients,
        seconds: round3(elapsed.as_secs_f64()),
        warmup_seconds: round3(plan.warmup.as_secs_f64()),
        value_size: plan.value_size as u64,
        ops: total.exists_calls + total.get_calls + total.put_calls,
        errors: total.errors,
        wrong_bytes: total.wrong_bytes,
        wrong_values: total.wrong_values,
        requests: total.requests,
        exists_calls: total.exists_calls,
        get_calls: total.get_calls,
        put_calls: total.put_calls,
        blocks_hit: total.blocks_hit,
        blocks_missed: total.blocks_missed,
        blocks_stored: total.blocks_stored,
        blocks_existed: total.blocks_existed,
        bytes_verified: total.blocks_hit * plan.value_size as u64,
        block_hit_ratio: round3(total.blocks_hit as f64 / blocks_total.max(1) as f64),
        p50_exists_us: pct(&total.exists_us, 0.5),
        p99_exists_us: pct(&total.exists_us, 0.99),
        p50_get_us: pct(&total.get_us, 0.5),
        p99_get_us: pct(&total.get_us, 0.99),
        max_get_us: total.get_us.max(),
        p50_put_us: pct(&total.put_us, 0.5),
        p99_put_us: pct(&total.put_us, 0.99),
        max_put_us: total.put_us.max(),
        rss_start_mb: round1(rss_start),
        rss_open_mb: round1(rss_open),
        rss_warm_mb: round1(rss_warm),
        rss_end_mb: round1(rss_end),
        rss_peak_mb: round1(rss_peak),
        rss_growth_pct: round3((rss_end - rss_warm) / rss_warm * 100.0),
        rss_trace_mb: trace,
        first_error: total.first_error,
    })
}

/// What RSS did while the clients ran.
#[derive(Debug)]
struct RssWatch {
    warm: Option<f64>,
    peak: f64,
    trace: Vec<f64>,
}

/// Samples RSS every 100 ms until `deadline`, and exactly at `warm_at` and at each of
/// the trace's evenly spaced points.
fn watch_rss(
    started: Instant,
    warm_at: Instant,
    deadline: Instant,
    rss_open: f64,
) -> kvpool::Result<RssWatch> {
    let mut watch = RssWatch {
        warm: None,
        peak: rss_open,
        trace: Vec::with_capacity(TRACE_POINTS as usize),
    };
    let trace_every = deadline.saturating_duration_since(started) / TRACE_POINTS;
    let mut next_trace = started + trace_every;
    loop {
        let now = Instant::now();
        let mut wake = (now + Duration::from_millis(100)).min(deadline);
        if watch.trace.len() < TRACE_POINTS as usize {
            wake = wake.min(next_trace);
        }
        if watch.warm.is_none() {
            wake = wake.min(warm_at);
        }
        std::thread::sleep(wake.saturating_duration_since(now));
        let now = Instant::now();
        let rss = rss_mb()?;
        watch.peak = watch.peak.max(rss);
        if watch.warm.is_none() && now >= warm_at {
            watch.warm = Some(rss);
        }
        if now >= next_trace && watch.trace.len() < TRACE_POINTS as usize {
            watch.trace.push(round1(rss));
            next_trace += trace_every;
        }
        if now >= deadline {
            return Ok(watch);
        }
    }
}

#[derive(Debug)]
struct ClientStats {
    requests: u64,
    exists_calls: u64,
    get_calls: u64,
    put_calls: u64,
    blocks_hit: u64,
    blocks_missed: u64,
    /// Blocks a request had to compute: absent at `exists`, or past a missed load.
    blocks_computed: u64,
    blocks_stored: u64,
    blocks_existed: u64,
    errors: u64,
    wrong_bytes: u64,
    wrong_values: u64,
    first_error: Option<String>,
    exists_us: Histogram<u64>,
    get_us: Histogram<u64>,
    put_us: Histogram<u64>,
}

impl ClientStats {
    fn new() -> Self {
        let h = || Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid bounds");
        ClientStats {
            requests: 0,
            exists_calls: 0,
            get_calls: 0,
            put_calls: 0,
            blocks_hit: 0,
            blocks_missed: 0,
            blocks_computed: 0,
            blocks_stored: 0,
            blocks_existed: 0,
            errors: 0,
            wrong_bytes: 0,
            wrong_values: 0,
            first_error: None,
            exists_us: h(),
            get_us: h(),
            put_us: h(),
        }
    }

    fn note_error(&mut self, message: &str) {
        if self.first_error.is_none() {
            self.first_error = Some(message.to_string());
        }
    }

    fn merge(&mut self, o: ClientStats) {
        self.requests += o.requests;
        self.exists_calls += o.exists_calls;
        self.get_calls += o.get_calls;
        self.put_calls += o.put_calls;
        self.blocks_hit += o.blocks_hit;
        self.blocks_missed += o.blocks_missed;
        self.blocks_computed += o.blocks_computed;
        self.blocks_stored += o.blocks_stored;
        self.blocks_existed += o.blocks_existed;
        self.errors += o.errors;
        self.wrong_bytes += o.wrong_bytes;
        self.wrong_values += o.wrong_values;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        // Same bounds on every histogram, so adding cannot fail.
        let _ = self.exists_us.add(&o.exists_us);
        let _ = self.get_us.add(&o.get_us);
        let _ = self.put_us.add(&o.put_us);
    }
}

fn record(h: &mut Histogram<u64>, since: Instant) {
    let us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
    h.saturating_record(us.max(1));
}

impl Shared {
    fn error(&self, stats: &mut ClientStats, op: &str, e: &Error) {
        stats.errors += 1;
        let message = format!("{op}: {e}");
        if self.errors_logged.fetch_add(1, Ordering::Relaxed) < LOGGED_ERRORS {
            tracing::warn!("soak: {message}");
        }
        stats.note_error(&message);
    }

    /// Results come one per key, in order; any other count breaks the contract.
    fn check_count(&self, stats: &mut ClientStats, op: &str, got: usize, keys: usize) {
        if got != keys {
            let e = Error::new(
                ErrorKind::Unexpected,
                format!("the backend answered {got} outcomes for {keys} keys"),
            );
            self.error(stats, op, &e);
        }
    }

    fn error_wrong(&self, stats: &mut ClientStats, key: &BlockKey, wrong: u64) {
        stats.wrong_values += 1;
        stats.wrong_bytes += wrong;
        let e = Error::new(
            ErrorKind::Corrupted,
            format!("a loaded value has {wrong} wrong bytes"),
        )
        .with_context("key", key);
        let message = format!("get_into: {e}");
        if self.errors_logged.fetch_add(1, Ordering::Relaxed) < LOGGED_ERRORS {
            tracing::warn!("soak: {message}");
        }
        stats.note_error(&message);
    }
}

async fn client(shared: Arc<Shared>, id: usize, region: Arc<MemRegion>) -> ClientStats {
    let plan = &shared.plan;
    let backend = &shared.backend;
    let vs = plan.value_size;
    let mut stats = ClientStats::new();
    let mut rng =
        SmallRng::seed_from_u64(plan.seed ^ (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut fresh_count = 0u64;
    let pause_after_error = Duration::from_millis(10);

    while Instant::now() < shared.deadline {
        let group = rng.gen_range(0..plan.prefixes);
        let fresh = rng.gen_bool(plan.new_ratio);
        let variant = if fresh {
            fresh_count += 1;
            // Unique in this run (client id, count) and across runs (nonce).
            splitmix64(shared.run_nonce ^ ((id as u64) << 40) ^ fresh_count)
        } else {
            // Reused suffixes belong to their prefix: variant v of group g.
            u64::from(group) << 32 | u64::from(rng.gen_range(0..plan.variants))
        };
        let hashes = plan.prompt(group, variant, fresh);
        let keys: Vec<BlockKey> = hashes
            .iter()
            .map(|h| BlockKey::new(shared.ns.clone(), *h))
            .collect();
        stats.requests += 1;

        let t = Instant::now();
        let present = match backend.exists(&keys).await {
            Ok(p) => p,
            Err(e) => {
                shared.error(&mut stats, "exists", &e);
                tokio::time::sleep(pause_after_error).await;
                continue;
            }
        };
        record(&mut stats.exists_us, t);
        stats.exists_calls += 1;
        let hit = present.iter().take_while(|p| **p).count().min(keys.len());

        // Load the present prefix. Each destination first holds the complement of its
        // expected bytes, so a "hit" that writes nothing is caught as all bytes wrong.
        let mut loaded = 0;
        if hit > 0 {
            for (i, h) in hashes[..hit].iter().enumerate() {
                fill_block(&region, i * vs, vs, value_seed(h), true);
            }
            let items: Result<Vec<_>, Error> = keys[..hit]
                .iter()
                .enumerate()
                .map(|(i, k)| Ok((k.clone(), IoVecMut::single(&region, i * vs, vs)?)))
                .collect();
            let outcomes = match items {
                Ok(items) => {
                    let t = Instant::now();
                    let r = backend.get_into(items).await;
                    if r.is_ok() {
                        record(&mut stats.get_us, t);
                        stats.get_calls += 1;
                    }
                    r
                }
                Err(e) => Err(e),
            };
            match outcomes {
                Ok(outcomes) => {
                    shared.check_count(&mut stats, "get_into", outcomes.len(), hit);
                    let mut contiguous = true;
                    for (i, o) in outcomes.into_iter().enumerate().take(hit) {
                        match o {
                            GetOutcome::Hit => {
                                stats.blocks_hit += 1;
                                let wrong =
                                    wrong_bytes(&region, i * vs, vs, value_seed(&hashes[i]));
                                if wrong > 0 {
                                    shared.error_wrong(&mut stats, &keys[i], wrong);
                                }
                                if contiguous {
                                    loaded = i + 1;
                                }
                            }
                            // Evicted (or removed) since `exists`: not an error.
                            GetOutcome::Miss => {
                                stats.blocks_missed += 1;
                                contiguous = false;
                            }
                            GetOutcome::Failed(e) => {
                                shared.error(&mut stats, "get_into", &e);
                                contiguous = false;
                            }
                        }
                    }
                }
                Err(e) => {
                    shared.error(&mut stats, "get_into", &e);
                    tokio::time::sleep(pause_after_error).await;
                    continue;
                }
            }
        }

        // "Compute" the rest and store it in one batch, as a save at the end of a step.
        if loaded < keys.len() {
            stats.blocks_computed += (keys.len() - loaded) as u64;
            for (i, h) in hashes.iter().enumerate().skip(loaded) {
                fill_block(&region, i * vs, vs, value_seed(h), false);
            }
            let items: Result<Vec<_>, Error> = (loaded..keys.len())
                .map(|i| Ok((keys[i].clone(), IoVec::single(&region, i * vs, vs)?)))
                .collect();
            let t = Instant::now();
            let outcomes = match items {
                Ok(items) => backend.put(items).await,
                Err(e) => Err(e),
            };
            match outcomes {
                Ok(outcomes) => {
                    record(&mut stats.put_us, t);
                    stats.put_calls += 1;
                    shared.check_count(&mut stats, "put", outcomes.len(), keys.len() - loaded);
                    for o in outcomes {
                        match o {
                            PutOutcome::Stored => stats.blocks_stored += 1,
                            PutOutcome::Exists => stats.blocks_existed += 1,
                            PutOutcome::Failed(e) => shared.error(&mut stats, "put", &e),
                        }
                    }
                }
                Err(e) => {
                    shared.error(&mut stats, "put", &e);
                    tokio::time::sleep(pause_after_error).await;
                }
            }
        }
    }
    stats
}

/// The seed of a key's value: the first 8 bytes of its block hash, which is SHA-256
/// output, so distinct keys get unrelated values.
fn value_seed(hash: &BlockHash) -> u64 {
    u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8 value bytes at `8 * word` of the value with `seed`; a value's tail shorter
/// than 8 bytes takes the first bytes of its word.
fn value_word(seed: u64, word: usize) -> [u8; 8] {
    splitmix64(seed ^ (word as u64).wrapping_mul(0xd6e8_feb8_6659_fd93)).to_le_bytes()
}

/// Writes the value with `seed` (or, with `complement`, every byte of it inverted) at
/// `offset` in `region`.
fn fill_block(region: &MemRegion, offset: usize, len: usize, seed: u64, complement: bool) {
    let flip = if complement { u64::MAX } else { 0 };
    with_block(region, offset, len, |dst| {
        let mut words = dst.chunks_exact_mut(8);
        let mut w = 0;
        for chunk in &mut words {
            let word = u64::from_le_bytes(value_word(seed, w)) ^ flip;
            chunk.copy_from_slice(&word.to_le_bytes());
            w += 1;
        }
        let tail = words.into_remainder();
        let word = (u64::from_le_bytes(value_word(seed, w)) ^ flip).to_le_bytes();
        tail.copy_from_slice(&word[..tail.len()]);
    })
}

/// How many bytes at `offset` in `region` differ from the value with `seed`.
fn wrong_bytes(region: &MemRegion, offset: usize, len: usize, seed: u64) -> u64 {
    let count = |got: &[u8], want: &[u8]| got.iter().zip(want).filter(|(a, b)| a != b).count();
    with_block(region, offset, len, |got| {
        let mut wrong = 0;
        let mut words = got.chunks_exact(8);
        let mut w = 0;
        for chunk in &mut words {
            let want = value_word(seed, w);
            // The common case is one 8-byte compare; counting only when it fails.
            if chunk != want {
                wrong += count(chunk, &want);
            }
            w += 1;
        }
        let tail = words.remainder();
        wrong += count(tail, &value_word(seed, w)[..tail.len()]);
        wrong as u64
    })
}

/// Runs `f` over one block of a client's own buffer.
///
/// Only its client touches the region, and only between backend calls (no call that
/// reads or writes it is in flight then), so the slice aliases nothing. Offsets are
/// `i * value_size` for `i` below the prompt's block count, which the region was sized
/// for; the assertion guards that arithmetic, not input.
fn with_block<R>(
    region: &MemRegion,
    offset: usize,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    assert!(
        offset
            .checked_add(len)
            .is_some_and(|end| end <= region.len()),
        "block {offset}+{len} outside a region of {}",
        region.len()
    );
    // SAFETY: the range is inside the region (checked above), which outlives the call;
    // see the doc comment for why nothing else accesses it meanwhile.
    f(unsafe { std::slice::from_raw_parts_mut(region.as_ptr().add(offset), len) })
}

/// This process's resident set from /proc/self/status, in MiB.
fn rss_mb() -> kvpool::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| {
        Error::new(
            ErrorKind::Unsupported,
            format!("soak measures RSS from /proc/self/status, which cannot be read: {e}"),
        )
    })?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kb| kb.trim().parse::<u64>().ok())
        .map(|kb| kb as f64 / 1024.0)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "/proc/self/status has no VmRSS line",
            )
        })
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_verified_exactly() {
        let vs = 4099; // not a multiple of 8: the tail word is partial
        let region = MemRegion::alloc(2 * vs);
        let seed = value_seed(&BlockHash([7; 32]));
        fill_block(&region, vs, vs, seed, false);
        assert_eq!(wrong_bytes(&region, vs, vs, seed), 0);
        fill_block(&region, vs, vs, seed, true);
        assert_eq!(wrong_bytes(&region, vs, vs, seed), vs as u64);
        fill_block(&region, vs, vs, seed, false);
        region
            .write(vs + 10, &[!region.read(vs + 10, 1).unwrap()[0]])
            .unwrap();
        region
            .write(2 * vs - 1, &[!region.read(2 * vs - 1, 1).unwrap()[0]])
            .unwrap();
        assert_eq!(wrong_bytes(&region, vs, vs, seed), 2);
        // Another key's value is wrong almost everywhere.
        let other = value_seed(&BlockHash([8; 32]));
        assert!(wrong_bytes(&region, vs, vs, other) > vs as u64 * 9 / 10);
    }

    #[test]
    fn prompts_chain_and_share_prefixes() {
        let plan = Plan {
            clients: 1,
            seconds: Duration::from_secs(1),
            warmup: Duration::ZERO,
            value_size: 1,
            prefixes: 2,
            prefix_blocks: 3,
            variants: 2,
            suffix_blocks: 2,
            new_ratio: 0.0,
            seed: 1,
        };
        let a = plan.prompt(0, 0, false);
        let b = plan.prompt(0, 1, false);
        let c = plan.prompt(1, 0, false);
        assert_eq!(a.len(), 5);
        assert_eq!(a[..3], b[..3]);
        assert_ne!(a[3..], b[3..]);
        assert_ne!(a[0], c[0]);
        assert_ne!(plan.prompt(0, 0, true)[3], a[3]);
        assert_eq!(plan.prompt(0, 0, false), a);
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_mb().unwrap() > 0.0);
    }
}
