//! Start-up of a Mooncake segment owner with a 1 GiB segment: `MooncakeBackend::open` against a
//! real `mooncake_master` (connect, `ServiceReady`, the put-layout probe, the segment's memory,
//! its transfer server, `MountSegment`), then `close`.
//!
//! Baseline, same run: allocating the same 1 GiB the way the segment used to be allocated
//! (`alloc_zeroed` at page alignment, which memsets it). Before the segment was mapped lazily
//! and faulted in behind the open, the open cost that memset plus the rest; the ratio printed
//! at the end is open time / memset time.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kvpool::size::ByteSize;
use kvpool::KvBackend;
use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_benches::step::median;
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;

const SEGMENT: usize = 1 << 30;

fn bench(c: &mut Criterion) {
    let master = MooncakeMaster::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let open_close = || {
        let cfg = MooncakeConfig {
            master_server_address: master.address(),
            global_segment_size: ByteSize(SEGMENT as u64),
            ..MooncakeConfig::default()
        };
        let started = Instant::now();
        let backend = rt.block_on(MooncakeBackend::open(cfg)).unwrap();
        let took = started.elapsed();
        rt.block_on(backend.close()).unwrap();
        took
    };
    let memset = || {
        let layout = Layout::from_size_align(SEGMENT, 4096).unwrap();
        let started = Instant::now();
        // SAFETY: a non-zero layout; freed right after.
        unsafe {
            let p = alloc_zeroed(layout);
            assert!(!p.is_null());
            std::hint::black_box(p);
            let took = started.elapsed();
            dealloc(p, layout);
            took
        }
    };
    c.bench_function("segment_open/1GiB", |b| {
        b.iter_custom(|n| (0..n).map(|_| open_close()).sum())
    });
    c.bench_function("segment_open/baseline_memset_1GiB", |b| {
        b.iter_custom(|n| (0..n).map(|_| memset()).sum())
    });
    let open = median((0..9).map(|_| open_close()).collect());
    let base = median((0..9).map(|_| memset()).collect());
    println!(
        "segment_open/1GiB: open median {open:?}, memset median {base:?}, open / memset = {:.3}",
        open.as_secs_f64() / base.as_secs_f64()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
