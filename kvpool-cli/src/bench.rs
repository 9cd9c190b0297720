//! `kvpool bench`: throughput of one backend against memcpy measured in the same run.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, Error, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace,
    PutOutcome,
};
use rand::RngCore;
use serde::Serialize;

use crate::{ConfigArgs, OutputArgs};

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The backend to measure (overrides the config's `backend`).
    #[arg(long)]
    backend: String,
    /// Bytes per value, e.g. 4KiB, 512KiB, 16MiB.
    #[arg(long, default_value = "512KiB")]
    value_size: ByteSize,
    /// Keys per call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Seconds spent in each phase.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Keys per `exists` call in the exists phase.
    #[arg(long, default_value_t = 1000)]
    exists_keys: usize,
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    backend: String,
    value_size: u64,
    batch: usize,
    working_set: u64,
    memcpy_gbps: f64,
    put_gbps: f64,
    get_gbps: f64,
    put_vs_memcpy: f64,
    get_vs_memcpy: f64,
    exists_ops: f64,
    exists_call_us: f64,
    put_calls: u64,
    get_calls: u64,
}

pub(crate) fn run(args: BenchArgs) -> kvpool::Result<ExitCode> {
    let value_size = usize::try_from(args.value_size.0)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::invalid_argument("--value-size must be at least 1 byte"))?;
    if args.batch == 0 || args.exists_keys == 0 {
        return Err(Error::invalid_argument(
            "--batch and --exists-keys must be at least 1",
        ));
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err(Error::invalid_argument("--seconds must be positive"));
    }
    let phase = Duration::from_secs_f64(args.seconds);
    let config = args.config.load(Some(&args.backend))?;
    let rt = crate::runtime();
    let backend = rt.block_on(kvpool::open(&config))?;
    let bar = crate::progress(4, "bench");
    let result = rt.block_on(measure(&backend, &args, value_size, phase, &bar));
    bar.finish_and_clear();
    rt.block_on(backend.close())?;
    let report = result?;
    if args.output.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        println!(
            "{} backend, {} values, batch {}",
            report.backend, args.value_size, report.batch
        );
        println!(
            "  memcpy  {:>8.2} GB/s (single thread, same buffers)",
            report.memcpy_gbps
        );
        println!(
            "  put     {:>8.2} GB/s  = {:.2}x memcpy",
            report.put_gbps, report.put_vs_memcpy
        );
        println!(
            "  get     {:>8.2} GB/s  = {:.2}x memcpy",
            report.get_gbps, report.get_vs_memcpy
        );
        println!(
            "  exists  {:>8.0} keys/s ({:.1} µs per {}-key call)",
            report.exists_ops, report.exists_call_us, args.exists_keys
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes the bench cycles through: well past any last-level cache, so every
/// phase (memcpy included) moves cold data, as a KV pool does.
const WORKING_SET: usize = 256 << 20;

async fn measure(
    backend: &Arc<dyn KvBackend>,
    args: &BenchArgs,
    value_size: usize,
    phase: Duration,
    bar: &indicatif::ProgressBar,
) -> kvpool::Result<BenchReport> {
    let batch = args.batch;
    let batch_bytes = value_size.checked_mul(batch).ok_or_else(|| {
        Error::invalid_argument("--value-size x --batch overflows the address space")
    })?;
    // Keep the values the get phase reads well under the backend's
    // eviction watermark, or they would be gone before they are read.
    let room = backend
        .info()
        .capabilities
        .max_value_size
        .filter(|_| backend.info().capabilities.capacity_bound)
        .map_or(usize::MAX, |cap| cap / 2);
    let slots = (WORKING_SET.min(room) / batch_bytes).max(1);
    let total = slots * batch_bytes;
    // Sources are filled (and so faulted in) before any timing starts.
    let mut data = vec![0u8; total];
    rand::thread_rng().fill_bytes(&mut data);
    let src = MemRegion::alloc(total);
    src.write(0, &data)?;
    drop(data);
    let dst = MemRegion::alloc(total);
    backend.register(&src).await?;
    backend.register(&dst).await?;
    let piece = |slot: usize, i: usize| (slot % slots) * batch_bytes + i * value_size;

    bar.set_message("memcpy");
    let memcpy_gbps = memcpy_baseline(&src, &dst, value_size, batch, slots, phase);
    bar.inc(1);

    let ns = Arc::new(Namespace::single_rank(&format!(
        "kvpool-bench-{:016x}",
        rand::random::<u64>()
    ))?);
    let key = |i: u64| {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        BlockKey::new(ns.clone(), BlockHash(h))
    };

    bar.set_message("put");
    let mut put_calls = 0u64;
    let mut put_bytes = 0u64;
    let started = Instant::now();
    // At least one full cycle, so the get phase has every slot to read.
    while started.elapsed() < phase || (put_calls as usize) < slots {
        let slot = put_calls as usize;
        let items = (0..batch)
            .map(|i| {
                let k = key(put_calls * batch as u64 + i as u64);
                Ok((k, IoVec::single(&src, piece(slot, i), value_size)?))
            })
            .collect::<kvpool::Result<Vec<_>>>()?;
        for o in backend.put(items).await? {
            match o {
                PutOutcome::Stored => put_bytes += value_size as u64,
                PutOutcome::Exists => {}
                PutOutcome::Failed(e) => return Err(e.with_operation("bench")),
            }
        }
        put_calls += 1;
    }
    let put_gbps = put_bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    bar.inc(1);

    // Read back the last `slots` batches written, each into its own slot of
    // `dst`, cycling; every slot's key was written from the same slot of `src`.
    bar.set_message("get");
    let first_call = put_calls - slots as u64;
    let mut get_calls = 0u64;
    let mut get_bytes = 0u64;
    let started = Instant::now();
    while started.elapsed() < phase || get_calls == 0 {
        let call = first_call + get_calls % slots as u64;
        let slot = call as usize;
        let items = (0..batch)
            .map(|i| {
                let k = key(call * batch as u64 + i as u64);
                Ok((k, IoVecMut::single(&dst, piece(slot, i), value_size)?))
            })
            .collect::<kvpool::Result<Vec<_>>>()?;
        for o in backend.get_into(items).await? {
            match o {
                GetOutcome::Hit => get_bytes += value_size as u64,
                GetOutcome::Miss => {
                    return Err(Error::new(
                        kvpool::ErrorKind::Unexpected,
                        "a value written by this run was missing; raise the backend's capacity",
                    ))
                }
                GetOutcome::Failed(e) => return Err(e.with_operation("bench")),
            }
        }
        get_calls += 1;
    }
    let get_gbps = get_bytes as f64 / started.elapsed().as_secs_f64() / 1e9;
    let checked = (get_calls as usize).min(slots) * batch_bytes;
    let first = piece(first_call as usize, 0);
    if dst.read(first, checked.min(total - first))?
        != src.read(first, checked.min(total - first))?
    {
        return Err(Error::new(
            kvpool::ErrorKind::Corrupted,
            "bench read back different bytes than it wrote",
        ));
    }
    bar.inc(1);

    bar.set_message("exists");
    let n = args.exists_keys as u64;
    let written = put_calls * batch as u64;
    let probe: Vec<BlockKey> = (written.saturating_sub(n)..written.saturating_sub(n) + n)
        .map(key)
        .collect();
    let mut exists_calls = 0u64;
    let started = Instant::now();
    while started.elapsed() < phase || exists_calls == 0 {
        let present = backend.exists(&probe).await?;
        std::hint::black_box(present);
        exists_calls += 1;
    }
    let elapsed = started.elapsed().as_secs_f64();
    bar.inc(1);

    Ok(BenchReport {
        backend: backend.info().scheme.to_string(),
        value_size: value_size as u64,
        batch,
        working_set: total as u64,
        memcpy_gbps,
        put_gbps,
        get_gbps,
        put_vs_memcpy: put_gbps / memcpy_gbps,
        get_vs_memcpy: get_gbps / memcpy_gbps,
        exists_ops: (exists_calls * n) as f64 / elapsed,
        exists_call_us: elapsed * 1e6 / exists_calls as f64,
        put_calls,
        get_calls,
    })
}

/// Single-thread memcpy of the same pieces between the same buffers. Like the
/// store's own copies (values live wherever the allocator put them; an
/// engine's KV blocks are paged), each piece is read from and written to a
/// pseudo-random piece position of the working set, so neither side is one
/// long sequential stream.
fn memcpy_baseline(
    src: &MemRegion,
    dst: &MemRegion,
    value_size: usize,
    batch: usize,
    slots: usize,
    phase: Duration,
) -> f64 {
    let pieces = slots * batch;
    // A multiplicative walk over piece positions: deterministic, cache-hostile.
    let position = |n: usize, stride: usize| (n.wrapping_mul(stride) % pieces) * value_size;
    let mut bytes = 0u64;
    let mut n = 0usize;
    let started = Instant::now();
    while started.elapsed() < phase || bytes == 0 {
        for _ in 0..batch {
            // SAFETY: both regions are `pieces * value_size` long and distinct.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().add(position(n, 40_503)),
                    dst.as_ptr().add(position(n, 65_537)),
                    value_size,
                )
            };
            n += 1;
        }
        bytes += (value_size * batch) as u64;
    }
    std::hint::black_box(dst.as_ptr());
    bytes as f64 / started.elapsed().as_secs_f64() / 1e9
}
