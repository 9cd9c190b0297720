//! Memory backend against single-thread memcpy of the same shapes.
//!
//! Every group benches `memcpy` beside the backend so the ratio is taken from
//! one run on one (noisy) machine: compare `memory/get/...` with
//! `memcpy/...` of the same size and batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvpool::size::ByteSize;
use kvpool::{BlockHash, BlockKey, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome};
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

fn label(size: usize, batch: usize) -> String {
    let size = if size >= 1 << 20 {
        format!("{}MiB", size >> 20)
    } else {
        format!("{}KiB", size >> 10)
    };
    format!("{size}x{batch}")
}

fn backend(capacity: u64) -> Arc<MemoryBackend> {
    Arc::new(
        MemoryBackend::new(MemoryConfig {
            capacity: ByteSize(capacity),
            ..MemoryConfig::default()
        })
        .expect("memory backend"),
    )
}

struct Keys {
    ns: Arc<Namespace>,
    next: u64,
}

impl Keys {
    fn new() -> Self {
        Keys {
            ns: Arc::new(Namespace::single_rank("bench").unwrap()),
            next: 0,
        }
    }
    fn key(&self, i: u64) -> BlockKey {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&i.to_le_bytes());
        BlockKey::new(self.ns.clone(), BlockHash(h))
    }
    fn fresh(&mut self) -> BlockKey {
        self.next += 1;
        self.key(self.next)
    }
}

fn filled(len: usize) -> Arc<MemRegion> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    MemRegion::from_vec(v)
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for &(size, batch) in SHAPES {
        let total = size * batch;
        let src = filled(total);
        let dst = filled(total);
        let mut group = c.benchmark_group(label(size, batch));
        group.throughput(Throughput::Bytes(total as u64));
        if total >= 8 << 20 {
            group
                .sample_size(10)
                .measurement_time(Duration::from_secs(3));
        }

        group.bench_function(BenchmarkId::new("memcpy", ""), |b| {
            b.iter(|| {
                for i in 0..batch {
                    // SAFETY: both regions are `total` bytes and distinct.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr().add(i * size),
                            dst.as_ptr().add(i * size),
                            size,
                        )
                    }
                }
            })
        });

        // Capacity for many batches, so steady-state puts include eviction passes.
        let pool = backend(((total as u64) * 8).max(64 << 20));
        let mut keys = Keys::new();
        group.bench_function(BenchmarkId::new("memory_put", ""), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let items: Vec<_> = (0..batch)
                        .map(|i| (keys.fresh(), IoVec::single(&src, i * size, size).unwrap()))
                        .collect();
                    let t = Instant::now();
                    let out = rt.block_on(pool.put(items)).unwrap();
                    spent += t.elapsed();
                    assert!(out.iter().all(|o| matches!(o, PutOutcome::Stored)));
                }
                spent
            })
        });

        let stored: Vec<BlockKey> = (0..batch).map(|_| keys.fresh()).collect();
        let items = stored
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), IoVec::single(&src, i * size, size).unwrap()))
            .collect();
        rt.block_on(pool.put(items)).unwrap();
        group.bench_function(BenchmarkId::new("memory_get", ""), |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let items: Vec<_> = stored
                        .iter()
                        .enumerate()
                        .map(|(i, k)| (k.clone(), IoVecMut::single(&dst, i * size, size).unwrap()))
                        .collect();
                    let t = Instant::now();
                    let out = rt.block_on(pool.get_into(items)).unwrap();
                    spent += t.elapsed();
                    assert!(out.iter().all(|o| o.is_hit()));
                }
                spent
            })
        });
        group.finish();
    }
}

fn exists_prefix(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let pool = backend(64 << 20);
    let keys = Keys::new();
    let src = filled(64);
    let prefix: Vec<BlockKey> = (0..1000).map(|i| keys.key(i)).collect();
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

criterion_group!(benches, throughput, exists_prefix);
criterion_main!(benches);
