//! Layerwise loads stay inside their bounds: a layer's load starts only once the forward has
//! waited for the layer `layerwise_prefetch_layers` before it (fewer when
//! `layerwise_max_transfer_bytes` allows fewer layers' bytes in flight), and a layer moves in
//! batches of at most `layerwise_max_transfer_blocks` blocks. A layerwise save asks the pool
//! which blocks it holds once per step, not once per layer. A spy behind the memory backend
//! records what the worker asks of it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use kvpool::buffer::IoVecMut;
use kvpool::error::Result;
use kvpool::{
    BackendInfo, BlockHash, BlockKey, Config, GetOutcome, IoVec, KvBackend, MemRegion, PutOutcome,
};
use kvpool_connector::{
    Device, EngineLayout, KvRole, LoadPlan, SavePlan, StepMeta, StreamHandle, TensorDesc,
    WorkerConnector,
};

const LAYERS: usize = 6;
const PAGE: usize = 256;
const BLOCKS: usize = 16;
/// Blocks a step saves and then loads.
const STEP: usize = 8;

/// The memory backend, recording the layer and size of every `get_into` and `put`, and the
/// keys of every `exists`.
#[derive(Debug)]
struct Spy {
    inner: Arc<dyn KvBackend>,
    gets: Mutex<Vec<(usize, usize)>>,
    puts: Mutex<Vec<(usize, usize)>>,
    asked: Mutex<Vec<Vec<BlockKey>>>,
}

impl Spy {
    /// The highest layer a load was asked for, if any.
    fn highest(&self) -> Option<usize> {
        self.gets.lock().unwrap().iter().map(|&(l, _)| l).max()
    }
}

fn layer_of(key: &BlockKey) -> usize {
    let s = key.to_key_string();
    let at = s.find("@layer_id:").expect("a layer key") + "@layer_id:".len();
    s[at..].split('@').next().unwrap().parse().unwrap()
}

#[async_trait]
impl KvBackend for Spy {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }
    async fn register(&self, region: &Arc<MemRegion>) -> Result<()> {
        self.inner.register(region).await
    }
    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.asked.lock().unwrap().push(keys.to_vec());
        self.inner.exists(keys).await
    }
    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.inner.value_lens(keys).await
    }
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        if let Some((key, _)) = items.first() {
            let layer = layer_of(key);
            assert!(
                items.iter().all(|(k, _)| layer_of(k) == layer),
                "one layer per call"
            );
            self.puts.lock().unwrap().push((layer, items.len()));
        }
        self.inner.put(items).await
    }
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        if let Some((key, _)) = items.first() {
            let layer = layer_of(key);
            assert!(
                items.iter().all(|(k, _)| layer_of(k) == layer),
                "one layer per call"
            );
            self.gets.lock().unwrap().push((layer, items.len()));
        }
        self.inner.get_into(items).await
    }
    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.inner.remove(keys).await
    }
}

struct Rig {
    worker: WorkerConnector,
    spy: Arc<Spy>,
    cache: Arc<MemRegion>,
}

/// Each rig's own lookup socket, in one directory for the whole process (the tests run on
/// threads of one process, which shares the environment).
fn lookup_port() -> u32 {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    std::env::set_var("VLLM_RPC_BASE_PATH", dir.path());
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn hex() -> String {
    (0..STEP as u8)
        .map(|i| BlockHash([i + 1; 32]).to_hex())
        .collect()
}

impl Rig {
    fn new(extra: serde_json::Value) -> Rig {
        let mut json = serde_json::json!({
            "backend": "memory",
            "use_layerwise": true,
            "lookup_rpc_port": lookup_port(),
        });
        json.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let config = Config::from_extra_config(json).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let inner = rt.block_on(kvpool::open(&config)).unwrap();
        let spy = Arc::new(Spy {
            inner,
            gets: Mutex::new(Vec::new()),
            puts: Mutex::new(Vec::new()),
            asked: Mutex::new(Vec::new()),
        });
        let layout = EngineLayout {
            model: "/models/layerwise-bounds".into(),
            block_size: 4,
            tp_size: 1,
            tp_rank: 0,
            pp_size: 1,
            pp_rank: 0,
            dp_rank: 0,
            num_kv_heads: 1,
            use_mla: false,
            role: KvRole::Both,
            groups: vec![],
            kv_events: false,
            stage_layers: vec![LAYERS as u32],
        };
        let worker = WorkerConnector::with_backend(&config, layout, spy.clone(), rt).unwrap();
        let cache = MemRegion::alloc(LAYERS * BLOCKS * PAGE);
        let tensors: Vec<TensorDesc> = (0..LAYERS)
            .map(|l| TensorDesc {
                layer: format!("layers.{l}"),
                ptr: cache.as_ptr() as usize + l * BLOCKS * PAGE,
                shape: vec![BLOCKS, PAGE],
                strides: vec![PAGE as isize, 1],
                elem_size: 1,
                device: Device::Host,
            })
            .collect();
        // SAFETY: `cache` lives in the rig as long as the worker.
        unsafe { worker.register_kv_caches(&tensors, None) }.unwrap();
        let rig = Rig { worker, spy, cache };
        rig.save();
        rig
    }

    fn at(layer: usize, block: usize) -> usize {
        (layer * BLOCKS + block) * PAGE
    }

    /// Saves blocks 0..STEP, every byte of layer `l`, block `b` = `16 * l + b`.
    fn save(&self) {
        for l in 0..LAYERS {
            for b in 0..STEP {
                self.cache
                    .write(Self::at(l, b), &[(16 * l + b) as u8; PAGE])
                    .unwrap();
            }
        }
        let meta = StepMeta {
            saves: vec![SavePlan {
                req_id: "s".into(),
                block_ids: (0..STEP as u32).collect(),
                hashes: hex(),
                ..SavePlan::default()
            }],
            ..StepMeta::default()
        };
        self.worker.bind_connector_metadata(&meta.encode()).unwrap();
        for l in 0..LAYERS {
            self.worker
                .save_kv_layer(&format!("layers.{l}"), StreamHandle(0))
                .unwrap();
        }
        self.worker.wait_for_save(StreamHandle(0)).unwrap();
        self.worker.clear_connector_metadata();
        assert!(self
            .worker
            .wait_for_requests(&["s".into()], Duration::from_secs(10)));
    }

    /// Loads the saved blocks into STEP..2*STEP layer by layer, checking before each layer's
    /// wait that no load beyond `depth` layers ahead started, and that the loader got that far.
    fn load_checking_window(&self, depth: usize) {
        let meta = StepMeta {
            loads: vec![LoadPlan {
                req_id: "l".into(),
                block_ids: (STEP as u32..2 * STEP as u32).collect(),
                hashes: hex(),
                is_async: false,
                groups: vec![],
            }],
            ..StepMeta::default()
        };
        self.worker.bind_connector_metadata(&meta.encode()).unwrap();
        self.worker.start_load_kv(StreamHandle(0)).unwrap();
        for l in 0..LAYERS {
            // Before layer l's wait, the forward has waited for l - 1: layers up to
            // l - 1 + depth may load, and the loader reaches them.
            let allowed = (l + depth - 1).min(LAYERS - 1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.spy.highest().is_none_or(|h| h < allowed) {
                assert!(
                    Instant::now() < deadline,
                    "layer {l}: the loader never reached layer {allowed}"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            // Time for a loader that ignores the window to run past it.
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(
                self.spy.highest(),
                Some(allowed),
                "layer {l}: a load started beyond {depth} layers ahead"
            );
            self.worker
                .wait_for_layer_load(&format!("layers.{l}"), StreamHandle(0))
                .unwrap();
            for b in 0..STEP {
                assert_eq!(
                    self.cache.read(Self::at(l, STEP + b), PAGE).unwrap(),
                    vec![(16 * l + b) as u8; PAGE],
                    "layer {l} block {b} not in place after its wait"
                );
            }
        }
        self.worker.wait_for_save(StreamHandle(0)).unwrap();
        self.worker.clear_connector_metadata();
        assert!(self.worker.get_block_ids_with_load_errors().is_empty());
    }

    fn batch_sizes(&self) -> Vec<usize> {
        self.spy
            .gets
            .lock()
            .unwrap()
            .iter()
            .map(|&(_, n)| n)
            .collect()
    }
}

#[test]
fn one_prefetched_layer_loads_only_the_layer_after_the_one_waited_for() {
    let rig = Rig::new(serde_json::json!({"layerwise_prefetch_layers": 1}));
    rig.load_checking_window(1);
    // Each layer in one batch of all its blocks, in order.
    let gets = rig.spy.gets.lock().unwrap().clone();
    assert_eq!(gets, (0..LAYERS).map(|l| (l, STEP)).collect::<Vec<_>>());
}

#[test]
fn three_prefetched_layers_run_three_ahead() {
    let rig = Rig::new(serde_json::json!({"layerwise_prefetch_layers": 3}));
    rig.load_checking_window(3);
}

#[test]
fn the_byte_bound_narrows_the_prefetch_window() {
    // A layer's loads are STEP * PAGE bytes: room for one layer and a half, so one at a time.
    let rig = Rig::new(serde_json::json!({
        "layerwise_prefetch_layers": 3,
        "layerwise_max_transfer_bytes": STEP * PAGE * 3 / 2,
    }));
    rig.load_checking_window(1);
    // Room for two layers: two ahead.
    let rig = Rig::new(serde_json::json!({
        "layerwise_prefetch_layers": 3,
        "layerwise_max_transfer_bytes": STEP * PAGE * 2,
    }));
    rig.load_checking_window(2);
}

#[test]
fn a_layer_moves_in_batches_of_at_most_max_transfer_blocks() {
    let rig = Rig::new(serde_json::json!({"layerwise_max_transfer_blocks": 3}));
    rig.load_checking_window(1);
    assert_eq!(rig.batch_sizes(), [3, 3, 2].repeat(LAYERS));
}

impl Spy {
    /// The layers of each `exists` since the last call, as (layer, keys) runs, sorted.
    fn take_asked(&self) -> Vec<Vec<(usize, usize)>> {
        let mut calls: Vec<Vec<(usize, usize)>> = std::mem::take(&mut *self.asked.lock().unwrap())
            .iter()
            .map(|keys| {
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for k in keys {
                    match runs.last_mut() {
                        Some((l, n)) if *l == layer_of(k) => *n += 1,
                        _ => runs.push((layer_of(k), 1)),
                    }
                }
                runs
            })
            .collect();
        calls.sort();
        calls
    }

    /// (layer, blocks) of every `put` since the last call, sorted.
    fn take_puts(&self) -> Vec<(usize, usize)> {
        let mut puts = std::mem::take(&mut *self.puts.lock().unwrap());
        puts.sort();
        puts
    }
}

#[test]
fn a_layerwise_save_asks_which_blocks_the_pool_holds_once_per_step_not_per_layer() {
    const LAST: usize = LAYERS - 1;
    // `Rig::new` saved blocks 0..STEP once: one question for the first and last layers (what a
    // lookup counts), one by the last layer's own save (which reports blocks already held),
    // and every layer written.
    let rig = Rig::new(serde_json::json!({}));
    assert_eq!(
        rig.spy.take_asked(),
        vec![vec![(0, STEP), (LAST, STEP)], vec![(LAST, STEP)]]
    );
    assert_eq!(
        rig.spy.take_puts(),
        (0..LAYERS).map(|l| (l, STEP)).collect::<Vec<_>>()
    );

    // The same blocks again: held, so the same two questions and nothing written.
    rig.save();
    let probe = rig
        .spy
        .asked
        .lock()
        .unwrap()
        .iter()
        .find(|keys| keys.len() == 2 * STEP)
        .cloned()
        .expect("the question for the first and last layers");
    assert_eq!(
        rig.spy.take_asked(),
        vec![vec![(0, STEP), (LAST, STEP)], vec![(LAST, STEP)]]
    );
    assert_eq!(rig.spy.take_puts(), vec![]);

    // Block 3's first layer lost: a lookup no longer counts the block, so its layers are
    // written again up to the last one, whose own save finds it held.
    let first_layer_of_3 = probe[3].clone();
    assert_eq!(layer_of(&first_layer_of_3), 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(
        rig.spy
            .inner
            .remove(std::slice::from_ref(&first_layer_of_3)),
    )
    .unwrap();
    rig.save();
    assert_eq!(
        rig.spy.take_puts(),
        (0..LAST).map(|l| (l, 1)).collect::<Vec<_>>()
    );
    // Every layer of every block loads back whole.
    rig.load_checking_window(1);
}
