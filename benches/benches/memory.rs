//! Memory backend against single-thread memcpy, measured in the same run.
//!
//! Each group benches `memcpy` beside the backend on the same shapes, so a
//! ratio comes from one run on one (noisy) machine: compare
//! `512KiBx32/memory_get` with `512KiBx32/memcpy`. Every function cycles
//! through a working set larger than the last-level cache, so all of them
//! move cold data, as a KV pool does. `single_key/*` and `exists/*` go through
//! `kvpool::open`, i.e. with the contract-check and metrics layer users get.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, Config, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome,
};
use kvpool_backend_memory::{MemoryBackend, MemoryConfig};
use rand::RngCore;

const SHAPES: &[(usize, usize)] = &[
    (4 << 10, 1),
    (4 << 10, 32),
    (512 << 10, 1),
    (512 << 10, 32),
    (16 << 20, 1),
    (16 << 20, 32),
];

/// Bytes each function cycles through.
const WORKING_SET: usize = 256 << 20;

fn label(size: usize, batch: usize) -> String {
    let size = if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    };
    format!("{size}x{batch}")
}

fn key(ns: &Arc<Namespace>, i: u64) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockKey::new(ns.clone(), BlockHash(h))
}

/// Page-aligned like an engine's KV tensors (see `MemRegion::alloc`).
fn filled(len: usize) -> Arc<MemRegion> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    let region = MemRegion::alloc(len);
    region.write(0, &v).unwrap();
    region
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let ns = Arc::new(Namespace::single_rank("bench").unwrap());
    for &(size, batch) in SHAPES {
        let batch_bytes = size * batch;
        let slots = (WORKING_SET / batch_bytes).max(2);
        let total = slots * batch_bytes;
        let src = filled(total);
        let dst = filled(total);
        let mut group = c.benchmark_group(label(size, batch));
        group.throughput(Throughput::Bytes(batch_bytes as u64));
        if batch_bytes >= 8 << 20 {
            group.sample_size(10);
        }

        let mut slot = 0usize;
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                let base = (slot % slots) * batch_bytes;
                slot += 1;
                for i in 0..batch {
                    // SAFETY: both regions are `total` bytes and distinct.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr().add(base + i * size),
                            dst.as_ptr().add(base + i * size),
                            size,
                        )
                    }
                }
            })
        });

        // Room for the whole working set under the eviction watermark, so
        // every value the get bench reads is resident.
        let pool = MemoryBackend::new(MemoryConfig {
            capacity: ByteSize(2 * total as u64),
            ..MemoryConfig::default()
        })
        .unwrap();
        let mut next = 0u64;
        group.bench_function("memory_put", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let base = (next as usize / batch % slots) * batch_bytes;
                    let items: Vec<_> = (0..batch)
                        .map(|i| {
                            next += 1;
                            (
                                key(&ns, next),
                                IoVec::single(&src, base + i * size, size).unwrap(),
                            )
                        })
                        .collect();
                    let t = Instant::now();
                    let out = rt.block_on(pool.put(items)).unwrap();
                    spent += t.elapsed();
                    assert!(out.iter().all(|o| matches!(o, PutOutcome::Stored)));
                }
                spent
            })
        });

        // A fresh namespace of `slots` batches, all resident, read cyclically.
        let stored = Arc::new(Namespace::single_rank("bench-get").unwrap());
        for s in 0..slots {
            let items = (0..batch)
                .map(|i| {
                    let k = key(&stored, (s * batch + i) as u64);
                    (
                        k,
                        IoVec::single(&src, s * batch_bytes + i * size, size).unwrap(),
                    )
                })
                .collect();
            let out = rt.block_on(pool.put(items)).unwrap();
            assert!(out.iter().all(|o| o.is_present()));
        }
        let mut call = 0usize;
        group.bench_function("memory_get", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let s = call % slots;
                    call += 1;
                    let items: Vec<_> = (0..batch)
                        .map(|i| {
                            let k = key(&stored, (s * batch + i) as u64);
                            let off = s * batch_bytes + i * size;
                            (k, IoVecMut::single(&dst, off, size).unwrap())
                        })
                        .collect();
                    let t = Instant::now();
                    let out = rt.block_on(pool.get_into(items)).unwrap();
                    spent += t.elapsed();
                    assert!(out.iter().all(|o| o.is_hit()), "a resident value missed");
                }
                spent
            })
        });
        group.finish();
    }
}

/// Per-call latency through `kvpool::open` (check layer and metrics included).
fn single_key_and_exists(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "memory": { "capacity": "512MiB" }
    }))
    .unwrap();
    let pool = rt.block_on(kvpool::open(&config)).unwrap();
    let ns = Arc::new(Namespace::single_rank("bench-single").unwrap());
    let src = filled(4096);
    let dst = filled(4096);
    let mut next = 0u64;
    c.bench_function("single_key/put_4KiB", |b| {
        b.iter(|| {
            next += 1;
            let out = rt
                .block_on(pool.put(vec![(key(&ns, next), IoVec::whole(&src))]))
                .unwrap();
            assert!(matches!(out[0], PutOutcome::Stored));
        })
    });
    // Written after the put bench, whose keys have long since cycled the pool.
    let resident = key(&ns, u64::MAX);
    rt.block_on(pool.put(vec![(resident.clone(), IoVec::whole(&src))]))
        .unwrap();
    c.bench_function("single_key/get_4KiB", |b| {
        b.iter(|| {
            let out = rt
                .block_on(pool.get_into(vec![(resident.clone(), IoVecMut::whole(&dst))]))
                .unwrap();
            assert!(out[0].is_hit());
        })
    });

    let prefix_ns = Arc::new(Namespace::single_rank("bench-exists").unwrap());
    let prefix: Vec<BlockKey> = (0..1000).map(|i| key(&prefix_ns, i)).collect();
    for chunk in prefix.chunks(250) {
        let items = chunk
            .iter()
            .map(|k| (k.clone(), IoVec::whole(&src)))
            .collect();
        rt.block_on(pool.put(items)).unwrap();
    }
    c.bench_function("exists/1000_key_prefix", |b| {
        b.iter(|| {
            let present = rt.block_on(pool.exists(&prefix)).unwrap();
            assert!(present.iter().all(|p| *p));
        })
    });
}

criterion_group!(benches, single_key_and_exists, throughput);
criterion_main!(benches);
