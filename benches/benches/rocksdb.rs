//! The rocksdb-ssd backend against RocksDB's own `db_bench` (Debian
//! `rocksdb-tools`), measured in the same run on the same library.
//!
//! For each shape (value size, batch, WAL) both sides write the same number
//! of values into a fresh database and read every one back in random order:
//! kvpool with `put` / `get_into` batches, db_bench with `fillseq`
//! (`--batch_size` values per write batch) and `readrandom` (one `Get` per
//! value), plus `multireadrandom` (batched `MultiGet`, what kvpool's reads
//! use) and `readrandom --verify_checksum=false` (kvpool's reads skip
//! RocksDB's software crc32c and check their own xxh3 instead) for
//! reference. Both get the same RocksDB tuning: blob files for
//! values of 4 KiB and more, no compression, 64 MiB memtables, 64 MiB block
//! cache, keys of the backend's key length. Rounds alternate the two tools;
//! the best round of each is reported (on a shared 2-core machine noise only
//! ever slows a round down), with kvpool / db_bench. Then criterion measures one
//! put batch and one get batch.
//!
//! ```sh
//! cargo bench -p kvpool-benches --bench rocksdb            # full run
//! cargo bench -p kvpool-benches --bench rocksdb -- --quick # a smoke run
//! ```
//!
//! `KVPOOL_ROCKSDB_BENCH_ROUNDS=3` changes the rounds (5),
//! `KVPOOL_ROCKSDB_BENCH_DIR=/mnt/nvme` where the databases go (the system
//! temporary directory), `KVPOOL_ROCKSDB_BENCH_COMPARE=0` runs criterion only. kvpool does more per value than db_bench: it
//! gathers the value from the caller's memory, computes and checks an xxh3
//! checksum, keeps the eviction index and scatters each value into the
//! caller's memory; the ratio says what that costs.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use kvpool::size::ByteSize;
use kvpool::{
    BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome,
};
use kvpool_backend_rocksdb_ssd::{RocksDbSsdBackend, RocksDbSsdConfig};
use rand::seq::SliceRandom;
use rand::RngCore;

#[derive(Debug, Clone, Copy)]
struct Shape {
    value: usize,
    batch: usize,
    count: usize,
    wal: bool,
}

impl Shape {
    fn label(&self) -> String {
        let size = if self.value >= 1 << 20 {
            format!("{}MiB", self.value >> 20)
        } else {
            format!("{}KiB", self.value >> 10)
        };
        format!(
            "{size}x{} wal={}",
            self.batch,
            if self.wal { "on" } else { "off" }
        )
    }
}

/// Operations (values) per second.
#[derive(Debug, Default, Clone, Copy)]
struct Rates {
    write: f64,
    read: f64,
    multiread: f64,
    /// db_bench's readrandom without its crc32c verification of each read,
    /// which kvpool replaces with its own xxh3.
    read_unverified: f64,
}

fn key(ns: &Arc<Namespace>, i: u64) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockKey::new(ns.clone(), BlockHash(h))
}

fn namespace() -> Arc<Namespace> {
    Arc::new(Namespace::single_rank("Qwen3-8B").expect("a valid namespace"))
}

/// The bytes of a stored key: the backend's prefix byte and the key string.
fn stored_key_len() -> usize {
    1 + key(&namespace(), 0).to_key_string().len()
}

fn filled(len: usize) -> Arc<MemRegion> {
    let mut v = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut v);
    let region = MemRegion::alloc(len);
    region.write(0, &v).expect("in bounds");
    region
}

fn config(dir: &Path, shape: Shape) -> RocksDbSsdConfig {
    RocksDbSsdConfig {
        path: dir.to_path_buf(),
        // Room for everything: the comparison is of writes and reads, not
        // of eviction (db_bench has none).
        capacity: ByteSize((4 * shape.value * shape.count) as u64 + (1 << 30)),
        wal: shape.wal,
        ..RocksDbSsdConfig::default()
    }
}

fn kvpool_run(rt: &tokio::runtime::Runtime, base: &Path, shape: Shape) -> Rates {
    let dir = tempfile::tempdir_in(base).expect("a bench directory");
    let backend = RocksDbSsdBackend::open(config(dir.path(), shape)).expect("open");
    let ns = namespace();
    let src = filled(shape.value * shape.batch);
    let dst = MemRegion::alloc(shape.value * shape.batch);
    let batches = shape.count / shape.batch;
    rt.block_on(async {
        let started = Instant::now();
        for b in 0..batches {
            let items = (0..shape.batch)
                .map(|j| {
                    let iov = IoVec::single(&src, j * shape.value, shape.value).expect("in bounds");
                    (key(&ns, (b * shape.batch + j) as u64), iov)
                })
                .collect();
            let out = backend.put(items).await.expect("put");
            assert!(
                out.iter().all(|o| matches!(o, PutOutcome::Stored)),
                "{out:?}"
            );
        }
        let write = shape.count as f64 / started.elapsed().as_secs_f64();

        let mut order: Vec<u64> = (0..shape.count as u64).collect();
        order.shuffle(&mut rand::thread_rng());
        let started = Instant::now();
        for chunk in order.chunks(shape.batch) {
            let items = chunk
                .iter()
                .enumerate()
                .map(|(j, &i)| {
                    let iov =
                        IoVecMut::single(&dst, j * shape.value, shape.value).expect("in bounds");
                    (key(&ns, i), iov)
                })
                .collect();
            let out = backend.get_into(items).await.expect("get_into");
            assert!(out.iter().all(GetOutcome::is_hit), "{out:?}");
        }
        let read = shape.count as f64 / started.elapsed().as_secs_f64();
        backend.close().await.expect("close");
        Rates {
            write,
            read,
            multiread: f64::NAN,
            read_unverified: f64::NAN,
        }
    })
}

/// `ops/sec` of each benchmark in db_bench's report.
fn db_bench_run(base: &Path, shape: Shape) -> Option<Rates> {
    let dir = tempfile::tempdir_in(base).expect("a bench directory");
    let args = [
        "--benchmarks=fillseq,readrandom,multireadrandom".to_string(),
        format!("--db={}", dir.path().display()),
        format!("--num={}", shape.count),
        format!("--reads={}", shape.count),
        format!("--value_size={}", shape.value),
        format!("--key_size={}", stored_key_len()),
        format!("--batch_size={}", shape.batch),
        "--multiread_batched=true".to_string(),
        format!("--disable_wal={}", !shape.wal),
        "--sync=false".to_string(),
        "--compression_type=none".to_string(),
        "--enable_blob_files=true".to_string(),
        "--min_blob_size=4096".to_string(),
        "--blob_file_size=268435456".to_string(),
        "--write_buffer_size=67108864".to_string(),
        "--max_write_buffer_number=3".to_string(),
        "--max_background_jobs=2".to_string(),
        "--cache_size=67108864".to_string(),
        "--threads=1".to_string(),
    ];
    let run = |extra: &[&str]| -> Option<String> {
        let out = Command::new("db_bench")
            .args(&args)
            .args(extra)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "db_bench failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let rate = |text: &str, name: &str| -> Option<f64> {
        let line = text
            .lines()
            .find(|l| l.split(':').next().map(str::trim) == Some(name))?;
        let before = line.split(" ops/sec").next()?;
        before.split_whitespace().last()?.parse().ok()
    };
    let text = run(&[])?;
    let unverified = run(&[
        "--use_existing_db=true",
        "--benchmarks=readrandom",
        "--verify_checksum=false",
    ])?;
    Some(Rates {
        write: rate(&text, "fillseq")?,
        read: rate(&text, "readrandom")?,
        multiread: rate(&text, "multireadrandom")?,
        read_unverified: rate(&unverified, "readrandom")?,
    })
}

/// The best (highest) rate, NaN when there is none.
fn best(v: Vec<f64>) -> f64 {
    v.into_iter()
        .filter(|x| !x.is_nan())
        .fold(f64::NAN, f64::max)
}

fn compare(rt: &tokio::runtime::Runtime, base: &Path, quick: bool) {
    let scale = if quick { 8 } else { 1 };
    let rounds = std::env::var("KVPOOL_ROCKSDB_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(if quick { 1 } else { 5 });
    let shapes = [
        Shape {
            value: 32 << 10,
            batch: 16,
            count: 16_384 / scale,
            wal: true,
        },
        Shape {
            value: 512 << 10,
            batch: 16,
            count: 1_024 / scale,
            wal: true,
        },
        Shape {
            value: 32 << 10,
            batch: 16,
            count: 16_384 / scale,
            wal: false,
        },
    ];
    let have_db_bench = Command::new("db_bench").arg("--help").output().is_ok();
    if !have_db_bench {
        eprintln!("db_bench is not on PATH (Debian rocksdb-tools): kvpool's side only");
    }
    println!(
        "rocksdb-ssd vs db_bench (same librocksdb), {} values per shape, best of {rounds} rounds",
        if quick { "1/8 of the" } else { "all" }
    );
    println!(
        "{:<20} {:>9} {:>9} {:>6}   {:>9} {:>10} {:>6}   {:>9} {:>6}   {:>10} {:>6}",
        "shape",
        "put MB/s",
        "fillseq",
        "ratio",
        "get MB/s",
        "readrandom",
        "ratio",
        "multiread",
        "ratio",
        "rr no-crc",
        "ratio"
    );
    for shape in shapes {
        let mut ours = Vec::new();
        let mut theirs = Vec::new();
        for _ in 0..rounds {
            if have_db_bench {
                if let Some(r) = db_bench_run(base, shape) {
                    theirs.push(r);
                }
            }
            ours.push(kvpool_run(rt, base, shape));
        }
        let mb = |ops: f64| ops * shape.value as f64 / 1e6;
        let pick = |v: &[Rates], f: fn(&Rates) -> f64| best(v.iter().map(f).collect());
        let (ow, or) = (pick(&ours, |r| r.write), pick(&ours, |r| r.read));
        let (tw, tr, tm, tu) = (
            pick(&theirs, |r| r.write),
            pick(&theirs, |r| r.read),
            pick(&theirs, |r| r.multiread),
            pick(&theirs, |r| r.read_unverified),
        );
        println!(
            "{:<20} {:>9.0} {:>9.0} {:>6.2}   {:>9.0} {:>10.0} {:>6.2}   {:>9.0} {:>6.2}   {:>10.0} {:>6.2}",
            shape.label(),
            mb(ow),
            mb(tw),
            ow / tw,
            mb(or),
            mb(tr),
            or / tr,
            mb(tm),
            or / tm,
            mb(tu),
            or / tu
        );
    }
}

/// criterion: one put batch of new keys and one get batch, 32 KiB x 16.
fn criterion_groups(c: &mut Criterion, rt: &tokio::runtime::Runtime, base: &Path) {
    let (value, batch) = (32 << 10, 16);
    let dir = tempfile::tempdir_in(base).expect("a bench directory");
    let backend = RocksDbSsdBackend::open(RocksDbSsdConfig {
        path: dir.path().to_path_buf(),
        // Steady state: criterion runs as many puts as it likes, and the
        // backend evicts as a full tier does.
        capacity: ByteSize(256 << 20),
        ..RocksDbSsdConfig::default()
    })
    .expect("open");
    let ns = namespace();
    let src = filled(value * batch);
    let dst = MemRegion::alloc(value * batch);
    // 4096 values to read, whichever functions criterion is asked to run.
    let mut next = 0u64;
    for _ in 0..4096 / batch {
        let items = (0..batch)
            .map(|j| {
                next += 1;
                let iov = IoVec::single(&src, j * value, value).expect("in bounds");
                (key(&ns, next), iov)
            })
            .collect();
        rt.block_on(backend.put(items)).expect("put");
    }
    let mut group = c.benchmark_group("rocksdb_ssd");
    group.throughput(Throughput::Bytes((value * batch) as u64));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("put/32KiBx16", |b| {
        b.iter(|| {
            let items = (0..batch)
                .map(|j| {
                    next += 1;
                    let iov = IoVec::single(&src, j * value, value).expect("in bounds");
                    (key(&ns, next), iov)
                })
                .collect();
            rt.block_on(backend.put(items)).expect("put")
        })
    });
    // Reads cycle through the most recent 2048 keys (64 MiB, well under the
    // watermark), which are present.
    let newest = next;
    let mut cursor = 0u64;
    group.bench_function("get/32KiBx16", |b| {
        b.iter(|| {
            let items = (0..batch)
                .map(|j| {
                    cursor = (cursor + 1) % 2048;
                    let iov = IoVecMut::single(&dst, j * value, value).expect("in bounds");
                    (key(&ns, newest - cursor), iov)
                })
                .collect();
            rt.block_on(backend.get_into(items)).expect("get_into")
        })
    });
    group.finish();
    rt.block_on(backend.close()).expect("close");
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick" || a == "--test");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let base = std::env::var_os("KVPOOL_ROCKSDB_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    if std::env::var("KVPOOL_ROCKSDB_BENCH_COMPARE").as_deref() != Ok("0") {
        compare(&rt, &base, quick);
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_groups(&mut c, &rt, &base);
    c.final_summary();
}
