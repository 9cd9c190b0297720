//! The vLLM connector's load and save through a real `mooncake_master`, against the mooncake
//! backend's own `get_into`/`put` of the same bytes, measured in the same run.
//!
//! kvpool is a pure client (segment 0); the values live in another process's segment (this
//! binary re-executed as an owner, as `benches/mooncake.rs` does). Four paths move the same
//! 64 blocks of 1 MiB (16 layers, 8 KV heads, 16 tokens, head size 128 for K and V, fp16):
//!
//! - (a) `backend`: the backend's own `get_into`/`put` of 64 contiguous 1 MiB values, one batch
//!   (the backend has no `max_batch`): what `kvpool bench --backend mooncake` measures;
//! - (a') the same calls with each value as the 16 pages of a block in a cache-shaped region,
//!   so (b) against (a') is the connector's own cost;
//! - (b) `direct`: the connector's sync load (and save) of a 64-block step with the cache in
//!   vLLM's CPU layout (LBHNC, per layer `[blocks, heads, tokens, content]`, layers far apart),
//!   so each block is 16 slices of 64 KiB that the backend reads and writes in place;
//! - (c) `staged`: the same through `stage_host_kv` (backend ↔ one contiguous 1 MiB pinned
//!   staging slot ↔ memcpy of the 16 slices);
//!
//! plus a one-thread memcpy of the step into its 1024 pages (the staged load's extra byte work).
//!
//! Each path has its own client and runtime (two worker threads, as `WorkerConnector::open`
//! builds). Rounds interleave the paths, each round starting at another, so noise hits all
//! alike; loads repeat 3 times a round. Medians are printed with the ratios to (a), then one
//! JSON line. The target is a connector load of at least 0.7x the backend's. Saves use fresh keys each time (the pool keeps a key's first value), so the
//! owner's segment is sized for every save. `KVPOOL_BENCH_ROUNDS` (default 11, at most 13)
//! sets the rounds. Run with `cargo bench -p kvpool-benches --bench connector_mooncake`.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool::size::ByteSize;
use kvpool::{BlockKey, Config, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome};
use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_benches::step::{
    self, block_hash, hashes_hex, load_meta, median, save_meta, save_plan, LAYERS, PAGE,
    STEP_BLOCKS, VALUE,
};
use kvpool_benches::{announce_ready_and_wait_for_stdin, SegmentOwner};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_connector::{StreamHandle, WorkerConnector};
use rand::RngCore;
use serde_json::json;

const CACHE_BLOCKS: usize = 2 * STEP_BLOCKS;
const STEP_BYTES: usize = STEP_BLOCKS * VALUE;
/// The owner's segment: every save of every round (4 paths × 64 MiB per round, plus the
/// values loaded and one warm-up round: 3.7 GiB at 13 rounds) below the master's eviction
/// mark.
const SEGMENT: u64 = 5 << 30;
const MAX_ROUNDS: usize = 13;
/// Loads per path and round: they leave the segment as it is, so they repeat.
const LOAD_REPS: usize = 3;

fn config(master: &str, segment: u64) -> MooncakeConfig {
    MooncakeConfig {
        master_server_address: master.into(),
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        protocol: "tcp".into(),
        tcp_congestion: "cubic".into(),
        ..MooncakeConfig::default()
    }
}

fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// This binary, re-executed as the owner of a segment of `segment` bytes.
fn owner(master: &str, segment: u64) -> SegmentOwner {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .env("KVPOOL_BENCH_OWNER", master)
        .env("KVPOOL_BENCH_SEGMENT", segment.to_string());
    SegmentOwner::start(command)
}

fn run_owner(master: String) {
    let segment: u64 = std::env::var("KVPOOL_BENCH_SEGMENT")
        .unwrap()
        .parse()
        .unwrap();
    let rt = runtime("owner");
    let owner = rt
        .block_on(MooncakeBackend::open(config(&master, segment)))
        .expect("open the owner");
    announce_ready_and_wait_for_stdin();
    rt.block_on(owner.close()).unwrap();
}

/// (a): the backend's own calls on 64 contiguous 1 MiB values.
struct Raw {
    rt: tokio::runtime::Runtime,
    backend: MooncakeBackend,
    region: Arc<MemRegion>,
    /// A cache-shaped region (LBHNC, like the rigs'): (a') moves each value as its 16 pages.
    paged: Arc<MemRegion>,
    ns: Arc<Namespace>,
    next: u64,
}

impl Raw {
    fn new(master: &str) -> Raw {
        let rt = runtime("raw");
        let backend = rt
            .block_on(MooncakeBackend::open(config(master, 0)))
            .unwrap();
        let region = MemRegion::alloc(STEP_BYTES);
        let mut data = vec![0u8; STEP_BYTES];
        rand::thread_rng().fill_bytes(&mut data);
        region.write(0, &data).unwrap();
        let ns = Arc::new(
            Namespace::single_rank(&format!("raw-{:08x}", rand::random::<u32>())).unwrap(),
        );
        let paged = MemRegion::alloc(LAYERS * CACHE_BLOCKS * PAGE);
        paged.write(0, &vec![0x11; paged.len()]).unwrap();
        let mut raw = Raw {
            rt,
            backend,
            region,
            paged,
            ns,
            next: 0,
        };
        raw.put_step(false); // keys 0..64: what every get reads
        raw
    }

    /// Value `j`: 1 MiB of the contiguous region, or block `2j + odd`'s 16 pages.
    fn slices(&self, j: usize, paged: bool, odd: bool) -> Vec<(usize, usize)> {
        if paged {
            let b = 2 * j + usize::from(odd);
            (0..LAYERS)
                .map(|l| ((l * CACHE_BLOCKS + b) * PAGE, PAGE))
                .collect()
        } else {
            vec![(j * VALUE, VALUE)]
        }
    }

    fn region(&self, paged: bool) -> &Arc<MemRegion> {
        if paged {
            &self.paged
        } else {
            &self.region
        }
    }

    fn key(&self, i: u64) -> BlockKey {
        BlockKey::new(self.ns.clone(), block_hash(0, i))
    }

    fn put_step(&mut self, paged: bool) -> Duration {
        let items = (0..STEP_BLOCKS)
            .map(|j| {
                let mut iov = IoVec::new();
                for (at, len) in self.slices(j, paged, false) {
                    iov.push(self.region(paged), at, len).unwrap();
                }
                (self.key(self.next + j as u64), iov)
            })
            .collect();
        self.next += STEP_BLOCKS as u64;
        let started = Instant::now();
        let outcomes = self.rt.block_on(self.backend.put(items)).expect("put");
        let took = started.elapsed();
        for o in outcomes {
            assert!(matches!(o, PutOutcome::Stored), "put: {o:?}");
        }
        took
    }

    fn get_step(&self, paged: bool) -> Duration {
        let items = (0..STEP_BLOCKS)
            .map(|j| {
                let mut iov = IoVecMut::new();
                for (at, len) in self.slices(j, paged, true) {
                    iov.push(self.region(paged), at, len).unwrap();
                }
                (self.key(j as u64), iov)
            })
            .collect();
        let started = Instant::now();
        let outcomes = self.rt.block_on(self.backend.get_into(items)).expect("get");
        let took = started.elapsed();
        for o in outcomes {
            assert!(o.is_hit(), "get: {o:?}");
        }
        took
    }
}

/// Saves read the even blocks, loads write the odd ones.
fn block_ids(odd: bool) -> Vec<u32> {
    (0..STEP_BLOCKS)
        .map(|i| (2 * i + usize::from(odd)) as u32)
        .collect()
}

/// (b) and (c): the connector's worker half over its own mooncake client.
struct Rig {
    worker: WorkerConnector,
    cache: Arc<MemRegion>,
    tag: u8,
    next: u64,
}

impl Rig {
    fn new(master: &str, staged: bool, port: u32) -> Rig {
        let settings = Config::from_extra_config(json!({
            // Parsed only: the worker gets the mooncake client below.
            "backend": "memory",
            "lookup_rpc_port": port,
            "stage_host_kv": staged,
            "device_staging_bytes": "256MiB",
        }))
        .unwrap();
        let layout = step::layout(&format!(
            "bench-{}",
            if staged { "staged" } else { "direct" }
        ));
        let rt = runtime(if staged { "staged" } else { "direct" });
        let backend: Arc<dyn KvBackend> = Arc::new(
            rt.block_on(MooncakeBackend::open(config(master, 0)))
                .unwrap(),
        );
        let worker = WorkerConnector::with_backend(&settings, layout, backend, rt).unwrap();
        let cache = MemRegion::alloc(LAYERS * CACHE_BLOCKS * PAGE);
        let mut data = vec![0u8; cache.len()];
        rand::thread_rng().fill_bytes(&mut data);
        cache.write(0, &data).unwrap();
        let tensors = step::tensors(cache.as_ptr() as usize, CACHE_BLOCKS, false);
        // SAFETY: `cache` lives in the rig as long as the worker.
        unsafe { worker.register_kv_caches(&tensors, None) }.unwrap();
        assert_eq!(worker.value_len(), Some(VALUE));
        let mut rig = Rig {
            worker,
            cache,
            tag: if staged { 0xc5 } else { 0xd1 },
            next: 0,
        };
        rig.save_step(); // hashes 0..64: what every load reads
        rig.load_step();
        rig.check_loaded();
        rig
    }

    /// Saves the even blocks under 64 new hashes and waits until the backend holds them.
    fn save_step(&mut self) -> Duration {
        let meta = save_meta(save_plan(
            "s",
            block_ids(false),
            hashes_hex(self.tag, self.next, STEP_BLOCKS),
        ));
        self.next += STEP_BLOCKS as u64;
        let started = Instant::now();
        self.worker.bind_connector_metadata(&meta).unwrap();
        self.worker.wait_for_save(StreamHandle(0)).unwrap();
        assert!(self
            .worker
            .wait_for_requests(&["s".into()], Duration::from_secs(60)));
        // Staged saves hand their backend writes on after the copy to staging.
        while self.worker.staged_puts_in_flight() != 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
        let took = started.elapsed();
        self.worker.clear_connector_metadata();
        took
    }

    /// Loads the first 64 hashes saved into the odd blocks (a sync load).
    fn load_step(&mut self) -> Duration {
        let meta = load_meta("l", block_ids(true), hashes_hex(self.tag, 0, STEP_BLOCKS));
        let started = Instant::now();
        self.worker.bind_connector_metadata(&meta).unwrap();
        self.worker.start_load_kv(StreamHandle(0)).unwrap();
        let failed = self.worker.get_block_ids_with_load_errors();
        let took = started.elapsed();
        assert!(failed.is_empty(), "load failed for blocks {failed:?}");
        self.worker.clear_connector_metadata();
        took
    }

    /// Block 2i+1 now holds what block 2i held, layer by layer.
    fn check_loaded(&self) {
        let page = |l: usize, b: usize| {
            self.cache
                .read((l * CACHE_BLOCKS + b) * PAGE, PAGE)
                .unwrap()
        };
        for i in 0..STEP_BLOCKS {
            for l in 0..LAYERS {
                assert!(
                    page(l, 2 * i) == page(l, 2 * i + 1),
                    "block {} layer {l} was not loaded",
                    2 * i + 1
                );
            }
        }
    }
}

/// The byte work the staged load adds: 64 contiguous 1 MiB values scattered into the 16
/// layer pages of the odd blocks, on one thread.
fn memcpy_step(rig: &Rig, values: &MemRegion) -> Duration {
    let started = Instant::now();
    for (i, b) in block_ids(true).into_iter().enumerate() {
        for l in 0..LAYERS {
            let c = (l * CACHE_BLOCKS + b as usize) * PAGE;
            // SAFETY: both ranges lie inside their regions, which do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    values.as_ptr().add(i * VALUE + l * PAGE),
                    rig.cache.as_ptr().add(c),
                    PAGE,
                );
            }
        }
    }
    std::hint::black_box(&rig.cache);
    started.elapsed()
}

fn gbps(d: Duration) -> f64 {
    STEP_BYTES as f64 / d.as_secs_f64() / 1e9
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn main() {
    if let Ok(master) = std::env::var("KVPOOL_BENCH_OWNER") {
        return run_owner(master);
    }
    let rounds: usize = std::env::var("KVPOOL_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(11);
    assert!(
        (1..=MAX_ROUNDS).contains(&rounds),
        "KVPOOL_BENCH_ROUNDS must be 1..={MAX_ROUNDS}: the owner's segment holds every save"
    );
    let rpc_dir = tempfile::tempdir().unwrap();
    std::env::set_var("VLLM_RPC_BASE_PATH", rpc_dir.path());

    let master = MooncakeMaster::start();
    let _owner = owner(&master.address(), SEGMENT);
    let mut raw = Raw::new(&master.address());
    let mut direct = Rig::new(&master.address(), false, 1);
    let mut staged = Rig::new(&master.address(), true, 2);

    // One warm-up round, then the measured ones.
    // Loads: memcpy, (a), (a'), (b), (c); saves: (a), (a'), (b), (c).
    const LOADS: usize = 5;
    const SAVES: usize = 4;
    let mut loads: [Vec<Duration>; LOADS] = Default::default();
    let mut saves: [Vec<Duration>; SAVES] = Default::default();
    // One warm-up round, then the measured ones. Each round starts at a different path, so
    // no path is always the one that runs after another's (a cold cache, a busy runtime).
    // Loads leave the segment as it is and repeat LOAD_REPS times a round.
    for r in 0..=rounds {
        for rep in 0..LOAD_REPS {
            for k in 0..LOADS {
                let i = (k + r * LOAD_REPS + rep) % LOADS;
                let d = match i {
                    0 => memcpy_step(&staged, &raw.region),
                    1 => raw.get_step(false),
                    2 => raw.get_step(true),
                    3 => direct.load_step(),
                    _ => staged.load_step(),
                };
                if r > 0 {
                    loads[i].push(d);
                }
            }
        }
        for k in 0..SAVES {
            let i = (k + r) % SAVES;
            let d = match i {
                0 => raw.put_step(false),
                1 => raw.put_step(true),
                2 => direct.save_step(),
                _ => staged.save_step(),
            };
            if r > 0 {
                saves[i].push(d);
            }
        }
    }
    direct.check_loaded();
    staged.load_step(); // over the last memcpy
    staged.check_loaded();
    let [memcpy, get_a, get_p, load_b, load_c] = loads.map(median);
    let [put_a, put_p, save_b, save_c] = saves.map(median);
    let ratio = |x: Duration, base: Duration| base.as_secs_f64() / x.as_secs_f64();

    println!(
        "connector over mooncake (pure client, values in another process's segment, tcp): \
         64 blocks x 1 MiB (16 layers x 64 KiB); medians of {} loads and {rounds} saves, \
         interleaved",
        rounds * LOAD_REPS
    );
    let rows = [
        ("(a)  backend, 1 MiB values", get_a, put_a),
        ("(a') backend, 16 x 64 KiB pages", get_p, put_p),
        ("(b)  connector direct", load_b, save_b),
        ("(c)  connector staged", load_c, save_c),
    ];
    for (name, load, save) in rows {
        println!(
            "  {name:<32} load {:6.2} GB/s ({:.2}x (a))   save {:6.2} GB/s ({:.2}x (a))",
            gbps(load),
            ratio(load, get_a),
            gbps(save),
            ratio(save, put_a),
        );
    }
    println!(
        "  memcpy of the step into its 1024 pages {:6.2} GB/s; (a) then memcpy, one after \
         the other: {:.2} GB/s ({:.2}x (a))",
        gbps(memcpy),
        gbps(get_a + memcpy),
        ratio(get_a + memcpy, get_a),
    );
    // Host KV takes the direct path; staging is what device KV adds (its memcpy stands in
    // for the device copy, which a GPU overlaps with the next chunk's transfer).
    let load_ratio = ratio(load_b, get_a);
    println!(
        "  connector load / backend get: direct (host KV's path) {:.2}x (target >= 0.70x: {}), \
         staged {:.2}x",
        load_ratio,
        if load_ratio >= 0.7 { "met" } else { "NOT met" },
        ratio(load_c, get_a),
    );
    println!(
        "{}",
        json!({
            "bench": "connector_mooncake",
            "step_bytes": STEP_BYTES,
            "load_samples": rounds * LOAD_REPS,
            "save_samples": rounds,
            "gbps": {
                "backend_get": round3(gbps(get_a)),
                "backend_get_pages": round3(gbps(get_p)),
                "direct_load": round3(gbps(load_b)),
                "staged_load": round3(gbps(load_c)),
                "backend_put": round3(gbps(put_a)),
                "backend_put_pages": round3(gbps(put_p)),
                "direct_save": round3(gbps(save_b)),
                "staged_save": round3(gbps(save_c)),
                "memcpy": round3(gbps(memcpy)),
            },
            "ratios_to_backend": {
                "backend_get_pages": round3(ratio(get_p, get_a)),
                "direct_load": round3(ratio(load_b, get_a)),
                "staged_load": round3(ratio(load_c, get_a)),
                "backend_put_pages": round3(ratio(put_p, put_a)),
                "direct_save": round3(ratio(save_b, put_a)),
                "staged_save": round3(ratio(save_c, put_a)),
            },
        })
    );
}
