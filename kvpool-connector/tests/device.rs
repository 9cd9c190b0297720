//! The worker's device path against a fake accelerator whose copies run late, out of step with
//! the worker's calls, or fail: the ordering rules hold whatever the timing, no staging slot is
//! reused in flight, memory stays bounded, and no backend is ever handed device memory.
//!
//! The backend is the real memory backend, behind a spy that checks every region and
//! descriptor it is given.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use kvpool::buffer::IoVecMut;
use kvpool::error::Result;
use kvpool::key::BlockHash;
use kvpool::KvBackendExt;
use kvpool::{BackendInfo, BlockKey, Config, GetOutcome, IoVec, KvBackend, MemRegion, PutOutcome};
use kvpool_connector::device::{Direction, FakeEngine, FakeEvent};
use kvpool_connector::{
    Device, EngineLayout, KvRole, LoadPlan, SavePlan, StepMeta, StreamHandle, TensorDesc,
    WorkerConnector,
};

const LAYERS: usize = 3;
const BLOCKS: usize = 64;
const HEADS: usize = 2;
const TOKENS: usize = 4;
const CONTENT: usize = 8;
const PAGE: usize = HEADS * TOKENS * CONTENT;
const VALUE: usize = LAYERS * PAGE;
const STREAM: StreamHandle = StreamHandle(0x5eed);

fn rpc_dir() {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    std::env::set_var("VLLM_RPC_BASE_PATH", dir.path());
}

fn config(port: u32, staging_slots: usize, stage_host_kv: bool) -> Config {
    rpc_dir();
    Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "lookup_rpc_port": port,
        "device_staging_bytes": staging_slots * VALUE,
        "stage_host_kv": stage_host_kv,
    }))
    .unwrap()
}

fn layout() -> EngineLayout {
    EngineLayout {
        model: "/models/device-test".into(),
        block_size: TOKENS,
        tp_size: 1,
        tp_rank: 0,
        pp_size: 1,
        pp_rank: 0,
        dp_rank: 0,
        num_kv_heads: HEADS as u32,
        use_mla: false,
        role: KvRole::Both,
        groups: vec![],
        kv_events: false,
        stage_layers: vec![],
    }
}

/// Wraps the memory backend and fails the test if it is ever given device memory.
#[derive(Debug)]
struct Spy {
    inner: Arc<dyn KvBackend>,
    device: Mutex<Option<FakeEngine>>,
    registered: Mutex<Vec<(usize, usize)>>,
    /// A test holding it for writing holds every `put` until it lets go.
    put_gate: tokio::sync::RwLock<()>,
}

impl Spy {
    fn new(inner: Arc<dyn KvBackend>) -> Arc<Spy> {
        Arc::new(Spy {
            inner,
            device: Mutex::new(None),
            registered: Mutex::new(Vec::new()),
            put_gate: tokio::sync::RwLock::new(()),
        })
    }

    fn check(&self, ptr: usize, len: usize, what: &str) {
        if let Some(fake) = &*self.device.lock().unwrap() {
            assert!(
                !fake.overlaps(ptr, len),
                "{what} handed device memory to a backend"
            );
        }
    }
}

#[async_trait]
impl KvBackend for Spy {
    fn info(&self) -> &BackendInfo {
        self.inner.info()
    }
    async fn register(&self, region: &Arc<MemRegion>) -> Result<()> {
        self.check(region.as_ptr() as usize, region.len(), "register");
        self.registered
            .lock()
            .unwrap()
            .push((region.as_ptr() as usize, region.len()));
        self.inner.register(region).await
    }
    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.inner.exists(keys).await
    }
    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.inner.value_lens(keys).await
    }
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        for (_, iov) in &items {
            for s in iov.slices() {
                self.check(s.as_ptr() as usize, s.len(), "put");
            }
        }
        let _open = self.put_gate.read().await;
        self.inner.put(items).await
    }
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        for (_, iov) in &items {
            for s in iov.slices() {
                self.check(s.as_ptr() as usize, s.len(), "get_into");
            }
        }
        self.inner.get_into(items).await
    }
    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.inner.remove(keys).await
    }
}

fn open_backend(config: &Config) -> Arc<dyn KvBackend> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(kvpool::open(config)).unwrap()
}

/// A worker over `backend` with its own runtime.
fn worker_on(config: &Config, backend: Arc<dyn KvBackend>) -> WorkerConnector {
    worker_with_layout(config, layout(), backend)
}

fn worker_with_layout(
    config: &Config,
    layout: EngineLayout,
    backend: Arc<dyn KvBackend>,
) -> WorkerConnector {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    WorkerConnector::with_backend(config, layout, backend, runtime).unwrap()
}

struct Rig {
    worker: WorkerConnector,
    fake: FakeEngine,
    spy: Arc<Spy>,
}

/// The physical order of vLLM's `[L, B, H, N, C]` as a permutation, outermost first.
const BLHNC: [usize; 5] = [1, 0, 2, 3, 4];
const LBNHC: [usize; 5] = [0, 1, 3, 2, 4];
const LBHNC: [usize; 5] = [0, 1, 2, 3, 4];

/// Element strides of `[L, B, H, N, C]` laid out in `perm` order.
fn strides(perm: [usize; 5]) -> [usize; 5] {
    let dims = [LAYERS, BLOCKS, HEADS, TOKENS, CONTENT];
    let mut s = [0usize; 5];
    let mut acc = 1;
    for &d in perm.iter().rev() {
        s[d] = acc;
        acc *= dims[d];
    }
    s
}

fn tensors(base: usize, perm: [usize; 5], device: Device) -> Vec<TensorDesc> {
    let s = strides(perm);
    (0..LAYERS)
        .map(|l| TensorDesc {
            layer: format!("layers.{l}"),
            ptr: base + l * s[0],
            shape: vec![BLOCKS, HEADS, TOKENS, CONTENT],
            strides: s[1..].iter().map(|&x| x as isize).collect(),
            elem_size: 1,
            device,
        })
        .collect()
}

/// The byte of logical element (l, h, n, c) of a block holding `pattern`.
fn element(pattern: u8, l: usize, h: usize, n: usize, c: usize) -> u8 {
    pattern
        .wrapping_mul(31)
        .wrapping_add((l * 97 + h * 13 + n * 5 + c) as u8)
}

/// Where each logical element of `block` sits, for a cache in `perm` order.
fn offsets(perm: [usize; 5], block: usize) -> Vec<(usize, u8, [usize; 4])> {
    let s = strides(perm);
    let mut out = Vec::with_capacity(VALUE);
    for l in 0..LAYERS {
        for h in 0..HEADS {
            for n in 0..TOKENS {
                for c in 0..CONTENT {
                    let at = l * s[0] + block * s[1] + h * s[2] + n * s[3] + c * s[4];
                    out.push((at, 0, [l, h, n, c]));
                }
            }
        }
    }
    out
}

/// The canonical value of a block holding `pattern`: per layer, head, token, content.
fn value_of(pattern: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(VALUE);
    for l in 0..LAYERS {
        for h in 0..HEADS {
            for n in 0..TOKENS {
                for c in 0..CONTENT {
                    v.push(element(pattern, l, h, n, c));
                }
            }
        }
    }
    v
}

impl Rig {
    fn new(port: u32, perm: [usize; 5], staging_slots: usize) -> Rig {
        let config = config(port, staging_slots, false);
        Rig::with_backend(&config, perm, Spy::new(open_backend(&config)))
    }

    fn with_backend(config: &Config, perm: [usize; 5], spy: Arc<Spy>) -> Rig {
        Rig::with_layout(config, layout(), perm, spy)
    }

    fn with_layout(config: &Config, layout: EngineLayout, perm: [usize; 5], spy: Arc<Spy>) -> Rig {
        let fake = FakeEngine::new(Device::Cuda { ordinal: 0 }, LAYERS * BLOCKS * PAGE);
        *spy.device.lock().unwrap() = Some(fake.clone());
        fake.expect_stream(STREAM);
        let worker = worker_with_layout(config, layout, spy.clone());
        worker.use_copy_engine(Arc::new(fake.clone()));
        let descs = tensors(fake.addr(0), perm, Device::Cuda { ordinal: 0 });
        // SAFETY: the fake device's memory lives as long as `fake`, which the rig holds.
        unsafe { worker.register_kv_caches(&descs, None) }.unwrap();
        Rig { worker, fake, spy }
    }

    /// Writes `pattern` into `block` now (the state before the step).
    fn fill(&self, perm: [usize; 5], block: usize, pattern: u8) {
        for (at, _, [l, h, n, c]) in offsets(perm, block) {
            self.fake.fill(at, &[element(pattern, l, h, n, c)]);
        }
    }

    /// Queues a forward that writes `pattern` into `block` on the compute stream.
    fn compute(&self, perm: [usize; 5], block: usize, pattern: u8) {
        for (at, _, [l, h, n, c]) in offsets(perm, block) {
            self.fake
                .compute_write(at, vec![element(pattern, l, h, n, c)]);
        }
    }

    /// Queues a forward that writes `pattern` into layer `layer` of `block`.
    fn compute_layer(&self, perm: [usize; 5], block: usize, layer: usize, pattern: u8) {
        for (at, _, [l, h, n, c]) in offsets(perm, block) {
            if l == layer {
                self.fake
                    .compute_write(at, vec![element(pattern, l, h, n, c)]);
            }
        }
    }

    /// Layer `layer` of `block`'s KV in canonical order, read from the device now.
    fn read_layer(&self, perm: [usize; 5], block: usize, layer: usize) -> Vec<u8> {
        offsets(perm, block)
            .into_iter()
            .filter(|(_, _, [l, ..])| *l == layer)
            .map(|(at, _, _)| self.fake.read(at, 1)[0])
            .collect()
    }

    /// `block`'s KV in canonical order, read from the device now.
    fn read(&self, perm: [usize; 5], block: usize) -> Vec<u8> {
        offsets(perm, block)
            .into_iter()
            .map(|(at, _, _)| self.fake.read(at, 1)[0])
            .collect()
    }

    fn stored(&self, hash: u8) -> Option<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(self.spy.inner.get_bytes(&key(hash)))
            .unwrap()
            .map(|b| b.to_vec())
    }
}

fn hash(i: u8) -> BlockHash {
    BlockHash([i; 32])
}

fn hex(hashes: &[u8]) -> String {
    hashes
        .iter()
        .map(|&h| format!("{h:02x}").repeat(32))
        .collect()
}

fn key(i: u8) -> BlockKey {
    let ns = Arc::new(
        kvpool::Namespace::current("/models/device-test", 0, 0, 0, 0, 0, "default").unwrap(),
    );
    BlockKey::new(ns, hash(i))
}

fn save_meta(req: &str, blocks: &[u32], hashes: &[u8]) -> Vec<u8> {
    StepMeta {
        saves: vec![SavePlan {
            req_id: req.into(),
            block_ids: blocks.to_vec(),
            first_block: 0,
            hashes: hex(hashes),
            group: 0,
            ..SavePlan::default()
        }],
        ..StepMeta::default()
    }
    .encode()
}

fn load_meta(req: &str, blocks: &[u32], hashes: &[u8], is_async: bool) -> Vec<u8> {
    StepMeta {
        loads: vec![LoadPlan {
            req_id: req.into(),
            block_ids: blocks.to_vec(),
            hashes: hex(hashes),
            is_async,
            groups: vec![],
        }],
        ..StepMeta::default()
    }
    .encode()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out: {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Saves `blocks` (holding `patterns`) under hashes `hashes` and waits until stored.
fn save_now(rig: &Rig, req: &str, blocks: &[u32], hashes: &[u8]) {
    let _driver = rig.fake.drive(7, Duration::from_micros(200));
    rig.worker
        .bind_connector_metadata(&save_meta(req, blocks, hashes))
        .unwrap();
    rig.worker.wait_for_save(STREAM).unwrap();
    rig.worker.clear_connector_metadata();
    wait_until("saves stored", || {
        rig.worker.saves_in_flight() == 0 && rig.worker.staged_puts_in_flight() == 0
    });
}

#[test]
fn a_save_reads_kv_only_after_the_forward_that_writes_it() {
    let rig = Rig::new(201, BLHNC, 8);
    rig.fill(BLHNC, 3, 1); // stale bytes from an earlier request
    rig.compute(BLHNC, 3, 2); // this step's forward, launched but not run
    rig.worker
        .bind_connector_metadata(&save_meta("a", &[3], &[30]))
        .unwrap();
    rig.worker.wait_for_save(STREAM).unwrap();
    // The copy stream runs freely, but the forward has not: nothing may be read yet.
    let deadline = Instant::now() + Duration::from_millis(100);
    while Instant::now() < deadline {
        rig.fake.run_copies(usize::MAX);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        !rig.fake
            .events()
            .iter()
            .any(|e| matches!(e, FakeEvent::ToHost(_))),
        "a copy read KV before the forward wrote it"
    );
    assert_eq!(rig.worker.saves_in_flight(), 1);
    assert_eq!(rig.stored(30), None);
    // The forward runs; the save proceeds and stores the forward's bytes.
    rig.fake.run_compute();
    let _driver = rig.fake.drive(1, Duration::from_micros(100));
    wait_until("save stored", || rig.stored(30).is_some());
    assert_eq!(rig.stored(30).unwrap(), value_of(2));
    assert_eq!(
        rig.fake.edges().0,
        1,
        "one order_after per hook, not per block"
    );
}

#[test]
fn a_sync_load_lands_after_zeroing_and_before_the_next_forward_without_blocking() {
    let rig = Rig::new(202, BLHNC, 8);
    for b in 0..4 {
        rig.fill(BLHNC, b, 40 + b as u8);
    }
    save_now(&rig, "a", &[0, 1, 2, 3], &[1, 2, 3, 4]);

    // vLLM zeroes the new blocks on the compute stream, then calls start_load_kv.
    rig.compute(BLHNC, 10, 0);
    rig.compute(BLHNC, 11, 0);
    let before = rig.fake.events().len();
    rig.worker
        .bind_connector_metadata(&load_meta("b", &[10, 11], &[2, 3], false))
        .unwrap();
    rig.worker.start_load_kv(STREAM).unwrap();
    // It returned with the copies queued behind the zeroing: nothing ran on the device yet.
    assert_eq!(rig.fake.events().len(), before);
    // The next forward, queued now, must see the loaded bytes.
    rig.fake.compute_write(0, vec![rig.fake.read(0, 1)[0]]);
    let _driver = rig.fake.drive(3, Duration::from_micros(300));
    wait_until("device idle", || rig.fake.compute_pending() == 0);
    let events = rig.fake.events()[before..].to_vec();
    let pos = |f: &dyn Fn(&FakeEvent) -> bool| events.iter().position(f).unwrap();
    let zeroed = events
        .iter()
        .rposition(|e| matches!(e, FakeEvent::Computed(at) if *at != 0))
        .unwrap();
    let copied = pos(&|e| matches!(e, FakeEvent::ToDevice(_)));
    let forward = events
        .iter()
        .rposition(|e| matches!(e, FakeEvent::Computed(0)))
        .unwrap();
    let fenced = events
        .iter()
        .rposition(|e| matches!(e, FakeEvent::Fenced(_, true)))
        .unwrap();
    assert!(zeroed < copied, "copied before zeroing: {events:?}");
    assert!(
        fenced < forward,
        "the forward ran before the load's fence: {events:?}"
    );
    assert_eq!(
        rig.fake.edges(),
        (2, 1),
        "order_after for the save and the load; one wait"
    );
    assert!(rig.worker.get_block_ids_with_load_errors().is_empty());
    assert_eq!(rig.read(BLHNC, 10), value_of(41));
    assert_eq!(rig.read(BLHNC, 11), value_of(42));
}

#[test]
fn an_async_load_is_reported_only_once_its_copies_have_landed() {
    for seed in 1..6u64 {
        let rig = Rig::new(210 + seed as u32, LBNHC, 4);
        for b in 0..6 {
            rig.fill(LBNHC, b, 60 + b as u8 + seed as u8);
        }
        save_now(&rig, "a", &[0, 1, 2, 3, 4, 5], &[1, 2, 3, 4, 5, 6]);
        let _driver = rig.fake.drive(seed, Duration::from_micros(500));
        rig.worker
            .bind_connector_metadata(&load_meta(
                "b",
                &[20, 21, 22, 23, 24, 25],
                &[1, 2, 3, 4, 5, 6],
                true,
            ))
            .unwrap();
        rig.worker.start_load_kv(STREAM).unwrap();
        wait_until("load reported", || {
            let done = rig.worker.get_finished(&[]);
            if done.recving.is_empty() {
                return false;
            }
            assert_eq!(done.recving, vec!["b".to_string()]);
            // At the moment it is reported, every byte is on the device.
            for b in 0..6 {
                assert_eq!(
                    rig.read(LBNHC, 20 + b),
                    value_of(60 + b as u8 + seed as u8),
                    "seed {seed}"
                );
            }
            true
        });
        assert!(rig.worker.get_block_ids_with_load_errors().is_empty());
        assert_eq!(rig.worker.free_staging_slots(), Some(4));
    }
}

#[test]
fn a_finished_request_is_reported_sent_after_its_device_reads_and_preemption_waits_for_them() {
    let rig = Rig::new(220, BLHNC, 8);
    rig.fill(BLHNC, 5, 9);
    rig.worker
        .bind_connector_metadata(&save_meta("a", &[5], &[50]))
        .unwrap();
    rig.worker.wait_for_save(STREAM).unwrap();
    // The copy has not run: the request still reads its blocks.
    std::thread::sleep(Duration::from_millis(30));
    assert!(rig.worker.get_finished(&["a".into()]).sending.is_empty());
    let preempt = StepMeta {
        preempted: vec!["a".into()],
        ..StepMeta::default()
    }
    .encode();
    std::thread::scope(|s| {
        let h = s.spawn(|| rig.worker.handle_preemptions(&preempt).unwrap());
        std::thread::sleep(Duration::from_millis(60));
        assert!(
            !h.is_finished(),
            "handle_preemptions returned before the device reads"
        );
        let _driver = rig.fake.drive(2, Duration::from_micros(100));
        h.join().unwrap()
    });
    wait_until("reported sent", || {
        rig.worker.get_finished(&[]).sending == vec!["a".to_string()]
    });
    wait_until("stored", || rig.stored(50).is_some());
    assert_eq!(rig.stored(50).unwrap(), value_of(9));
    rig.worker.shutdown(Duration::from_secs(5)).unwrap();
    assert_eq!(rig.worker.tracked_requests(), 0);
    assert_eq!(rig.worker.staged_puts_in_flight(), 0);
}

#[test]
fn wait_for_saves_returns_only_once_the_backend_writes_from_staging_are_stored() {
    // A staged save frees its blocks once they are copied to staging; the backend write runs
    // on. A caller of wait_for_saves (a test, an operator draining an instance) expects the
    // blocks to be in the pool when it returns true, not merely copied out.
    let rig = Rig::new(225, BLHNC, 8);
    rig.fill(BLHNC, 2, 17);
    let held = rig.spy.put_gate.blocking_write();
    let _driver = rig.fake.drive(3, Duration::from_micros(100));
    rig.worker
        .bind_connector_metadata(&save_meta("a", &[2], &[52]))
        .unwrap();
    rig.worker.wait_for_save(STREAM).unwrap();
    rig.worker.clear_connector_metadata();
    wait_until("copied to staging", || {
        rig.worker.saves_in_flight() == 0 && rig.worker.staged_puts_in_flight() == 1
    });
    assert!(!rig.worker.wait_for_saves(Duration::from_millis(50)));
    assert_eq!(rig.stored(52), None);
    drop(held);
    assert!(rig.worker.wait_for_saves(Duration::from_secs(10)));
    assert_eq!(rig.stored(52), Some(value_of(17)));
    assert_eq!(rig.worker.staged_puts_in_flight(), 0);
}

#[test]
fn a_failed_copy_fails_exactly_its_blocks_and_the_request_still_completes() {
    let rig = Rig::new(230, BLHNC, 4); // chunks of 2 blocks
    for b in 0..4 {
        rig.fill(BLHNC, b, 70 + b as u8);
    }
    save_now(&rig, "a", &[0, 1, 2, 3], &[1, 2, 3, 4]);
    rig.fake.fail_next_copies(1);
    let _driver = rig.fake.drive(5, Duration::from_micros(200));
    rig.worker
        .bind_connector_metadata(&load_meta("b", &[30, 31, 32, 33], &[1, 2, 3, 4], true))
        .unwrap();
    rig.worker.start_load_kv(STREAM).unwrap();
    wait_until("reported", || {
        rig.worker.get_finished(&[]).recving == vec!["b".to_string()]
    });
    assert_eq!(rig.worker.get_block_ids_with_load_errors(), vec![30, 31]);
    assert_eq!(rig.read(BLHNC, 32), value_of(72));
    assert_eq!(rig.read(BLHNC, 33), value_of(73));

    // A failed device read on save stores nothing (never a half-copied value).
    rig.fill(BLHNC, 8, 99);
    rig.fake.fail_next_copies(1);
    save_now(&rig, "c", &[8], &[80]);
    assert_eq!(rig.stored(80), None);
    assert_eq!(rig.worker.free_staging_slots(), Some(4));
}

#[test]
fn staging_stays_bounded_and_slots_are_never_reused_in_flight_under_tenfold_oversubscription() {
    let rig = Rig::new(240, LBNHC, 4);
    let blocks: Vec<u32> = (0..40).collect();
    let hashes: Vec<u8> = (100..140).collect();
    for &b in &blocks {
        rig.fill(LBNHC, b as usize, b as u8 * 3);
    }
    let _driver = rig.fake.drive(11, Duration::from_micros(300));
    rig.worker
        .bind_connector_metadata(&save_meta("a", &blocks, &hashes))
        .unwrap();
    rig.worker.wait_for_save(STREAM).unwrap();
    wait_until("saves stored", || {
        rig.worker.saves_in_flight() == 0 && rig.worker.staged_puts_in_flight() == 0
    });
    for (&b, &h) in blocks.iter().zip(&hashes) {
        assert_eq!(rig.stored(h).unwrap(), value_of(b as u8 * 3), "block {b}");
    }
    // Load them all back, sync, into other blocks (20..60 overlaps nothing being read).
    let targets: Vec<u32> = (20..60).collect();
    for &t in &targets {
        rig.fill(LBNHC, t as usize, 0);
    }
    rig.worker
        .bind_connector_metadata(&load_meta("b", &targets, &hashes, false))
        .unwrap();
    rig.worker.start_load_kv(STREAM).unwrap();
    assert!(rig.worker.get_block_ids_with_load_errors().is_empty());
    for (&t, &b) in targets.iter().zip(&blocks) {
        assert_eq!(
            rig.read(LBNHC, t as usize),
            value_of(b as u8 * 3),
            "block {t}"
        );
    }
    assert_eq!(rig.worker.free_staging_slots(), Some(4));
    let pinned = rig.fake.pinned();
    assert_eq!(pinned.len(), 1);
    assert_eq!(
        pinned[0].1,
        4 * VALUE,
        "staging is the configured bound, nothing more"
    );
    assert_eq!(
        *rig.spy.registered.lock().unwrap(),
        pinned,
        "the backend sees staging only"
    );
}

#[test]
fn instances_with_different_layouts_share_blocks_through_one_pool() {
    // A GPU instance with vLLM's default token-major layout saves; a CPU instance with the
    // head-major layout vLLM's CPU backend uses loads, and gets the same KV.
    let config = config(250, 8, false);
    let pool = open_backend(&config);
    let spy = Spy::new(pool.clone());
    let gpu = Rig::with_backend(&config, LBNHC, spy);
    gpu.fill(LBNHC, 6, 123);
    save_now(&gpu, "a", &[6], &[66]);

    rpc_dir();
    let cpu_config = Config::from_extra_config(serde_json::json!({
        "backend": "memory", "lookup_rpc_port": 251,
    }))
    .unwrap();
    let cpu = worker_on(&cpu_config, pool);
    let cache = MemRegion::alloc(LAYERS * BLOCKS * PAGE);
    let descs = tensors(cache.as_ptr() as usize, LBHNC, Device::Host);
    // SAFETY: `cache` outlives the worker.
    unsafe { cpu.register_kv_caches(&descs, None) }.unwrap();
    let t = cpu
        .load_blocks(&[9], vec![key(66)], StreamHandle(0))
        .unwrap();
    assert_eq!(t.wait(Duration::from_secs(10)), Some(vec![]));
    let got: Vec<u8> = offsets(LBHNC, 9)
        .into_iter()
        .map(|(at, _, _)| cache.read(at, 1).unwrap()[0])
        .collect();
    assert_eq!(got, value_of(123));
}

#[test]
fn host_kv_can_take_the_staged_path_end_to_end() {
    let config = config(260, 4, true);
    let worker = worker_on(&config, open_backend(&config));
    let cache = MemRegion::alloc(LAYERS * BLOCKS * PAGE);
    let descs = tensors(cache.as_ptr() as usize, LBNHC, Device::Host);
    // SAFETY: `cache` outlives the worker.
    unsafe { worker.register_kv_caches(&descs, None) }.unwrap();
    assert_eq!(worker.free_staging_slots(), Some(4));
    for b in 0..10usize {
        for (at, _, [l, h, n, c]) in offsets(LBNHC, b) {
            cache.write(at, &[element(b as u8, l, h, n, c)]).unwrap();
        }
    }
    let blocks: Vec<u32> = (0..10).collect();
    let keys: Vec<BlockKey> = (0..10).map(|i| key(200 + i)).collect();
    let saved = worker
        .save_blocks(&blocks, keys.clone(), StreamHandle(0))
        .unwrap();
    assert_eq!(saved.wait(Duration::from_secs(10)), Some(vec![]));
    let targets: Vec<u32> = (30..40).collect();
    let mut with_miss = keys.clone();
    with_miss[4] = key(254);
    let loaded = worker
        .load_blocks(&targets, with_miss, StreamHandle(0))
        .unwrap();
    assert_eq!(loaded.wait(Duration::from_secs(10)), Some(vec![34]));
    for (i, &t) in targets.iter().enumerate() {
        if i == 4 {
            continue;
        }
        let got: Vec<u8> = offsets(LBNHC, t as usize)
            .into_iter()
            .map(|(at, _, _)| cache.read(at, 1).unwrap()[0])
            .collect();
        assert_eq!(got, value_of(i as u8), "block {t}");
    }
    assert_eq!(worker.free_staging_slots(), Some(4));
    let err = worker
        .load_blocks(&[1, 2], vec![key(1)], StreamHandle(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 block ids but 1 keys"), "{err}");
    let err = worker
        .save_blocks(&[BLOCKS as u32], vec![key(1)], StreamHandle(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("outside the registered cache"), "{err}");
}

#[test]
fn wrong_devices_and_small_staging_are_clear_errors() {
    let config = config(270, 1, false);
    let worker = worker_on(&config, open_backend(&config));
    let fake = FakeEngine::new(Device::Cuda { ordinal: 0 }, LAYERS * BLOCKS * PAGE);
    worker.use_copy_engine(Arc::new(fake.clone()));
    let descs = tensors(fake.addr(0), BLHNC, Device::Cuda { ordinal: 0 });
    // SAFETY: rejected before any copy; the fake outlives the call.
    let err = unsafe { worker.register_kv_caches(&descs, None) }
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("device_staging_bytes") && err.contains(&(2 * VALUE).to_string()),
        "{err}"
    );
    // A host pointer described as device memory is caught at registration.
    let host = MemRegion::alloc(LAYERS * BLOCKS * PAGE);
    let lies = tensors(host.as_ptr() as usize, BLHNC, Device::Cuda { ordinal: 0 });
    // SAFETY: rejected before any copy.
    let err = unsafe { worker.register_kv_caches(&lies, None) }
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layers.0") && err.contains("not device memory"),
        "{err}"
    );
    // The other engine's device.
    let npu = tensors(fake.addr(0), BLHNC, Device::Npu { device: 0 });
    // SAFETY: rejected before any copy.
    let err = unsafe { worker.register_kv_caches(&npu, None) }
        .unwrap_err()
        .to_string();
    assert!(err.contains("npu:0") && err.contains("cuda:0"), "{err}");
}

fn layer_key(layer: u32, i: u8) -> BlockKey {
    let ns = kvpool::Namespace::current("/models/device-test", 0, 0, 0, 0, 0, "default")
        .unwrap()
        .with_layer(layer)
        .unwrap();
    BlockKey::new(Arc::new(ns), hash(i))
}

#[test]
fn layerwise_saves_each_layer_after_its_forward_and_a_layer_is_on_the_device_when_its_wait_returns()
{
    let layout = EngineLayout {
        stage_layers: vec![LAYERS as u32],
        ..layout()
    };
    let layerwise = |port: u32| {
        rpc_dir();
        Config::from_extra_config(serde_json::json!({
            "backend": "memory",
            "lookup_rpc_port": port,
            "device_staging_bytes": 8 * VALUE,
            "use_layerwise": true,
            "layerwise_prefetch_layers": 1,
        }))
        .unwrap()
    };
    for seed in 1..5u64 {
        let port = 280 + 2 * seed as u32;
        let config = layerwise(port);
        let spy = Spy::new(open_backend(&config));
        let a = Rig::with_layout(&config, layout.clone(), LBNHC, spy.clone());
        for b in 0..4 {
            a.fill(LBNHC, b, 1);
        }
        // The forward writes one layer after another, each layer's save handed over after its
        // writes; copies and compute run late, at random.
        let driver = a.fake.drive(seed, Duration::from_micros(300));
        a.worker
            .bind_connector_metadata(&save_meta("a", &[0, 1, 2, 3], &[1, 2, 3, 4]))
            .unwrap();
        for l in 0..LAYERS {
            for b in 0..4 {
                a.compute_layer(LBNHC, b, l, 50 + b as u8);
            }
            a.worker
                .save_kv_layer(&format!("layers.{l}"), STREAM)
                .unwrap();
        }
        a.worker.wait_for_save(STREAM).unwrap();
        a.worker.clear_connector_metadata();
        wait_until("layer saves stored", || {
            a.worker.saves_in_flight() == 0 && a.worker.staged_puts_in_flight() == 0
        });
        drop(driver);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for l in 0..LAYERS {
            for b in 0..4u8 {
                let stored = rt
                    .block_on(spy.inner.get_bytes(&layer_key(l as u32, b + 1)))
                    .unwrap()
                    .map(|v| v.to_vec());
                assert_eq!(
                    stored.as_deref(),
                    Some(&value_of(50 + b)[l * PAGE..(l + 1) * PAGE]),
                    "seed {seed}: layer {l} of block {b} saved before its forward wrote it"
                );
            }
        }

        // Another instance loads them; its layer 1 of block 2 (hash 3) is lost.
        rt.block_on(spy.inner.remove(&[layer_key(1, 3)])).unwrap();
        let b = Rig::with_layout(&layerwise(port + 1), layout.clone(), LBNHC, spy.clone());
        // A layer's value is one page: the staging holds a slot per page.
        let slots = b.worker.free_staging_slots();
        assert_eq!(slots, Some(8 * LAYERS));
        for blk in 20..24 {
            b.fill(LBNHC, blk, 7);
        }
        // vLLM zeroes the new blocks on the compute stream before the step's loads.
        for blk in 20..24 {
            b.compute(LBNHC, blk, 0);
        }
        let before = b.fake.events().len();
        b.worker
            .bind_connector_metadata(&load_meta("b", &[20, 21, 22, 23], &[1, 2, 3, 4], false))
            .unwrap();
        b.worker.start_load_kv(STREAM).unwrap();
        // Each layer's attention is queued after its wait: here one marker write per layer.
        let marker = |l: usize| offsets(LBNHC, 63)[l * PAGE].0;
        for l in 0..LAYERS {
            b.worker
                .wait_for_layer_load(&format!("layers.{l}"), STREAM)
                .unwrap();
            b.fake.compute_write(marker(l), vec![0xaa]);
        }
        b.worker.wait_for_save(STREAM).unwrap();
        b.worker.clear_connector_metadata();
        // Every wait returned with nothing run on the device: the host never waited for it.
        assert_eq!(b.fake.events().len(), before, "seed {seed}");
        assert_eq!(
            b.fake.edges(),
            (1, LAYERS),
            "one order_after for the loads, one stream wait per layer"
        );
        let driver = b.fake.drive(seed + 100, Duration::from_micros(300));
        wait_until("device idle", || b.fake.compute_pending() == 0);
        assert_eq!(
            b.worker.get_block_ids_with_load_errors(),
            vec![22],
            "seed {seed}: exactly the block with the lost layer fails"
        );
        drop(driver);
        // Every copy of a layer to the loaded blocks ran before that layer's attention, and
        // after the zeroing.
        let events = b.fake.events()[before..].to_vec();
        let s = strides(LBNHC);
        let ran_at = |what: &FakeEvent| events.iter().position(|e| e == what).unwrap();
        for l in 0..LAYERS {
            let attention = ran_at(&FakeEvent::Computed(marker(l)));
            for (i, e) in events.iter().enumerate() {
                let FakeEvent::ToDevice(offs) = e else {
                    continue;
                };
                for &off in offs {
                    let (layer, block) = (off / s[0], off % s[0] / s[1]);
                    if layer == l && (20..24).contains(&block) {
                        assert!(
                            i < attention,
                            "seed {seed}: a copy to layer {l} of block {block} ran after the \
                             layer's attention: {events:?}"
                        );
                    }
                }
            }
        }
        for (i, blk) in (20..24).enumerate() {
            if blk == 22 {
                continue;
            }
            for l in 0..LAYERS {
                assert_eq!(
                    b.read_layer(LBNHC, blk, l),
                    value_of(50 + i as u8)[l * PAGE..(l + 1) * PAGE],
                    "seed {seed}: layer {l} of block {blk}"
                );
            }
        }
        assert_eq!(
            b.worker.free_staging_slots(),
            slots,
            "seed {seed}: a slot leaked"
        );
    }
}

/// Runs the fake device until it is idle when dropped, so a test that holds the device and
/// fails ends instead of hanging in the worker's shutdown.
struct RunsTheDeviceOnDrop(FakeEngine);

impl Drop for RunsTheDeviceOnDrop {
    fn drop(&mut self) {
        let mut idle = 0;
        while idle < 50 {
            if self.0.run_compute() + self.0.run_copies(usize::MAX) == 0 {
                idle += 1;
                std::thread::sleep(Duration::from_millis(1));
            } else {
                idle = 0;
            }
        }
    }
}

#[test]
fn a_layer_load_is_never_queued_behind_a_layer_save_that_waits_for_the_forward() {
    // A prefix hit prefilled past its end loads some blocks and saves others in one step,
    // layer by layer. Each layer's save waits for the forward to write that layer; were a later
    // layer's load queued behind it on the same copy stream, it could not start before the
    // forward reached that save, while the forward waits for the load: the overlap is gone.
    let layout = EngineLayout {
        stage_layers: vec![LAYERS as u32],
        ..layout()
    };
    rpc_dir();
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "lookup_rpc_port": 300,
        "device_staging_bytes": 8 * VALUE,
        "use_layerwise": true,
        "layerwise_prefetch_layers": 1,
    }))
    .unwrap();
    let spy = Spy::new(open_backend(&config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for i in 1..=2u8 {
        for l in 0..LAYERS {
            let layer = value_of(60 + i)[l * PAGE..(l + 1) * PAGE].to_vec();
            rt.block_on(spy.inner.put_bytes(layer_key(l as u32, i), layer.into()))
                .unwrap();
        }
    }
    let rig = Rig::with_layout(&config, layout, LBNHC, spy.clone());
    // Dropped first: a failed assertion below leaves copies the worker's runtime waits for.
    let _drain = RunsTheDeviceOnDrop(rig.fake.clone());
    for blk in [20, 21] {
        rig.fill(LBNHC, blk, 7);
        rig.compute(LBNHC, blk, 0); // vLLM's zeroing, before the step
    }
    let zeroing = rig.fake.compute_pending();
    let mut step = StepMeta::decode(&save_meta("s", &[30, 31], &[11, 12])).unwrap();
    step.loads = StepMeta::decode(&load_meta("l", &[20, 21], &[1, 2], false))
        .unwrap()
        .loads;
    rig.worker.bind_connector_metadata(&step.encode()).unwrap();
    rig.worker.start_load_kv(STREAM).unwrap();
    for l in 0..LAYERS {
        rig.worker
            .wait_for_layer_load(&format!("layers.{l}"), STREAM)
            .unwrap();
        for (i, blk) in [30, 31].into_iter().enumerate() {
            rig.compute_layer(LBNHC, blk, l, 80 + i as u8);
        }
        rig.worker
            .save_kv_layer(&format!("layers.{l}"), STREAM)
            .unwrap();
    }
    // Only the zeroing runs: the forward is held at layer 0, waiting for its load.
    assert_eq!(rig.fake.run_compute(), zeroing);
    let s = strides(LBNHC);
    let loaded_layers = |events: &[FakeEvent]| {
        let mut layers: Vec<usize> = events
            .iter()
            .filter_map(|e| match e {
                FakeEvent::ToDevice(offs) => Some(offs.iter().map(|o| o / s[0])),
                _ => None,
            })
            .flatten()
            .collect();
        layers.sort_unstable();
        layers.dedup();
        layers
    };
    // Every layer's load runs while the forward has not even started: none waits for a save.
    wait_until("every layer loaded with the forward held", || {
        rig.fake.run_stream(Direction::ToDevice, usize::MAX);
        loaded_layers(&rig.fake.events()) == (0..LAYERS).collect::<Vec<_>>()
    });
    assert!(
        !rig.fake
            .events()
            .iter()
            .any(|e| matches!(e, FakeEvent::ToHost(_))),
        "a save read KV before the forward wrote it"
    );
    assert_eq!(rig.fake.compute_pending(), LAYERS * (1 + 2 * PAGE));

    // The step completes; the saves hold the forward's bytes, the loads the pool's.
    let driver = rig.fake.drive(9, Duration::from_micros(200));
    rig.worker.wait_for_save(STREAM).unwrap();
    rig.worker.clear_connector_metadata();
    wait_until("device idle", || rig.fake.compute_pending() == 0);
    assert!(rig.worker.wait_for_saves(Duration::from_secs(10)));
    drop(driver);
    assert!(rig.worker.get_block_ids_with_load_errors().is_empty());
    for (i, blk) in [20, 21].into_iter().enumerate() {
        for l in 0..LAYERS {
            assert_eq!(
                rig.read_layer(LBNHC, blk, l),
                value_of(61 + i as u8)[l * PAGE..(l + 1) * PAGE],
                "layer {l} of block {blk}"
            );
        }
    }
    for (i, hash) in [11u8, 12].into_iter().enumerate() {
        for l in 0..LAYERS {
            let stored = rt
                .block_on(spy.inner.get_bytes(&layer_key(l as u32, hash)))
                .unwrap()
                .map(|v| v.to_vec());
            assert_eq!(
                stored.as_deref(),
                Some(&value_of(80 + i as u8)[l * PAGE..(l + 1) * PAGE]),
                "layer {l} of the block saved under {hash}"
            );
        }
    }
}
