//! kvpool's mooncake backend against the official Mooncake client
//! (`mooncake.store.MooncakeDistributedStore`, zero-copy batch API, PyPI
//! `mooncake-transfer-engine-non-cuda==0.3.13.post1`), measured in the same
//! run on fresh `mooncake_master`s with the same shapes:
//!
//! - local path: one process owns the segment and reads/writes it;
//! - remote path: an owner process serves the segment, a reader process
//!   (a pure client) puts and gets over TCP: kvpool↔kvpool and
//!   official↔official, plus kvpool's client against an official owner;
//! - kvpool's remote path with `cubic` and with the system's default TCP
//!   congestion control.
//!
//! Each phase runs `KVPOOL_BENCH_SECONDS` (default 1): puts of fresh keys
//! (up to 768 MiB / 32 MiB, so both clients leave the master with as many
//! keys), gets cycling over them, and `exists` of 32 keys per call. Prints a table of GB/s and keys/s and each kvpool/official
//! ratio, then one JSON line per value size. Run with
//! `cargo bench -p kvpool-benches --bench mooncake`.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool::size::ByteSize;
use kvpool::{BlockHash, BlockKey, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome};
use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_benches::{announce_ready_and_wait_for_stdin, SegmentOwner};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use rand::RngCore;
use serde_json::{json, Value};

const BATCH: usize = 32;
const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../backends/mooncake/tests/python/official_bench.py"
);

#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    put_gbps: f64,
    get_gbps: f64,
    exists_keys_per_s: f64,
    exists_call_us: f64,
}

impl Figures {
    fn from_json(v: &Value) -> Self {
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        Figures {
            put_gbps: f("put_gbps"),
            get_gbps: f("get_gbps"),
            exists_keys_per_s: f("exists_keys_per_s"),
            exists_call_us: f("exists_call_us"),
        }
    }

    fn json(&self) -> Value {
        json!({
            "put_gbps": round(self.put_gbps),
            "get_gbps": round(self.get_gbps),
            "exists_keys_per_s": self.exists_keys_per_s.round(),
            "exists_call_us": round(self.exists_call_us),
        })
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn config(master: &str, segment: u64, congestion: &str) -> MooncakeConfig {
    MooncakeConfig {
        master_server_address: master.into(),
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        tcp_congestion: congestion.into(),
        ..MooncakeConfig::default()
    }
}

fn python() -> String {
    std::env::var("KVPOOL_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Put, get and exists phases through kvpool, as the Python side does them.
async fn kvpool_phases(b: &dyn KvBackend, size: usize, seconds: f64, max_bytes: u64) -> Figures {
    let total = size * BATCH;
    let region = MemRegion::alloc(total);
    let mut data = vec![0u8; total];
    rand::thread_rng().fill_bytes(&mut data);
    region.write(0, &data).unwrap();
    let ns =
        Arc::new(Namespace::single_rank(&format!("bench-{:08x}", rand::random::<u32>())).unwrap());
    let key = |batch: usize, j: usize| {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&(batch as u64).to_le_bytes());
        h[8..16].copy_from_slice(&(j as u64).to_le_bytes());
        BlockKey::new(ns.clone(), BlockHash(h))
    };
    let limit = Duration::from_secs_f64(seconds);

    let mut batches = 0usize;
    let mut moved = 0u64;
    let t = Instant::now();
    while t.elapsed() < limit && moved + total as u64 <= max_bytes {
        let items = (0..BATCH)
            .map(|j| {
                (
                    key(batches, j),
                    IoVec::single(&region, j * size, size).unwrap(),
                )
            })
            .collect();
        for o in b.put(items).await.expect("put") {
            assert!(matches!(o, PutOutcome::Stored), "put: {o:?}");
        }
        batches += 1;
        moved += total as u64;
    }
    let put_gbps = moved as f64 / t.elapsed().as_secs_f64() / 1e9;

    let mut got = 0u64;
    let mut i = 0usize;
    let t = Instant::now();
    while t.elapsed() < limit {
        let n = i % batches;
        let items = (0..BATCH)
            .map(|j| {
                (
                    key(n, j),
                    IoVecMut::single(&region, j * size, size).unwrap(),
                )
            })
            .collect();
        for o in b.get_into(items).await.expect("get") {
            assert!(o.is_hit(), "get: {o:?}");
        }
        got += total as u64;
        i += 1;
    }
    let get_gbps = got as f64 / t.elapsed().as_secs_f64() / 1e9;

    let mut calls = 0usize;
    let t = Instant::now();
    while t.elapsed() < limit.min(Duration::from_secs(1)) {
        let keys: Vec<BlockKey> = (0..BATCH).map(|j| key(calls % batches, j)).collect();
        let present = b.exists(&keys).await.expect("exists");
        assert!(present.iter().all(|p| *p));
        calls += 1;
    }
    let ex = t.elapsed().as_secs_f64();
    Figures {
        put_gbps,
        get_gbps,
        exists_keys_per_s: (calls * BATCH) as f64 / ex,
        exists_call_us: ex / calls as f64 * 1e6,
    }
}

/// A segment owner: this binary re-executed, or the official client.
struct Owner;

impl Owner {
    fn kvpool(master: &str, segment: u64, congestion: &str) -> SegmentOwner {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .env("KVPOOL_BENCH_OWNER", master)
            .env("KVPOOL_BENCH_SEGMENT", segment.to_string())
            .env("KVPOOL_BENCH_CC", congestion);
        SegmentOwner::start(command)
    }

    fn official(master: &str, segment: u64) -> SegmentOwner {
        let mut command = Command::new(python());
        command
            .args([SCRIPT, "owner", master, &segment.to_string()])
            .stderr(Stdio::null());
        SegmentOwner::start(command)
    }
}

fn official_bench(master: &str, segment: u64, size: usize, seconds: f64, max: u64) -> Figures {
    let out = Command::new(python())
        .args([
            SCRIPT,
            "bench",
            master,
            &segment.to_string(),
            &size.to_string(),
            &BATCH.to_string(),
            &seconds.to_string(),
            &max.to_string(),
        ])
        .stderr(Stdio::null())
        .output()
        .expect("run the official client's bench");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line)
        .unwrap_or_else(|_| panic!("official bench printed {text:?} ({:?})", out.status));
    Figures::from_json(&v)
}

fn run_owner(master: String) {
    let segment: u64 = std::env::var("KVPOOL_BENCH_SEGMENT")
        .unwrap()
        .parse()
        .unwrap();
    let cc = std::env::var("KVPOOL_BENCH_CC").unwrap_or_default();
    let rt = runtime();
    let owner = rt
        .block_on(MooncakeBackend::open(config(&master, segment, &cc)))
        .expect("open the owner");
    announce_ready_and_wait_for_stdin();
    rt.block_on(owner.close()).unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    if let Ok(master) = std::env::var("KVPOOL_BENCH_OWNER") {
        return run_owner(master);
    }
    let seconds: f64 = std::env::var("KVPOOL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let rt = runtime();
    let system_cc = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "default".into());
    println!("mooncake: kvpool vs the official client, batch {BATCH}, {seconds} s per phase");
    // The put phase stops at `max` bytes, which both clients reach, so the
    // master holds the same number of keys for the exists phase (its cost
    // per call grows with the keys it holds).
    for (size, segment, max) in [
        (512usize << 10, 2u64 << 30, 768u64 << 20),
        (4 << 10, 512 << 20, 32 << 20),
    ] {
        let mut rows: Vec<(String, Figures)> = Vec::new();
        let mut row = |name: String, f: Figures| {
            println!(
                "  {:>9} {name:<34} put {:>6.2} GB/s  get {:>6.2} GB/s  exists {:>9.0} keys/s ({:.1} us/call)",
                ByteSize(size as u64).to_string(),
                f.put_gbps,
                f.get_gbps,
                f.exists_keys_per_s,
                f.exists_call_us
            );
            rows.push((name, f));
        };

        // Local path: one process owns the segment.
        let kv_local = {
            let master = MooncakeMaster::start();
            rt.block_on(async {
                let b = MooncakeBackend::open(config(&master.address(), segment, "cubic"))
                    .await
                    .unwrap();
                let f = kvpool_phases(&b, size, seconds, max).await;
                b.close().await.unwrap();
                f
            })
        };
        row("kvpool local".into(), kv_local);
        let off_local = {
            let master = MooncakeMaster::start();
            official_bench(&master.address(), segment, size, seconds, max)
        };
        row("official local".into(), off_local);

        // Remote path: owner and reader in two processes.
        let mut kv_remote = Figures::default();
        for cc in ["cubic", ""] {
            let master = MooncakeMaster::start();
            let _owner = Owner::kvpool(&master.address(), segment, cc);
            let f = rt.block_on(async {
                let b = MooncakeBackend::open(config(&master.address(), 0, cc))
                    .await
                    .unwrap();
                let f = kvpool_phases(&b, size, seconds, max).await;
                b.close().await.unwrap();
                f
            });
            let label = if cc.is_empty() {
                system_cc.as_str()
            } else {
                cc
            };
            row(format!("kvpool remote ({label})"), f);
            if cc == "cubic" {
                kv_remote = f;
            }
        }
        let off_remote = {
            let master = MooncakeMaster::start();
            let _owner = Owner::official(&master.address(), segment);
            official_bench(&master.address(), 0, size, seconds, max)
        };
        row("official remote".into(), off_remote);
        let cross = {
            let master = MooncakeMaster::start();
            let _owner = Owner::official(&master.address(), segment);
            rt.block_on(async {
                let b = MooncakeBackend::open(config(&master.address(), 0, "cubic"))
                    .await
                    .unwrap();
                let f = kvpool_phases(&b, size, seconds, max).await;
                b.close().await.unwrap();
                f
            })
        };
        row("kvpool client -> official owner".into(), cross);

        let ratio = |a: f64, b: f64| round(a / b);
        let ratios = json!({
            "local_put": ratio(kv_local.put_gbps, off_local.put_gbps),
            "local_get": ratio(kv_local.get_gbps, off_local.get_gbps),
            "local_exists": ratio(kv_local.exists_keys_per_s, off_local.exists_keys_per_s),
            "remote_put": ratio(kv_remote.put_gbps, off_remote.put_gbps),
            "remote_get": ratio(kv_remote.get_gbps, off_remote.get_gbps),
            "remote_exists": ratio(kv_remote.exists_keys_per_s, off_remote.exists_keys_per_s),
        });
        println!("  ratios kvpool/official: {ratios}");
        let mut all = serde_json::Map::new();
        for (name, f) in &rows {
            all.insert(name.clone(), f.json());
        }
        println!(
            "{}",
            json!({"value_size": size, "batch": BATCH, "figures": all, "ratios": ratios})
        );
    }
}
