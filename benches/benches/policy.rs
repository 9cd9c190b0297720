//! Eviction policies at scale: the cost of one operation on a policy that
//! already tracks 1M and 10M blocks.
//!
//! A pool of a few hundred GiB holds millions of blocks, and every put and
//! get passes through the policy under a shard lock, so its per-operation
//! cost must stay flat as it grows (O(1) amortized for `lru` and `chain`).
//! Comparing `1M/*` with `10M/*` shows how flat: what growth there is comes
//! from cache misses on a larger working set, not from the algorithm.
//!
//! - `touch`: a hit on a random cached block.
//! - `insert_evict`: a new block into a full policy, which evicts one.
//! - `request`: what one replayed request does — touch a random 8-block
//!   cached prefix, then insert 8 new blocks, each naming its parent, and
//!   evict 8; a quarter of the new blocks were evicted recently, so the
//!   chain policy's ghost lookups and re-admissions are on the path. The
//!   time is per block (16 operations).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvpool::eviction::{policy_by_name, EvictionPolicy, POLICIES};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const SIZES: &[(&str, u64)] = &[("1M", 1_000_000), ("10M", 10_000_000)];

/// A policy holding `n` blocks, keys `0..n`, some already reused.
fn filled(name: &str, n: u64) -> Box<dyn EvictionPolicy<u64>> {
    let mut p = policy_by_name::<u64>(name).unwrap();
    let mut parent = None;
    for k in 0..n {
        // Chains of 16, as requests are.
        if k % 16 == 0 {
            parent = None;
        }
        p.insert_after(k, 1, parent.as_ref());
        parent = Some(k);
        if k % 4 == 0 {
            p.touch(&(k / 2));
        }
    }
    p
}

/// Keys `next..` are new; cached keys are found by sampling `next - n..next`
/// (mostly present: the policy keeps about the most recent `n`).
struct Keys {
    rng: SmallRng,
    next: u64,
    n: u64,
    recently_evicted: Vec<u64>,
}

impl Keys {
    fn cached(&mut self) -> u64 {
        self.next - 1 - self.rng.gen_range(0..self.n)
    }
}

fn policies(c: &mut Criterion) {
    for &(label, n) in SIZES {
        let mut group = c.benchmark_group(label);
        group
            .sample_size(20)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for &name in POLICIES {
            let mut p = filled(name, n);
            let mut keys = Keys {
                rng: SmallRng::seed_from_u64(7),
                next: n,
                n,
                recently_evicted: Vec::new(),
            };

            group.throughput(Throughput::Elements(1));
            group.bench_function(BenchmarkId::new("touch", name), |b| {
                b.iter(|| {
                    let k = keys.cached();
                    p.touch(&k)
                })
            });

            group.bench_function(BenchmarkId::new("insert_evict", name), |b| {
                b.iter(|| {
                    p.insert(keys.next, 1);
                    keys.next += 1;
                    p.pop_victim()
                })
            });

            group.throughput(Throughput::Elements(16));
            group.bench_function(BenchmarkId::new("request", name), |b| {
                b.iter(|| {
                    let start = keys.cached().saturating_sub(8);
                    for k in start..start + 8 {
                        p.touch(&k);
                    }
                    let mut parent = Some(start + 7);
                    for i in 0..8 {
                        let k = match keys.recently_evicted.pop() {
                            Some(k) if i % 4 == 0 => k,
                            _ => {
                                keys.next += 1;
                                keys.next - 1
                            }
                        };
                        p.insert_after(k, 1, parent.as_ref());
                        parent = Some(k);
                        if let Some((victim, _)) = p.pop_victim() {
                            if keys.recently_evicted.len() < 1024 {
                                keys.recently_evicted.push(victim);
                            }
                        }
                    }
                })
            });
            assert!(p.len() as u64 <= n + 1, "{name} grew to {}", p.len());
        }
        group.finish();
    }
}

criterion_group!(benches, policies);
criterion_main!(benches);
