//! Layerwise loading against whole-block loading, under a simulated forward.
//!
//! A 32-layer model (64 KiB per layer page, 2 MiB per block) loads a 64-block prefix (128 MiB)
//! from a pool, then runs a "forward" of 32 layers, each a busy loop of `compute` on the
//! calling thread. Pools: the memory backend, directly and through pinned staging (as device
//! KV moves), and a real `mooncake_master` with the values in another process's segment (this
//! binary re-executed as its owner), kvpool a pure client over TCP. Whole-block: `start_load_kv` loads everything, then the forward
//! runs, so a step takes compute + transfer. Layerwise: `start_load_kv` starts layer 0's load,
//! each layer waits for exactly its own, and later layers load while earlier ones compute.
//! `compute` is set to the measured transfer time (the balance point, where overlap matters
//! most); the target is layerwise ≤ 1.15 × max(compute, transfer). Every round
//! measures the transfer alone again, and the ratios are the medians of the rounds' own.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool::size::ByteSize;
use kvpool::{Config, KvBackend, MemRegion};
use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_benches::step::{
    self, hashes_hex, load_meta, median, save_meta, save_plan, ELEM, PAGE, STEP_BLOCKS,
};
use kvpool_benches::{announce_ready_and_wait_for_stdin, SegmentOwner};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_connector::{Device, StreamHandle, TensorDesc, WorkerConnector};

const LAYERS: usize = 32;
const CACHE_BLOCKS: usize = 2 * STEP_BLOCKS + 8;
/// The owner's segment: both rigs' prefixes (128 MiB each) with room to spare.
const SEGMENT: u64 = 1 << 30;

/// Where the prefix lives.
#[derive(Clone, Copy)]
enum Pool<'a> {
    Memory,
    /// A master's address.
    Mooncake(&'a str),
}

fn mooncake_config(master: &str, segment: u64) -> MooncakeConfig {
    MooncakeConfig {
        master_server_address: master.into(),
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        protocol: "tcp".into(),
        ..MooncakeConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    // As `WorkerConnector::open` builds it.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// This binary re-executed as the owner of the segment that holds the values.
fn run_owner(master: String) {
    let rt = runtime();
    let owner = rt
        .block_on(MooncakeBackend::open(mooncake_config(&master, SEGMENT)))
        .expect("open the owner");
    announce_ready_and_wait_for_stdin();
    rt.block_on(owner.close()).unwrap();
}

fn layer_name(l: usize) -> String {
    format!("model.layers.{l}.self_attn.attn")
}

struct Rig {
    worker: WorkerConnector,
    _cache: Arc<MemRegion>,
    layerwise: bool,
    _rpc_dir: tempfile::TempDir,
}

/// The prefix's hashes.
fn hashes() -> String {
    hashes_hex(0x1a, 0, STEP_BLOCKS)
}

impl Rig {
    /// `staged`: through pinned staging (`stage_host_kv`), two copies per byte, as device KV
    /// moves.
    fn new(pool: Pool<'_>, layerwise: bool, staged: bool) -> Rig {
        let rpc_dir = tempfile::tempdir().unwrap();
        std::env::set_var("VLLM_RPC_BASE_PATH", rpc_dir.path());
        let config = Config::from_extra_config(serde_json::json!({
            // For mooncake, parsed only: the worker gets the client below.
            "backend": "memory",
            "memory": {"capacity": "1GiB"},
            "use_layerwise": layerwise,
            "layerwise_prefetch_layers": 2,
            "stage_host_kv": staged,
        }))
        .unwrap();
        let mut layout = step::layout("layerwise-bench");
        layout.stage_layers = vec![LAYERS as u32];
        let worker = match pool {
            Pool::Memory => WorkerConnector::open(&config, layout).unwrap(),
            Pool::Mooncake(master) => {
                let rt = runtime();
                let client: Arc<dyn KvBackend> = Arc::new(
                    rt.block_on(MooncakeBackend::open(mooncake_config(master, 0)))
                        .unwrap(),
                );
                WorkerConnector::with_backend(&config, layout, client, rt).unwrap()
            }
        };
        let cache = MemRegion::alloc(LAYERS * CACHE_BLOCKS * PAGE);
        for chunk in (0..cache.len()).step_by(1 << 20) {
            cache
                .write(chunk, &vec![(chunk >> 20) as u8; 1 << 20])
                .unwrap();
        }
        let tensors: Vec<TensorDesc> = (0..LAYERS)
            .map(|l| TensorDesc {
                layer: layer_name(l),
                ptr: cache.as_ptr() as usize + l * CACHE_BLOCKS * PAGE,
                shape: vec![CACHE_BLOCKS, PAGE / ELEM],
                strides: vec![(PAGE / ELEM) as isize, 1],
                elem_size: ELEM,
                device: Device::Host,
            })
            .collect();
        // SAFETY: the cache lives in the rig as long as the worker.
        unsafe { worker.register_kv_caches(&tensors, None) }.unwrap();
        let rig = Rig {
            worker,
            _cache: cache,
            layerwise,
            _rpc_dir: rpc_dir,
        };
        rig.save_prefix();
        rig
    }

    fn save_prefix(&self) {
        let meta = save_meta(save_plan("s", (0..STEP_BLOCKS as u32).collect(), hashes()));
        self.worker.bind_connector_metadata(&meta).unwrap();
        for l in 0..LAYERS {
            self.worker
                .save_kv_layer(&layer_name(l), StreamHandle(0))
                .unwrap();
        }
        self.worker.wait_for_save(StreamHandle(0)).unwrap();
        assert!(self
            .worker
            .wait_for_requests(&["s".into()], Duration::from_secs(60)));
        self.worker.clear_connector_metadata();
    }

    /// One step: load the prefix into other blocks and run the forward; returns the step time.
    fn step(&self, compute: Duration, forward: Forward) -> Duration {
        let meta = load_meta(
            "l",
            (STEP_BLOCKS as u32..2 * STEP_BLOCKS as u32).collect(),
            hashes(),
        );
        let started = Instant::now();
        self.worker.bind_connector_metadata(&meta).unwrap();
        self.worker.start_load_kv(StreamHandle(0)).unwrap();
        for l in 0..LAYERS {
            self.worker
                .wait_for_layer_load(&layer_name(l), StreamHandle(0))
                .unwrap();
            forward.run(compute);
        }
        self.worker.wait_for_save(StreamHandle(0)).unwrap();
        let took = started.elapsed();
        assert!(
            self.worker.get_block_ids_with_load_errors().is_empty(),
            "layerwise {}: a load failed",
            self.layerwise
        );
        self.worker.clear_connector_metadata();
        took
    }
}

/// What a layer's attention costs the host.
#[derive(Clone, Copy)]
enum Forward {
    /// A CPU forward: the calling thread stays busy.
    Host,
    /// A device forward: the calling thread waits for the device (it sleeps, then spins for
    /// the last 100 µs so that sleep's overshoot does not lengthen the layer).
    Device,
}

impl Forward {
    fn run(self, d: Duration) {
        let end = Instant::now() + d;
        if let Forward::Device = self {
            std::thread::sleep(d.saturating_sub(Duration::from_micros(100)));
        }
        while Instant::now() < end {
            std::hint::spin_loop();
        }
    }
}

/// Runs both paths at the balance point.
fn compare(pool: Pool<'_>, staged: bool, forward: Forward) {
    let whole = Rig::new(pool, false, staged);
    let layered = Rig::new(pool, true, staged);
    // Calibration: the transfer alone (a whole-block step with no compute) sets the compute.
    let transfer = median(
        (0..11)
            .map(|_| whole.step(Duration::ZERO, forward))
            .collect(),
    );
    let per_layer = transfer / LAYERS as u32;
    let compute = per_layer * LAYERS as u32;
    // Rounds: each measures the transfer alone again next to both steps, so that the host
    // getting slower or faster mid-run moves the bound and the steps together.
    let (mut transfers, mut layer_transfers, mut w, mut lw) = (vec![], vec![], vec![], vec![]);
    let (mut w_ratio, mut lw_ratio) = (vec![], vec![]);
    for _ in 0..21 {
        let t = whole.step(Duration::ZERO, forward);
        let lt = layered.step(Duration::ZERO, forward);
        let ws = whole.step(per_layer, forward);
        let ls = layered.step(per_layer, forward);
        w_ratio.push(ws.as_secs_f64() / (compute + t).as_secs_f64());
        lw_ratio.push(ls.as_secs_f64() / compute.max(t).as_secs_f64());
        transfers.push(t);
        layer_transfers.push(lt);
        w.push(ws);
        lw.push(ls);
    }
    let ratio = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (w, lw) = (median(w), median(lw));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "layerwise{}{}{}, 32 layers x 64 blocks (128 MiB), compute {:.1} ms, transfer {:.1} ms \
         (medians of 21 rounds): whole-block step {:.1} ms = {:.2} x (compute + transfer); \
         layerwise step {:.1} ms = {:.2} x max(compute, transfer) (target <= 1.15); layerwise \
         is {:.2}x faster (its transfer alone, one object per layer: {:.1} ms)",
        match pool {
            Pool::Memory => "",
            Pool::Mooncake(_) => " (mooncake)",
        },
        if staged { " through staging" } else { "" },
        match forward {
            Forward::Host => "",
            Forward::Device => ", device forward",
        },
        ms(compute),
        ms(median(transfers)),
        ms(w),
        ratio(w_ratio),
        ms(lw),
        ratio(lw_ratio),
        w.as_secs_f64() / lw.as_secs_f64(),
        ms(median(layer_transfers)),
    );
}

fn main() {
    if let Ok(master) = std::env::var("KVPOOL_BENCH_OWNER") {
        return run_owner(master);
    }
    compare(Pool::Memory, false, Forward::Host);
    compare(Pool::Memory, true, Forward::Host);
    let master = MooncakeMaster::start();
    let mut owner = Command::new(std::env::current_exe().unwrap());
    owner.env("KVPOOL_BENCH_OWNER", master.address());
    let _owner = SegmentOwner::start(owner);
    compare(Pool::Mooncake(&master.address()), false, Forward::Host);
    compare(Pool::Mooncake(&master.address()), false, Forward::Device);
}
