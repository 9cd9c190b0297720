//! The lookup-to-load race, measured: a lookup finds a prefix present, one engine step later
//! the load finds part of it evicted, and those blocks are recomputed.
//!
//! Several instances (tokio tasks) share one backend and serve requests whose prompts share
//! prefixes. Each request does what the connector does: it looks up its prefix-chained blocks
//! as `PoolLookup` does (the longest prefix present, through [`KvBackend::exists`], or
//! [`KvBackend::exists_for_load`] when a hold is set), waits one engine step, loads the hit
//! with `get_into` and checks every byte (each value is derived from its key), then puts the
//! blocks from the first one it could not load (the recomputed ones). The pool is sized to
//! evict all the time, so promised blocks keep disappearing before their loads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_core::{
    BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace,
};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// What one run does.
#[derive(Debug, Clone)]
pub struct RaceConfig {
    /// Concurrent instances.
    pub instances: usize,
    /// Requests, over all instances.
    pub requests: usize,
    /// Bytes of one block's value.
    pub block_bytes: usize,
    /// Between lookup and load: one engine step.
    pub step: Duration,
    /// Zero: lookups call `exists`; otherwise `exists_for_load` with this hold.
    pub hold: Duration,
    /// Load the blocks that failed once more before recomputing them.
    pub retry: bool,
    /// Prompt families: prompts of one family share a prefix of its chain.
    pub families: u64,
    /// The longest shared prefix, in blocks.
    pub max_prefix: usize,
    /// The longest suffix of a request's own blocks.
    pub max_suffix: usize,
    /// Seeds the prompts, so runs with and without a hold see the same requests.
    pub seed: u64,
}

impl Default for RaceConfig {
    fn default() -> Self {
        RaceConfig {
            instances: 8,
            requests: 10_000,
            block_bytes: 8 << 10,
            step: Duration::from_millis(10),
            hold: Duration::ZERO,
            retry: false,
            families: 96,
            max_prefix: 24,
            max_suffix: 8,
            seed: 0x6b76_706f_6f6c,
        }
    }
}

/// What a run counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RaceReport {
    /// Requests started.
    pub requests: u64,
    /// Lookups that found at least one block.
    pub hits: u64,
    /// Blocks the lookups promised (the sum of the hit lengths).
    pub promised: u64,
    /// Promised blocks that failed to load (missing or failed at load time).
    pub failed_loads: u64,
    /// Of those, blocks a second load attempt recovered (with `retry`).
    pub recovered: u64,
    /// Bytes that loaded as a hit but differ from the value of their key. Must be 0.
    pub wrong_bytes: u64,
    /// Requests that did not finish (a hung or failed call). Must be 0: every block that
    /// failed to load is recomputed.
    pub incomplete: u64,
    /// Recomputed blocks whose put failed (the pool refused them): the cost of a hold.
    pub failed_puts: u64,
    /// Calls that failed as a whole (counted as misses and recomputed, as the connector does).
    pub call_errors: u64,
    /// Wall time of the run, in milliseconds.
    pub millis: u64,
}

impl RaceReport {
    /// Failed loads per 1,000 promised blocks.
    pub fn failed_per_mille(&self) -> f64 {
        if self.promised == 0 {
            0.0
        } else {
            self.failed_loads as f64 * 1000.0 / self.promised as f64
        }
    }

    /// The header of [`row`](Self::row).
    pub fn header() -> String {
        format!(
            "| {:<28} | {:>8} | {:>6} | {:>8} | {:>8} | {:>12} | {:>9} | {:>11} | {:>10} | {:>11} | {:>11} | {:>6} |\n\
             |{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|",
            "run",
            "requests",
            "hits",
            "promised",
            "loaded",
            "failed loads",
            "per 1000",
            "wrong bytes",
            "incomplete",
            "failed puts",
            "call errors",
            "secs",
            "-".repeat(30),
            "-".repeat(10),
            "-".repeat(8),
            "-".repeat(10),
            "-".repeat(10),
            "-".repeat(14),
            "-".repeat(11),
            "-".repeat(13),
            "-".repeat(12),
            "-".repeat(13),
            "-".repeat(13),
            "-".repeat(8),
        )
    }

    /// One markdown table row, named `name`.
    pub fn row(&self, name: &str) -> String {
        let failed = if self.recovered > 0 {
            format!("{} ({} recovered)", self.failed_loads, self.recovered)
        } else {
            self.failed_loads.to_string()
        };
        format!(
            "| {:<28} | {:>8} | {:>6} | {:>8} | {:>8} | {:>12} | {:>9.2} | {:>11} | {:>10} | {:>11} | {:>11} | {:>6.1} |",
            name,
            self.requests,
            self.hits,
            self.promised,
            self.promised - self.failed_loads + self.recovered,
            failed,
            self.failed_per_mille(),
            self.wrong_bytes,
            self.incomplete,
            self.failed_puts,
            self.call_errors,
            self.millis as f64 / 1000.0
        )
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    hits: AtomicU64,
    promised: AtomicU64,
    failed_loads: AtomicU64,
    recovered: AtomicU64,
    wrong_bytes: AtomicU64,
    completed: AtomicU64,
    failed_puts: AtomicU64,
    call_errors: AtomicU64,
}

/// The value every reader expects under `key`: bytes from a generator seeded by the key.
pub fn value_of(key: &BlockKey, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    SmallRng::seed_from_u64(key.fingerprint()).fill_bytes(&mut v);
    v
}

/// The key of block `pos` of a chain: chains of one family share every block, so a prompt's
/// blocks up to its shared prefix are the family's and the rest its own.
fn block_key(ns: &Arc<Namespace>, chain: u64, pos: usize) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&chain.to_le_bytes());
    h[8..16].copy_from_slice(&(pos as u64).to_le_bytes());
    h[16..24].copy_from_slice(&0x7261_6365u64.to_le_bytes());
    BlockKey::new(ns.clone(), BlockHash(h))
}

/// The blocks of request `r`: a Zipf-like pick of a family, a shared prefix of it, then the
/// request's own blocks.
fn prompt(cfg: &RaceConfig, ns: &Arc<Namespace>, r: u64) -> Vec<BlockKey> {
    let mut rng = SmallRng::seed_from_u64(cfg.seed ^ r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    // Squaring a uniform draw favours low family ids: a few hot prefixes, a long tail.
    let u: f64 = rng.gen();
    let family = ((u * u) * cfg.families as f64) as u64;
    let prefix = rng.gen_range(1..=cfg.max_prefix.max(1));
    let suffix = rng.gen_range(0..=cfg.max_suffix);
    let mut keys: Vec<BlockKey> = (0..prefix).map(|p| block_key(ns, family, p)).collect();
    let own = u64::MAX - r;
    keys.extend((prefix..prefix + suffix).map(|p| block_key(ns, own, p)));
    keys
}

/// Runs `cfg` in namespace `model` and counts. Instance `i` uses `backends[i % len]`: one
/// backend shared by all, or one client per instance of a shared store.
///
/// # Panics
/// If `backends` is empty.
pub async fn run(backends: &[Arc<dyn KvBackend>], model: &str, cfg: &RaceConfig) -> RaceReport {
    assert!(!backends.is_empty(), "a race needs a backend");
    let ns = Arc::new(Namespace::single_rank(model).expect("a valid model name"));
    let counters = Arc::new(Counters::default());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..cfg.instances.max(1) {
        let (backend, ns, counters, next, cfg) = (
            backends[i % backends.len()].clone(),
            ns.clone(),
            counters.clone(),
            next.clone(),
            cfg.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= cfg.requests as u64 {
                    break;
                }
                counters.requests.fetch_add(1, Ordering::Relaxed);
                let keys = prompt(&cfg, &ns, r);
                // A request that hangs is what `incomplete` counts; a minute is far past any
                // step of a healthy backend.
                let done = tokio::time::timeout(
                    Duration::from_secs(60),
                    request(&*backend, &cfg, &keys, &counters),
                )
                .await;
                if done.is_ok() {
                    counters.completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        // A panicked instance leaves its requests uncounted as completed.
        let _ = t.await;
    }
    let c = &counters;
    let requests = c.requests.load(Ordering::Relaxed);
    RaceReport {
        requests,
        hits: c.hits.load(Ordering::Relaxed),
        promised: c.promised.load(Ordering::Relaxed),
        failed_loads: c.failed_loads.load(Ordering::Relaxed),
        recovered: c.recovered.load(Ordering::Relaxed),
        wrong_bytes: c.wrong_bytes.load(Ordering::Relaxed),
        incomplete: requests - c.completed.load(Ordering::Relaxed),
        failed_puts: c.failed_puts.load(Ordering::Relaxed),
        call_errors: c.call_errors.load(Ordering::Relaxed),
        millis: started.elapsed().as_millis() as u64,
    }
}

/// One request: lookup, a step, the load of the hit, the recompute of the rest.
async fn request(backend: &dyn KvBackend, cfg: &RaceConfig, keys: &[BlockKey], c: &Counters) {
    let found = if cfg.hold.is_zero() {
        backend.exists(keys).await
    } else {
        backend.exists_for_load(keys, cfg.hold).await
    };
    let found = found.unwrap_or_else(|_| {
        c.call_errors.fetch_add(1, Ordering::Relaxed);
        vec![false; keys.len()]
    });
    let hit = found.iter().position(|p| !p).unwrap_or(keys.len());
    if hit > 0 {
        c.hits.fetch_add(1, Ordering::Relaxed);
        c.promised.fetch_add(hit as u64, Ordering::Relaxed);
    }
    tokio::time::sleep(cfg.step).await;

    let mut loaded = vec![false; hit];
    let mut pending: Vec<usize> = (0..hit).collect();
    for attempt in 0..if cfg.retry { 2 } else { 1 } {
        if pending.is_empty() {
            break;
        }
        let ok = load(backend, cfg, keys, &pending, c).await;
        let mut still = Vec::new();
        for (&i, ok) in pending.iter().zip(ok) {
            if ok {
                loaded[i] = true;
                if attempt > 0 {
                    c.recovered.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                if attempt == 0 {
                    c.failed_loads.fetch_add(1, Ordering::Relaxed);
                }
                still.push(i);
            }
        }
        pending = still;
    }
    // vLLM recomputes from the first block that did not load: its KV is needed by every
    // later block.
    let from = loaded.iter().position(|l| !l).unwrap_or(hit);
    let regions: Vec<Arc<MemRegion>> = keys[from..]
        .iter()
        .map(|k| MemRegion::from_vec(value_of(k, cfg.block_bytes)))
        .collect();
    let items = keys[from..]
        .iter()
        .zip(&regions)
        .map(|(k, r)| (k.clone(), IoVec::whole(r)))
        .collect::<Vec<_>>();
    if items.is_empty() {
        return;
    }
    let n = items.len() as u64;
    match backend.put(items).await {
        Ok(out) => {
            let failed = out.iter().filter(|o| !o.is_present()).count() as u64;
            c.failed_puts.fetch_add(failed, Ordering::Relaxed);
        }
        Err(_) => {
            c.call_errors.fetch_add(1, Ordering::Relaxed);
            c.failed_puts.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Loads blocks `which` of `keys`, checking every byte; whether each loaded intact.
async fn load(
    backend: &dyn KvBackend,
    cfg: &RaceConfig,
    keys: &[BlockKey],
    which: &[usize],
    c: &Counters,
) -> Vec<bool> {
    const UNWRITTEN: u8 = 0xA5;
    let regions: Vec<Arc<MemRegion>> = which
        .iter()
        .map(|_| MemRegion::from_vec(vec![UNWRITTEN; cfg.block_bytes]))
        .collect();
    let items = which
        .iter()
        .zip(&regions)
        .map(|(&i, r)| (keys[i].clone(), IoVecMut::whole(r)))
        .collect::<Vec<_>>();
    let out = match backend.get_into(items).await {
        Ok(out) if out.len() == which.len() => out,
        _ => {
            c.call_errors.fetch_add(1, Ordering::Relaxed);
            return vec![false; which.len()];
        }
    };
    out.iter()
        .zip(which)
        .zip(&regions)
        .map(|((o, &i), r)| match o {
            GetOutcome::Hit => {
                let want = value_of(&keys[i], cfg.block_bytes);
                let got = r.read(0, cfg.block_bytes).unwrap_or_default();
                let wrong = if got.len() == want.len() {
                    got.iter().zip(&want).filter(|(a, b)| a != b).count()
                } else {
                    want.len()
                };
                c.wrong_bytes.fetch_add(wrong as u64, Ordering::Relaxed);
                // A wrong value is never used: it is recomputed like a missing one.
                wrong == 0
            }
            GetOutcome::Miss | GetOutcome::Failed(_) => false,
        })
        .collect()
}
