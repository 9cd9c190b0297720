//! `kvpool replay --payload SIZE --backend B`: the trace with real bytes.
//!
//! Each request runs as the connector runs it: `exists` on the request's
//! blocks, `get_into` of the present prefix (every loaded byte checked
//! against what was stored), then `put` of the blocks that were missing, in
//! prefix order. The hit ratio is therefore the pool's own — its sharding,
//! watermark eviction and policy included — and is printed beside the
//! offline replay of the same policy and capacity.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::trace::{ReplayOptions, Replayer, TraceRequest};
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion,
    Namespace, PutOutcome,
};
use serde::Serialize;

use crate::ConfigArgs;

/// Lateness that counts as late under --respect-timestamps.
const LATE: Duration = Duration::from_millis(10);

/// What `--payload` needs besides the trace and the replay options.
#[derive(Debug)]
pub(crate) struct PayloadArgs {
    pub size: ByteSize,
    pub backend: String,
    pub config: ConfigArgs,
    /// `--policy`, when given: passed to the backend's config.
    pub policy: Option<String>,
    pub respect_timestamps: bool,
    pub speed: f64,
}

#[derive(Debug, Default, Serialize)]
struct PayloadReport {
    backend: String,
    backend_description: String,
    payload_bytes: u64,
    capacity_blocks: Option<u64>,
    requests: u64,
    input_tokens: u64,
    hit_tokens: u64,
    token_hit_ratio: f64,
    block_hit_ratio: f64,
    /// The offline replay of the same policy, capacity and watermark: what
    /// the pool would deliver as one unsharded policy.
    offline_token_hit_ratio: Option<f64>,
    blocks_loaded: u64,
    blocks_stored: u64,
    put_failed: u64,
    get_failed: u64,
    bytes_loaded: u64,
    bytes_stored: u64,
    bytes_verified: u64,
    get_gbps: f64,
    put_gbps: f64,
    requests_per_s: f64,
    /// Wall time, waits for arrival times included.
    seconds: f64,
    /// Time spent on the requests themselves.
    busy_seconds: f64,
    /// With --respect-timestamps: how far behind the trace's clock the
    /// latest request started, and how many started late (over 10 ms).
    max_lag_ms: Option<f64>,
    late_requests: Option<u64>,
}

pub(crate) fn run(
    requests: &[TraceRequest],
    opts: &ReplayOptions,
    args: &PayloadArgs,
    json: bool,
) -> kvpool::Result<ExitCode> {
    let size = usize::try_from(args.size.0)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::invalid_argument("--payload must be at least 1 byte"))?;
    if !(args.speed > 0.0 && args.speed.is_finite()) {
        return Err(Error::invalid_argument(format!(
            "--speed must be a positive number, got {}",
            args.speed
        )));
    }
    if args.respect_timestamps {
        if let Some(i) = requests.iter().position(|r| r.timestamp.is_none()) {
            return Err(Error::invalid_argument(format!(
                "--respect-timestamps: request {} of the trace has no timestamp",
                i + 1
            )));
        }
    }
    let config = config_with_capacity(args, opts, size)?;
    let offline = offline(requests, opts, &config)?;
    let rt = crate::runtime();
    let backend = rt.block_on(kvpool::open(&config))?;
    let bar = crate::progress(requests.len() as u64, "replay");
    let result = rt.block_on(replay(&backend, requests, opts, args, size, &bar));
    bar.finish_and_clear();
    rt.block_on(backend.close())?;
    let mut report = result?;
    report.capacity_blocks = opts.capacity_blocks;
    report.offline_token_hit_ratio = offline;
    if json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        print(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The config to open: the user's, plus the capacity and policy asked for
/// on the command line. Only the memory backend's section is known here;
/// other backends take both from their own config.
fn config_with_capacity(
    args: &PayloadArgs,
    opts: &ReplayOptions,
    size: usize,
) -> kvpool::Result<kvpool::Config> {
    let config = args.config.load(Some(&args.backend))?;
    if opts.capacity_blocks.is_none() && args.policy.is_none() {
        return Ok(config);
    }
    if args.backend != "memory" {
        return Err(Error::invalid_argument(format!(
            "--capacity-tokens, --capacity-blocks and --policy with --payload size the memory \
             backend only; set {}'s capacity and policy in its config",
            args.backend
        )));
    }
    let mut extra = match &args.config.extra_config {
        Some(text) => serde_json::from_str::<serde_json::Value>(text)
            .map_err(|e| Error::config_invalid(format!("--extra-config is not valid JSON: {e}")))?,
        None => serde_json::json!({}),
    };
    let memory = extra
        .as_object_mut()
        .ok_or_else(|| Error::config_invalid("--extra-config must be a JSON object"))?
        .entry("memory")
        .or_insert_with(|| serde_json::json!({}));
    let memory = memory
        .as_object_mut()
        .ok_or_else(|| Error::config_invalid("--extra-config: \"memory\" must be an object"))?;
    if let Some(blocks) = opts.capacity_blocks {
        // The backend charges whole chunks: size the pool so `blocks`
        // values fit, as the capacity in tokens promises.
        let chunk = memory_chunk_size(&config)?;
        let per_value = (size as u64).div_ceil(chunk) * chunk;
        memory.insert("capacity".into(), (blocks * per_value).into());
    }
    if let Some(policy) = &args.policy {
        memory.insert("policy".into(), policy.clone().into());
    }
    ConfigArgs {
        config: args.config.config.clone(),
        extra_config: Some(extra.to_string()),
    }
    .load(Some(&args.backend))
}

#[cfg(feature = "memory")]
fn memory_section(
    config: &kvpool::Config,
) -> kvpool::Result<kvpool::backends::memory::MemoryConfig> {
    config.section("memory")
}

#[cfg(feature = "memory")]
fn memory_chunk_size(config: &kvpool::Config) -> kvpool::Result<u64> {
    Ok(memory_section(config)?.chunk_size.0)
}

#[cfg(not(feature = "memory"))]
fn memory_chunk_size(_: &kvpool::Config) -> kvpool::Result<u64> {
    Err(Error::invalid_argument(
        "this kvpool was built without the memory backend",
    ))
}

/// The offline figure to compare with: same policy and capacity, and the
/// memory backend's watermark when that is the backend.
fn offline(
    requests: &[TraceRequest],
    opts: &ReplayOptions,
    config: &kvpool::Config,
) -> kvpool::Result<Option<f64>> {
    if opts.capacity_blocks.is_none() {
        return Ok(None);
    }
    #[allow(unused_mut)]
    let mut opts = opts.clone();
    #[cfg(feature = "memory")]
    if config.backend == "memory" {
        let memory = memory_section(config)?;
        opts.policy = memory.policy.clone();
        opts.watermark = Some(memory.watermark());
    }
    #[cfg(not(feature = "memory"))]
    let _ = config;
    let mut replayer = Replayer::new(&opts)?;
    for r in requests {
        replayer.feed(r);
    }
    Ok(Some(replayer.report().token_hit_ratio))
}

/// The key of trace block `id`, in a namespace of its own per run so a
/// shared pool's earlier contents never count as hits.
fn key(ns: &Arc<Namespace>, id: u64) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&id.to_le_bytes());
    h[8..16].copy_from_slice(b"kvreplay");
    BlockKey::new(ns.clone(), BlockHash(h))
}

/// The value of block `id`: cheap to write and to check, and different for
/// every block and every 8-byte word, so a value returned under the wrong
/// key or shifted by any whole word is caught.
fn word(id: u64, j: usize) -> [u8; 8] {
    id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(j as u64)
        .rotate_left(17)
        .to_le_bytes()
}

fn fill(id: u64, out: &mut [u8]) {
    for (j, chunk) in out.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&word(id, j)[..chunk.len()]);
    }
}

fn matches(id: u64, got: &[u8]) -> bool {
    got.chunks(8)
        .enumerate()
        .all(|(j, chunk)| chunk == &word(id, j)[..chunk.len()])
}

/// `len` bytes at `offset` of a region this replay owns, read in place.
///
/// # Safety
///
/// The range must be in bounds, and no backend call may be writing it.
unsafe fn bytes(region: &MemRegion, offset: usize, len: usize) -> &[u8] {
    debug_assert!(offset + len <= region.len());
    // SAFETY: the caller guarantees bounds and that nothing writes the range.
    unsafe { std::slice::from_raw_parts(region.as_ptr().add(offset), len) }
}

async fn replay(
    backend: &Arc<dyn KvBackend>,
    requests: &[TraceRequest],
    opts: &ReplayOptions,
    args: &PayloadArgs,
    size: usize,
    bar: &indicatif::ProgressBar,
) -> kvpool::Result<PayloadReport> {
    let longest = requests
        .iter()
        .map(|r| r.hash_ids.len())
        .max()
        .unwrap_or(0)
        .max(1);
    let span = longest.checked_mul(size).ok_or_else(|| {
        Error::invalid_argument("--payload times the longest request overflows the address space")
    })?;
    let src = MemRegion::alloc(span);
    let mut value = vec![0u8; size];
    let dst = MemRegion::alloc(span);
    backend.register(&src).await?;
    backend.register(&dst).await?;
    let ns = Arc::new(Namespace::single_rank(&format!(
        "kvpool-replay-{:016x}",
        rand::random::<u64>()
    ))?);
    let info = backend.info();
    let mut r = PayloadReport {
        backend: info.scheme.to_string(),
        backend_description: info.description.clone(),
        payload_bytes: size as u64,
        ..PayloadReport::default()
    };
    let (mut get_time, mut put_time, mut busy) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut hit_blocks = 0u64;
    let mut blocks = 0u64;
    let mut stored_ids = Vec::new();
    let mut max_lag = Duration::ZERO;
    let mut late = 0u64;
    let t0 = requests.first().and_then(|q| q.timestamp).unwrap_or(0);
    let started = tokio::time::Instant::now();

    for (n, req) in requests.iter().enumerate() {
        if args.respect_timestamps {
            let at = req
                .timestamp
                .expect("checked before the run")
                .saturating_sub(t0);
            let due = started + Duration::from_secs_f64(at as f64 / 1000.0 / args.speed);
            let now = tokio::time::Instant::now();
            if now < due {
                tokio::time::sleep_until(due).await;
            } else {
                // Requests run one at a time: a burst of arrivals in one
                // millisecond starts a little late by construction, so only
                // lateness past the timer's granularity counts.
                let lag = now - due;
                max_lag = max_lag.max(lag);
                late += u64::from(lag > LATE);
            }
        }
        let request_started = Instant::now();
        let keys: Vec<BlockKey> = req.hash_ids.iter().map(|&id| key(&ns, id)).collect();
        let present = backend.exists(&keys).await?;
        let prefix = present.iter().take_while(|&&p| p).count();

        let mut hits = 0;
        if prefix > 0 {
            let items = keys[..prefix]
                .iter()
                .enumerate()
                .map(|(i, k)| Ok((k.clone(), IoVecMut::single(&dst, i * size, size)?)))
                .collect::<kvpool::Result<Vec<_>>>()?;
            let t = Instant::now();
            let outcomes = backend.get_into(items).await?;
            get_time += t.elapsed();
            for (i, o) in outcomes.iter().enumerate() {
                match o {
                    GetOutcome::Hit => {}
                    GetOutcome::Miss => break,
                    GetOutcome::Failed(_) => {
                        r.get_failed += 1;
                        break;
                    }
                }
                // SAFETY: in bounds (i < prefix <= longest); the get is done.
                let got = unsafe { bytes(&dst, i * size, size) };
                if !matches(req.hash_ids[i], got) {
                    return Err(Error::new(
                        ErrorKind::Corrupted,
                        format!(
                            "request {}: block {} loaded from {} differs from what was stored",
                            n + 1,
                            req.hash_ids[i],
                            r.backend
                        ),
                    ));
                }
                r.bytes_verified += size as u64;
                hits += 1;
            }
        }
        r.blocks_loaded += hits as u64;
        r.bytes_loaded += (hits * size) as u64;

        // Store what the request computed and the pool lacks: blocks after
        // the hits that `exists` did not report (those it did report but
        // that could not be loaded are stored again).
        let missing: Vec<usize> = (hits..keys.len())
            .filter(|&i| i < prefix || !present[i])
            .collect();
        if !missing.is_empty() {
            let mut items = Vec::with_capacity(missing.len());
            for (slot, &i) in missing.iter().enumerate() {
                fill(req.hash_ids[i], &mut value);
                src.write(slot * size, &value)?;
                items.push((keys[i].clone(), IoVec::single(&src, slot * size, size)?));
            }
            let t = Instant::now();
            let outcomes = backend.put(items).await?;
            put_time += t.elapsed();
            for (o, &i) in outcomes.iter().zip(&missing) {
                match o {
                    PutOutcome::Stored => {
                        r.blocks_stored += 1;
                        stored_ids.push(req.hash_ids[i]);
                    }
                    PutOutcome::Exists => {}
                    PutOutcome::Failed(e) => {
                        if r.put_failed == 0 {
                            tracing::warn!(
                                "replay: a put failed (further failures are counted): {e}"
                            );
                        }
                        r.put_failed += 1;
                    }
                }
            }
        }

        r.requests += 1;
        r.input_tokens += req.input_length;
        r.hit_tokens += (hits as u64 * opts.block_tokens).min(req.input_length);
        blocks += req.hash_ids.len() as u64;
        hit_blocks += hits as u64;
        busy += request_started.elapsed();
        if n % 64 == 63 {
            bar.inc(64);
        }
    }
    let wall = started.elapsed();

    // A shared pool outlives this process: leave it as it was found.
    if info.capabilities.shared && info.capabilities.remove {
        for ids in stored_ids.chunks(1024) {
            let keys: Vec<BlockKey> = ids.iter().map(|&id| key(&ns, id)).collect();
            backend.remove(&keys).await?;
        }
    }

    r.bytes_stored = r.blocks_stored * size as u64;
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let gbps = |bytes: u64, t: Duration| {
        if t.is_zero() {
            0.0
        } else {
            bytes as f64 / t.as_secs_f64() / 1e9
        }
    };
    r.token_hit_ratio = ratio(r.hit_tokens, r.input_tokens);
    r.block_hit_ratio = ratio(hit_blocks, blocks);
    r.get_gbps = gbps(r.bytes_loaded, get_time);
    r.put_gbps = gbps(r.bytes_stored, put_time);
    r.seconds = wall.as_secs_f64();
    r.busy_seconds = busy.as_secs_f64();
    r.requests_per_s = if r.busy_seconds > 0.0 {
        r.requests as f64 / r.busy_seconds
    } else {
        0.0
    };
    if args.respect_timestamps {
        r.max_lag_ms = Some(max_lag.as_secs_f64() * 1000.0);
        r.late_requests = Some(late);
    }
    Ok(r)
}

fn print(r: &PayloadReport) {
    println!("backend          {} ({})", r.backend, r.backend_description);
    println!("payload          {} per block", ByteSize(r.payload_bytes));
    if let Some(blocks) = r.capacity_blocks {
        println!("capacity         {blocks} blocks");
    }
    println!("requests         {}", r.requests);
    print!("token hit ratio  {:.3}", r.token_hit_ratio);
    match r.offline_token_hit_ratio {
        Some(offline) => println!("  (offline replay of the same policy: {offline:.3})"),
        None => println!(),
    }
    println!("block hit ratio  {:.3}", r.block_hit_ratio);
    println!(
        "loaded           {} blocks, {:.2} GB/s, every byte verified",
        r.blocks_loaded, r.get_gbps
    );
    println!(
        "stored           {} blocks, {:.2} GB/s{}",
        r.blocks_stored,
        r.put_gbps,
        if r.put_failed > 0 {
            format!(", {} puts failed", r.put_failed)
        } else {
            String::new()
        }
    );
    println!(
        "throughput       {:.0} requests/s over {:.2} s busy ({:.2} s wall)",
        r.requests_per_s, r.busy_seconds, r.seconds
    );
    if let (Some(lag), Some(late)) = (r.max_lag_ms, r.late_requests) {
        println!("behind schedule  {late} requests over 10 ms late, at most {lag:.1} ms");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_differ_per_block_and_verify() {
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 100];
        fill(1, &mut a);
        fill(2, &mut b);
        assert_ne!(a, b);
        assert!(matches(1, &a));
        assert!(!matches(2, &a));
        a[99] ^= 1;
        assert!(!matches(1, &a));
    }
}
