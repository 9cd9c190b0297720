//! The connector's scheduler and worker halves together, without vLLM: the plans, the lookup
//! service, tensor-parallel shares and load failures, over the memory backend.
//! (`connector-py/tests` drives the same code from the real vLLM scheduler.)

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kvpool::{Config, KvBackend, KvBackendExt, MemRegion};
use kvpool_connector::{
    CachedRequest, Device, EngineLayout, GroupKind, KvCacheGroup, KvRole, NewRequest, PoolEvent,
    RequestInfo, SchedulerConnector, StepInput, StoredBlock, StreamHandle, TensorDesc,
    WorkerConnector,
};

const BLOCK: usize = 4;
const PAGE: usize = 64;
const BLOCKS: usize = 32;

fn rpc_dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    let dir = DIR.get_or_init(|| tempfile::tempdir().unwrap());
    std::env::set_var("VLLM_RPC_BASE_PATH", dir.path());
    dir.path()
}

fn config(port: u32) -> Config {
    rpc_dir();
    Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "lookup_rpc_port": port,
        "lookup_timeout_ms": 2000,
    }))
    .unwrap()
}

fn layout(tp_size: u32, tp_rank: u32, heads: u32) -> EngineLayout {
    EngineLayout {
        model: "/models/test-model".into(),
        block_size: BLOCK,
        tp_size,
        tp_rank,
        pp_size: 1,
        pp_rank: 0,
        dp_rank: 0,
        num_kv_heads: heads,
        use_mla: false,
        role: KvRole::Both,
        groups: vec![],
        kv_events: false,
        stage_layers: vec![],
    }
}

struct Worker {
    connector: WorkerConnector,
    cache: Arc<MemRegion>,
}

impl Worker {
    fn new(config: &Config, layout: EngineLayout, backend: Arc<dyn KvBackend>) -> Worker {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let connector = WorkerConnector::with_backend(config, layout, backend, rt).unwrap();
        let cache = MemRegion::alloc(BLOCKS * PAGE);
        let tensor = TensorDesc {
            layer: "layer0".into(),
            ptr: cache.as_ptr() as usize,
            shape: vec![BLOCKS, PAGE],
            strides: vec![PAGE as isize, 1],
            elem_size: 1,
            device: Device::Host,
        };
        // SAFETY: `cache` lives as long as the worker.
        unsafe { connector.register_kv_caches(&[tensor], None) }.unwrap();
        Worker { connector, cache }
    }

    fn fill(&self, block: u32, byte: u8) {
        self.cache
            .write(block as usize * PAGE, &[byte; PAGE])
            .unwrap();
    }

    fn block(&self, block: u32) -> Vec<u8> {
        self.cache.read(block as usize * PAGE, PAGE).unwrap()
    }

    /// Runs a step that starts `req`'s asynchronous load and waits until it is reported.
    fn finish_async_load(&self, meta: &[u8], req: &str) -> kvpool_connector::FinishedTransfers {
        self.run_step(meta);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let done = self.connector.get_finished(&[]);
            if done.recving.iter().any(|r| r == req) {
                return done;
            }
            assert!(std::time::Instant::now() < deadline, "{req} never loaded");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn run_step(&self, meta: &[u8]) {
        self.connector.bind_connector_metadata(meta).unwrap();
        self.connector.start_load_kv(StreamHandle(0)).unwrap();
        self.connector.wait_for_save(StreamHandle(0)).unwrap();
        self.connector.clear_connector_metadata();
        let ids: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        assert!(self
            .connector
            .wait_for_requests(&ids, Duration::from_secs(10)));
    }
}

fn memory_backend(config: &Config) -> Arc<dyn KvBackend> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(kvpool::open(config)).unwrap()
}

fn new_request(id: &str, tokens: &[u32], blocks: Vec<u32>, computed: usize) -> NewRequest {
    NewRequest {
        req_id: id.into(),
        prompt_token_ids: tokens.to_vec(),
        block_ids: vec![blocks],
        num_computed_tokens: computed,
        num_scheduled_tokens: tokens.len() - computed,
        ..NewRequest::default()
    }
}

fn info<'a>(id: &'a str, tokens: &'a [u32]) -> RequestInfo<'a> {
    RequestInfo {
        req_id: id,
        prompt_token_ids: tokens,
        block_hashes: &[],
        num_tokens: tokens.len(),
        lora_name: None,
        cache_salt: None,
    }
}

#[test]
fn saved_blocks_are_found_and_loaded_into_other_blocks() {
    let config = config(101);
    let backend = memory_backend(&config);
    let worker = Worker::new(&config, layout(1, 0, 2), backend);
    let sched = SchedulerConnector::new(&config, layout(1, 0, 2)).unwrap();
    let tokens: Vec<u32> = (0..18).collect(); // 4 full blocks and 2 tokens

    // First request: nothing in the pool; its 4 full blocks are saved.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("a", &tokens), 0),
        (0, false)
    );
    sched.update_state_after_alloc("a", vec![], 0);
    for b in 0..5 {
        worker.fill(b, 10 + b as u8);
    }
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", &tokens, vec![5, 1, 2, 3, 4], 0)],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    assert!(
        sched.request_finished("a", 5),
        "a save was planned: free waits"
    );
    let done = worker.connector.get_finished(&["a".into()]);
    assert_eq!(done.sending, vec!["a".to_string()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);

    // Same prompt again: 16 tokens from the pool (18 > 16, so no "one short" rule).
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (16, false)
    );
    // With 2 blocks in the engine's own cache, only the other 2 load.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 8),
        (8, false)
    );
    sched.update_state_after_alloc("b", vec![vec![20, 21, 22, 23, 24]], 8);
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("b", &tokens, vec![20, 21, 22, 23, 24], 16)],
        finished_req_ids: vec!["a".into()],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    assert!(worker.connector.get_block_ids_with_load_errors().is_empty());
    assert_eq!(
        worker.block(20),
        vec![0; PAGE],
        "blocks the engine had are not loaded"
    );
    assert_eq!(worker.block(22), vec![12; PAGE]);
    assert_eq!(worker.block(23), vec![13; PAGE]);
    assert!(!sched.request_finished("b", 5), "b saved nothing new");

    // A prompt that is exactly 4 blocks: a full hit is reported one token short.
    let exact = &tokens[..16];
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", exact), 0),
        (15, false)
    );
    sched.request_finished("c", 0);
    assert_eq!(sched.tracked_requests(), 0);
    assert_eq!(worker.connector.tracked_requests(), 0);
}

/// Two tensor-parallel workers over one shared pool and their scheduler, and the plan of a
/// first step that saves request "a" (`tokens`, blocks 5, 1, 2, 3, 4).
fn two_ranks(
    port: u32,
    heads: u32,
    tokens: &[u32],
) -> (Worker, Worker, SchedulerConnector, Vec<u8>) {
    let config = config(port);
    let backend = memory_backend(&config);
    let rank0 = Worker::new(&config, layout(2, 0, heads), backend.clone());
    let rank1 = Worker::new(&config, layout(2, 1, heads), backend);
    let sched = SchedulerConnector::new(&config, layout(2, 0, heads)).unwrap();
    sched.get_num_new_matched_tokens(&info("a", tokens), 0);
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", tokens, vec![5, 1, 2, 3, 4], 0)],
        ..StepInput::default()
    });
    (rank0, rank1, sched, meta)
}

#[test]
fn tensor_parallel_ranks_sharing_kv_split_the_saves_and_lookup_needs_every_rank() {
    let tokens: Vec<u32> = (100..117).collect();
    let hit = |sched: &SchedulerConnector| sched.get_num_new_matched_tokens(&info("b", &tokens), 0);

    // 2 ranks, 1 KV head: both hold the same KV, so each saves every other block.
    let (rank0, rank1, sched, meta) = two_ranks(102, 1, &tokens);
    rank0.run_step(&meta);
    // Only rank 0's share (blocks 0 and 2) is in the pool: the prefix ends at block 1.
    assert_eq!(hit(&sched), (4, false));
    rank1.run_step(&meta);
    assert_eq!(hit(&sched), (16, false));

    // 2 ranks, 2 heads: each rank's blocks are its own keys; the lookup needs both.
    let (rank0, rank1, sched, meta) = two_ranks(103, 2, &tokens);
    rank0.run_step(&meta);
    assert_eq!(hit(&sched), (0, false));
    rank1.run_step(&meta);
    assert_eq!(hit(&sched), (16, false));
}

#[test]
fn chunked_prefill_saves_each_new_block_once_and_missing_blocks_are_load_errors() {
    let config = config(104);
    let backend = memory_backend(&config);
    let worker = Worker::new(&config, layout(1, 0, 2), backend.clone());
    let sched = SchedulerConnector::new(&config, layout(1, 0, 2)).unwrap();
    let tokens: Vec<u32> = (500..520).collect(); // 5 blocks
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    // Block id 0 is vLLM's null block, never a request's.
    let mut first = new_request("a", &tokens, vec![5, 1], 0);
    first.num_scheduled_tokens = 6; // chunk 1: one full block
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![first],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(plan["saves"][0]["block_ids"], serde_json::json!([5]));
    worker.run_step(&meta);
    let meta = sched.build_connector_meta(StepInput {
        cached_requests: vec![CachedRequest {
            req_id: "a".into(),
            new_block_ids: vec![vec![2, 3, 4]],
            num_computed_tokens: 6,
            num_scheduled_tokens: 14,
            ..CachedRequest::default()
        }],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(
        plan["saves"][0]["block_ids"],
        serde_json::json!([1, 2, 3, 4])
    );
    assert_eq!(plan["saves"][0]["first_block"], 1);
    worker.run_step(&meta);
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (19, false)
    );
    sched.update_state_after_alloc("b", vec![vec![10, 11, 12, 13, 14]], 19);

    // Two of the blocks vanish between the lookup and the load.
    // The connector's default key format is Ascend Store's current one.
    let ns = Arc::new(
        kvpool::Namespace::current("/models/test-model", 0, 0, 0, 0, 0, "default").unwrap(),
    );
    let hashes = kvpool::hash::token_block_hashes(
        &tokens,
        std::num::NonZeroUsize::new(BLOCK).unwrap(),
        None,
        None,
    );
    let gone: Vec<kvpool::BlockKey> = [1, 3]
        .iter()
        .map(|&i| kvpool::BlockKey::new(ns.clone(), hashes[i]))
        .collect();
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(backend.remove(&gone))
        .unwrap();
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("b", &tokens, vec![10, 11, 12, 13, 14], 19)],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    assert_eq!(
        worker.connector.get_block_ids_with_load_errors(),
        vec![11, 13]
    );
    // vLLM's connector stats: every save and load, with what it moved.
    let records = worker.connector.take_transfer_records();
    let loads: Vec<_> = records.iter().filter(|r| r.op == "load").collect();
    assert_eq!(loads.len(), 1, "{records:?}");
    assert_eq!(
        (loads[0].blocks, loads[0].failed, loads[0].bytes),
        (5, 2, 3 * PAGE as u64)
    );
    let saved: u64 = records
        .iter()
        .filter(|r| r.op == "save")
        .map(|r| r.bytes)
        .sum();
    assert_eq!(saved, 5 * PAGE as u64, "{records:?}");
    assert!(worker.connector.take_transfer_records().is_empty());
    sched.update_connector_output(&[], &[], &[11, 13], &[]);
    // The failed request is computed from now on, not offered the pool again.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (0, false)
    );
}

#[test]
fn a_finished_request_whose_free_was_not_delayed_is_never_reported_as_sent() {
    // vLLM asserts that every finished_sending id is a request it still holds.
    let config = config(105);
    let backend = memory_backend(&config);
    let worker = Worker::new(&config, layout(1, 0, 2), backend);
    let sched = SchedulerConnector::new(&config, layout(1, 0, 2)).unwrap();
    let tokens: Vec<u32> = (900..912).collect();
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", &tokens, vec![5, 1, 2], 0)],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    // Preempted, then aborted while waiting: it holds no blocks, so nothing is delayed.
    assert!(!sched.request_finished("a", 0));
    let meta = sched.build_connector_meta(StepInput {
        finished_req_ids: vec!["a".into()],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    let done = worker.connector.get_finished(&["a".into()]);
    assert!(done.sending.is_empty(), "{done:?}");
    assert_eq!(sched.tracked_requests(), 0);
    assert_eq!(worker.connector.tracked_requests(), 0);
}

/// A hybrid model: a full-attention group and a group of `second` kind, both of `BLOCK`-token
/// blocks.
fn two_group_layout(second: GroupKind) -> EngineLayout {
    EngineLayout {
        groups: vec![
            KvCacheGroup::full_attention(BLOCK),
            KvCacheGroup {
                kind: second,
                block_size: BLOCK,
            },
        ],
        ..layout(1, 0, 2)
    }
}

fn hybrid_layout(window: usize) -> EngineLayout {
    two_group_layout(GroupKind::SlidingWindow {
        sliding_window: window,
    })
}

fn mamba_layout() -> EngineLayout {
    two_group_layout(GroupKind::Mamba)
}

/// A worker of `layout`'s two groups: one layer each, sharing one cache tensor, as vLLM lays
/// out hybrid groups; a block id belongs to one group at a time.
fn two_group_worker(config: &Config, layout: EngineLayout, backend: Arc<dyn KvBackend>) -> Worker {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let connector = WorkerConnector::with_backend(config, layout, backend, rt).unwrap();
    let cache = MemRegion::alloc(BLOCKS * PAGE);
    let tensor = |layer: &str| TensorDesc {
        layer: layer.into(),
        ptr: cache.as_ptr() as usize,
        shape: vec![BLOCKS, PAGE],
        strides: vec![PAGE as isize, 1],
        elem_size: 1,
        device: Device::Host,
    };
    let tensors = [tensor("group0.layer0"), tensor("group1.layer1")];
    // SAFETY: `cache` lives as long as the worker.
    unsafe { connector.register_kv_cache_groups(&tensors, &[0, 1], None) }.unwrap();
    Worker { connector, cache }
}

fn hybrid_request(id: &str, tokens: &[u32], blocks: [Vec<u32>; 2], computed: usize) -> NewRequest {
    NewRequest {
        req_id: id.into(),
        prompt_token_ids: tokens.to_vec(),
        block_ids: blocks.to_vec(),
        num_computed_tokens: computed,
        num_scheduled_tokens: tokens.len() - computed,
        ..NewRequest::default()
    }
}

#[test]
fn hybrid_groups_are_saved_under_their_own_keys_and_loaded_by_their_own_rules() {
    let config = config(106);
    let backend = memory_backend(&config);
    // A 5-token window over 4-token blocks needs cdiv(4, 4) = 1 block at the hit's end.
    let worker = two_group_worker(&config, hybrid_layout(5), backend.clone());
    let sched = SchedulerConnector::new(&config, hybrid_layout(5)).unwrap();
    let tokens: Vec<u32> = (700..721).collect(); // 5 full blocks and 1 token

    assert_eq!(
        sched.get_num_new_matched_tokens(&info("a", &tokens), 0),
        (0, false)
    );
    let a_blocks = [vec![1, 2, 3, 4, 5, 6], vec![7, 8, 9, 10, 11, 12]];
    for b in 1..=12 {
        worker.fill(b, 100 + b as u8);
    }
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![hybrid_request("a", &tokens, a_blocks.clone(), 0)],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(
        plan["saves"][0]["block_ids"],
        serde_json::json!([1, 2, 3, 4, 5])
    );
    assert_eq!(
        plan["saves"][1]["block_ids"],
        serde_json::json!([7, 8, 9, 10, 11])
    );
    assert_eq!(plan["saves"][1]["group"], 1);
    worker.run_step(&meta);
    assert!(sched.request_finished_all_groups("a", &a_blocks));
    let done = worker.connector.get_finished(&["a".into()]);
    assert_eq!(done.sending, vec!["a".to_string()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);

    // Each group's blocks are under its own `@group:{g}` keys.
    let hashes = kvpool::hash::token_block_hashes(
        &tokens,
        std::num::NonZeroUsize::new(BLOCK).unwrap(),
        None,
        None,
    );
    let key = |group: u32, i: usize| {
        let ns = kvpool::Namespace::current("/models/test-model", 0, 0, 0, 0, group, "default");
        kvpool::BlockKey::new(Arc::new(ns.unwrap()), hashes[i])
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bytes = |k| {
        rt.block_on(backend.get_bytes(&k))
            .unwrap()
            .unwrap()
            .to_vec()
    };
    assert_eq!(bytes(key(0, 2)), vec![103; PAGE]);
    assert_eq!(bytes(key(1, 2)), vec![109; PAGE]);

    // The hit stops short of the last token on a block boundary (20 tokens, not 21 - 1).
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (20, true)
    );
    // The window group keeps only the block at the hit's end; the others are null. Hybrid
    // loads are asynchronous (vLLM 0.33 takes their failures only as failed receives), so
    // vLLM allocates the hit's blocks and schedules the request once they are loaded.
    let b_blocks = [vec![13, 14, 15, 16, 17], vec![0, 0, 0, 0, 19]];
    sched.update_state_after_alloc("b", b_blocks.to_vec(), 20);
    let meta = sched.build_connector_meta(StepInput::default());
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(
        plan["loads"][0]["block_ids"],
        serde_json::json!([13, 14, 15, 16, 17, 19])
    );
    assert_eq!(
        plan["loads"][0]["groups"],
        serde_json::json!([0, 0, 0, 0, 0, 1])
    );
    assert_eq!(plan["loads"][0]["is_async"], true);
    let done = worker.finish_async_load(&meta, "b");
    assert!(done.failed_recving.is_empty(), "{done:?}");
    for (i, b) in (13..=17).enumerate() {
        assert_eq!(worker.block(b), vec![101 + i as u8; PAGE], "full block {i}");
    }
    assert_eq!(worker.block(19), vec![111; PAGE], "the window's block");
    assert_eq!(worker.block(18), vec![0; PAGE], "not part of the hit");
    sched.update_connector_output(&[], &done.recving, &[], &[]);
    sched.request_finished_all_groups("b", &b_blocks);

    // Without the window group's block at 20 tokens, the hit ends where the window group
    // still has one: 16 tokens.
    rt.block_on(backend.remove(&[key(1, 4)])).unwrap();
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", &tokens), 0),
        (16, true)
    );
    // It vanishes between lookup and load: the request fails with exactly that group's block.
    let c_blocks = [vec![21, 22, 23, 24], vec![0, 0, 0, 27]];
    sched.update_state_after_alloc("c", c_blocks.to_vec(), 16);
    rt.block_on(backend.remove(&[key(1, 3)])).unwrap();
    let meta = sched.build_connector_meta(StepInput::default());
    let done = worker.finish_async_load(&meta, "c");
    assert_eq!(done.failed_recving, vec![("c".to_string(), vec![27])]);
    assert!(worker.connector.get_block_ids_with_load_errors().is_empty());
    for (i, b) in (21..=24).enumerate() {
        assert_eq!(worker.block(b), vec![101 + i as u8; PAGE], "full block {i}");
    }
    sched.update_connector_output(&[], &done.recving, &[], &["c".to_string()]);
    // vLLM recomputes it; the pool is not offered to it again.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", &tokens), 0),
        (0, false)
    );
    let c_blocks = [vec![21, 22, 23, 24, 25, 26], vec![0, 0, 0, 27, 28, 29]];
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![hybrid_request("c", &tokens, c_blocks.clone(), 0)],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(plan["saves"][1]["block_ids"], serde_json::json!([27, 28]));
    worker.run_step(&meta);
    assert!(
        sched.request_finished_all_groups("c", &c_blocks),
        "c saved blocks: free waits"
    );
    let meta = sched.build_connector_meta(StepInput {
        finished_req_ids: vec!["a".into(), "b".into(), "c".into()],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    let done = worker.connector.get_finished(&["c".into()]);
    assert_eq!(done.sending, vec!["c".to_string()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);
    assert_eq!(sched.tracked_requests(), 0);
    assert_eq!(worker.connector.tracked_requests(), 0);
}

#[test]
fn hybrid_models_need_current_keys() {
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "key_format": "v0.18",
    }))
    .unwrap();
    let err = SchedulerConnector::new(&config, hybrid_layout(8)).unwrap_err();
    assert!(
        err.to_string()
            .contains("hybrid models need the current format"),
        "{err}"
    );
}

#[test]
fn kv_events_report_what_the_pool_stored_lost_and_cleared() {
    let config = config(108);
    let backend = memory_backend(&config);
    let events_layout = EngineLayout {
        kv_events: true,
        ..layout(1, 0, 2)
    };
    let worker = Worker::new(&config, events_layout.clone(), backend.clone());
    let sched = SchedulerConnector::new(&config, events_layout).unwrap();
    let tokens: Vec<u32> = (500..518).collect(); // 4 full blocks and 2 tokens
    let hashes = kvpool::hash::token_block_hashes(
        &tokens,
        std::num::NonZeroUsize::new(BLOCK).unwrap(),
        None,
        None,
    );
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    // Block 1 is in the pool already (saved by someone else): it is reported too, since the
    // pool holds it after this save.
    let ns = Arc::new(
        kvpool::Namespace::current("/models/test-model", 0, 0, 0, 0, 0, "default").unwrap(),
    );
    let key = |i: usize| kvpool::BlockKey::new(ns.clone(), hashes[i]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(backend.put_bytes(key(1), vec![9u8; PAGE].into()))
        .unwrap();
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", &tokens, vec![5, 1, 2, 3, 4], 0)],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    let events = worker.connector.take_pool_events();
    let mut stored: Vec<StoredBlock> = events
        .into_iter()
        .map(|e| match e {
            PoolEvent::Stored(b) => b,
            other => panic!("only stores expected, got {other:?}"),
        })
        .collect();
    stored.sort_by_key(|b| hashes.iter().position(|h| *h == b.hash));
    let expected: Vec<StoredBlock> = (0..4)
        .map(|i| StoredBlock {
            group: 0,
            hash: hashes[i],
            parent: i.checked_sub(1).map(|p| hashes[p]),
            token_ids: tokens[i * BLOCK..(i + 1) * BLOCK].to_vec(),
            block_size: BLOCK as u32,
            lora_name: None,
        })
        .collect();
    assert_eq!(stored, expected);
    assert!(worker.connector.take_pool_events().is_empty(), "taken once");
    sched.request_finished("a", 5);
    let done = worker.connector.get_finished(&["a".into()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);

    // Blocks 2 and 3 vanish between the lookup and the load: the load reports them lost.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (16, false)
    );
    sched.update_state_after_alloc("b", vec![vec![10, 11, 12, 13, 14]], 16);
    rt.block_on(backend.remove(&[key(2), key(3)])).unwrap();
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("b", &tokens, vec![10, 11, 12, 13, 14], 16)],
        finished_req_ids: vec!["a".into()],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    assert_eq!(
        worker.connector.get_block_ids_with_load_errors(),
        vec![12, 13]
    );
    let mut lost = worker.connector.take_pool_events();
    lost.sort_by_key(|e| match e {
        PoolEvent::Removed { hash, .. } => hashes.iter().position(|h| h == hash),
        _ => None,
    });
    assert_eq!(
        lost,
        vec![
            PoolEvent::Removed {
                group: 0,
                hash: hashes[2]
            },
            PoolEvent::Removed {
                group: 0,
                hash: hashes[3]
            },
        ]
    );
    sched.request_finished("b", 5);

    // A reset that empties the pool.
    assert!(sched.reset_cache());
    assert_eq!(
        worker.connector.take_pool_events(),
        vec![PoolEvent::Cleared]
    );
}

#[test]
fn reset_clears_a_pool_of_this_instance() {
    let config = config(107);
    let backend = memory_backend(&config);
    let worker = Worker::new(&config, layout(1, 0, 2), backend);
    let sched = SchedulerConnector::new(&config, layout(1, 0, 2)).unwrap();
    let tokens: Vec<u32> = (300..317).collect(); // 4 full blocks
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", &tokens, vec![5, 1, 2, 3, 4], 0)],
        ..StepInput::default()
    });
    worker.run_step(&meta);
    sched.request_finished("a", 5);
    let done = worker.connector.get_finished(&["a".into()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (16, false)
    );
    sched.request_finished("b", 0);
    // The memory backend is this instance's alone: the default scope clears it.
    assert!(sched.reset_cache());
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", &tokens), 0),
        (0, false)
    );
    sched.request_finished("c", 0);
    assert_eq!(sched.tracked_requests(), 0);
}

#[test]
fn mamba_state_blocks_are_saved_at_step_ends_and_a_hit_ends_on_one() {
    let config = config(108);
    let backend = memory_backend(&config);
    let worker = two_group_worker(&config, mamba_layout(), backend.clone());
    let sched = SchedulerConnector::new(&config, mamba_layout()).unwrap();
    let tokens: Vec<u32> = (900..921).collect(); // 5 full blocks and 1 token
    for b in 1..=15 {
        worker.fill(b, 50 + b as u8);
    }

    // Chunked prefill: 8 tokens, then 12. Each step's end leaves the Mamba state in the block
    // ending there; only those blocks are saved for the state group.
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    let a_blocks = [vec![1, 2, 3, 4, 5, 6], vec![10, 11, 12, 13, 14, 15]];
    let mut first = hybrid_request("a", &tokens, a_blocks.clone(), 0);
    first.num_scheduled_tokens = 8;
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![first],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(plan["saves"][0]["block_ids"], serde_json::json!([1, 2]));
    assert_eq!(plan["saves"][1]["block_ids"], serde_json::json!([11]));
    assert_eq!(plan["saves"][1]["first_block"], 1);
    worker.run_step(&meta);
    let meta = sched.build_connector_meta(StepInput {
        cached_requests: vec![CachedRequest {
            req_id: "a".into(),
            num_computed_tokens: 8,
            num_scheduled_tokens: 12,
            ..CachedRequest::default()
        }],
        ..StepInput::default()
    });
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(plan["saves"][0]["block_ids"], serde_json::json!([3, 4, 5]));
    assert_eq!(plan["saves"][1]["block_ids"], serde_json::json!([14]));
    worker.run_step(&meta);
    assert!(sched.request_finished_all_groups("a", &a_blocks));
    let done = worker.connector.get_finished(&["a".into()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);

    // A hit of 20 tokens: every full-attention block, and only the state after token 20.
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (20, true)
    );
    let b_blocks = [vec![21, 22, 23, 24, 25], vec![0, 0, 0, 0, 27]];
    sched.update_state_after_alloc("b", b_blocks.to_vec(), 20);
    let meta = sched.build_connector_meta(StepInput::default());
    let plan: serde_json::Value = serde_json::from_slice(&meta).unwrap();
    assert_eq!(
        plan["loads"][0]["block_ids"],
        serde_json::json!([21, 22, 23, 24, 25, 27])
    );
    let done = worker.finish_async_load(&meta, "b");
    assert!(done.failed_recving.is_empty());
    for (i, b) in (21..=25).enumerate() {
        assert_eq!(worker.block(b), vec![51 + i as u8; PAGE], "full block {i}");
    }
    assert_eq!(
        worker.block(27),
        vec![64; PAGE],
        "the state after 20 tokens"
    );
    sched.update_connector_output(&[], &done.recving, &[], &[]);
    sched.request_finished_all_groups("b", &b_blocks);

    // Without the state at 20 tokens, the hit ends at the one saved at 8.
    let hashes = kvpool::hash::token_block_hashes(
        &tokens,
        std::num::NonZeroUsize::new(BLOCK).unwrap(),
        None,
        None,
    );
    let ns = kvpool::Namespace::current("/models/test-model", 0, 0, 0, 0, 1, "default").unwrap();
    let state_20 = kvpool::BlockKey::new(Arc::new(ns), hashes[4]);
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(backend.remove(&[state_20]))
        .unwrap();
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", &tokens), 0),
        (8, true)
    );
    sched.request_finished_all_groups("c", &[vec![], vec![]]);
    assert_eq!(sched.tracked_requests(), 0);
}

const LAYERS: usize = 3;

fn layerwise_config(port: u32) -> Config {
    rpc_dir();
    Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "lookup_rpc_port": port,
        "lookup_timeout_ms": 2000,
        "use_layerwise": true,
    }))
    .unwrap()
}

fn layerwise_layout() -> EngineLayout {
    EngineLayout {
        stage_layers: vec![LAYERS as u32],
        ..layout(1, 0, 2)
    }
}

/// A worker of `LAYERS` layers, one cache tensor each.
struct LayerWorker {
    connector: WorkerConnector,
    cache: Arc<MemRegion>,
}

impl LayerWorker {
    fn new(config: &Config, backend: Arc<dyn KvBackend>) -> LayerWorker {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let connector =
            WorkerConnector::with_backend(config, layerwise_layout(), backend, rt).unwrap();
        let cache = MemRegion::alloc(LAYERS * BLOCKS * PAGE);
        let tensors: Vec<TensorDesc> = (0..LAYERS)
            .map(|l| TensorDesc {
                layer: format!("model.layers.{l}.attn"),
                ptr: cache.as_ptr() as usize + l * BLOCKS * PAGE,
                shape: vec![BLOCKS, PAGE],
                strides: vec![PAGE as isize, 1],
                elem_size: 1,
                device: Device::Host,
            })
            .collect();
        // SAFETY: `cache` lives as long as the worker.
        unsafe { connector.register_kv_caches(&tensors, None) }.unwrap();
        LayerWorker { connector, cache }
    }

    fn offset(layer: usize, block: u32) -> usize {
        (layer * BLOCKS + block as usize) * PAGE
    }

    fn fill(&self, layer: usize, block: u32, byte: u8) {
        self.cache
            .write(Self::offset(layer, block), &[byte; PAGE])
            .unwrap();
    }

    fn block(&self, layer: usize, block: u32) -> Vec<u8> {
        self.cache.read(Self::offset(layer, block), PAGE).unwrap()
    }

    /// One step as vLLM's forward drives it: each layer's load waited for (unless in
    /// `skip_wait`), then its save handed over.
    fn run_step(&self, meta: &[u8], skip_wait: &[usize]) {
        let c = &self.connector;
        c.bind_connector_metadata(meta).unwrap();
        c.start_load_kv(StreamHandle(0)).unwrap();
        for l in 0..LAYERS {
            let name = format!("model.layers.{l}.attn");
            if !skip_wait.contains(&l) {
                c.wait_for_layer_load(&name, StreamHandle(0)).unwrap();
            }
            c.save_kv_layer(&name, StreamHandle(0)).unwrap();
        }
        c.wait_for_save(StreamHandle(0)).unwrap();
        c.clear_connector_metadata();
        let ids: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        assert!(c.wait_for_requests(&ids, Duration::from_secs(10)));
    }
}

/// The step plan of a request that vLLM scheduled with `hit` tokens from the pool into
/// `blocks`, in the step that also reports `finished` done.
fn load_plan(
    sched: &SchedulerConnector,
    id: &str,
    tokens: &[u32],
    blocks: Vec<u32>,
    hit: usize,
    finished: &str,
) -> Vec<u8> {
    sched.update_state_after_alloc(id, vec![blocks.clone()], hit);
    sched.build_connector_meta(StepInput {
        new_requests: vec![new_request(id, tokens, blocks, hit)],
        finished_req_ids: vec![finished.into()],
        ..StepInput::default()
    })
}

#[test]
fn layerwise_saves_one_object_per_layer_and_loads_each_layer_for_its_wait() {
    let config = layerwise_config(109);
    let backend = memory_backend(&config);
    let a = LayerWorker::new(&config, backend.clone());
    let sched = SchedulerConnector::new(&config, layerwise_layout()).unwrap();
    let tokens: Vec<u32> = (700..718).collect(); // 4 full blocks and 2 tokens
    let hashes = kvpool::hash::token_block_hashes(
        &tokens,
        std::num::NonZeroUsize::new(BLOCK).unwrap(),
        None,
        None,
    );
    sched.get_num_new_matched_tokens(&info("a", &tokens), 0);
    let ids = [5u32, 1, 2, 3, 4];
    for l in 0..LAYERS {
        for (i, &b) in ids.iter().enumerate() {
            a.fill(l, b, (10 * l + i) as u8);
        }
    }
    let meta = sched.build_connector_meta(StepInput {
        new_requests: vec![new_request("a", &tokens, ids.to_vec(), 0)],
        ..StepInput::default()
    });
    a.run_step(&meta, &[]);
    sched.request_finished("a", 5);
    let done = a.connector.get_finished(&["a".into()]);
    assert_eq!(done.sending, vec!["a".to_string()]);
    sched.update_connector_output(&done.sending, &[], &[], &[]);

    // One object per (block, layer), keyed with the layer and the pipeline stage.
    let ns = kvpool::Namespace::current("/models/test-model", 0, 0, 0, 0, 0, "default").unwrap();
    let key =
        |l: u32, i: usize| kvpool::BlockKey::new(Arc::new(ns.with_layer(l).unwrap()), hashes[i]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for l in 0..LAYERS as u32 {
        let keys: Vec<_> = (0..4).map(|i| key(l, i)).collect();
        assert_eq!(rt.block_on(backend.exists(&keys)).unwrap(), vec![true; 4]);
        let value = rt.block_on(backend.get_bytes(&key(l, 2))).unwrap().unwrap();
        assert_eq!(value.as_ref(), &[(10 * l + 2) as u8; PAGE][..]);
    }
    assert_eq!(
        key(1, 0).to_key_string(),
        format!(
            "test-model@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:0@cache_role:kv@\
             cache_family:default@layer_id:1@{}",
            hashes[0].to_hex()
        )
    );
    let whole = kvpool::BlockKey::new(Arc::new(ns.clone()), hashes[0]);
    assert_eq!(rt.block_on(backend.exists(&[whole])).unwrap(), vec![false]);

    // Another worker loads every layer of the 4 blocks into blocks 10..14.
    let b = LayerWorker::new(&layerwise_config(110), backend.clone());
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("b", &tokens), 0),
        (16, false),
        "layerwise loads are synchronous"
    );
    let meta = load_plan(&sched, "b", &tokens, vec![10, 11, 12, 13, 14], 16, "a");
    b.run_step(&meta, &[]);
    assert!(b.connector.get_block_ids_with_load_errors().is_empty());
    for l in 0..LAYERS {
        for i in 0..4u32 {
            assert_eq!(
                b.block(l, 10 + i),
                vec![(10 * l as u32 + i) as u8; PAGE],
                "layer {l} block {i}"
            );
        }
    }
    sched.request_finished("b", 5);

    // Layer 1 of block 2 is lost: exactly that block fails, whatever its other layers did.
    rt.block_on(backend.remove(&[key(1, 2)])).unwrap();
    assert_eq!(
        sched.get_num_new_matched_tokens(&info("c", &tokens), 0),
        (16, false),
        "the lookup checks the first and last layer"
    );
    let meta = load_plan(&sched, "c", &tokens, vec![20, 21, 22, 23, 24], 16, "b");
    b.run_step(&meta, &[]);
    assert_eq!(b.connector.get_block_ids_with_load_errors(), vec![22]);
    sched.request_finished("c", 5);

    // A forward that did not wait for layer 2 before using it: every loaded block fails.
    sched.get_num_new_matched_tokens(&info("a", &tokens[..12]), 0);
    let meta = load_plan(&sched, "a", &tokens[..12], vec![25, 26, 27], 11, "c");
    b.run_step(&meta, &[2]);
    assert_eq!(
        b.connector.get_block_ids_with_load_errors(),
        vec![25, 26, 27]
    );
    sched.request_finished("a", 3);
}

#[test]
fn layerwise_refuses_what_it_cannot_key() {
    let config = layerwise_config(111);
    let err = |layout: EngineLayout, config: &Config| {
        SchedulerConnector::new(config, layout)
            .unwrap_err()
            .to_string()
    };
    let no_layers = err(layout(1, 0, 2), &config);
    assert!(no_layers.contains("stage_layers"), "{no_layers}");
    let hybrid = EngineLayout {
        stage_layers: vec![2],
        ..hybrid_layout(8)
    };
    assert!(err(hybrid, &config).contains("hybrid"));
    let v018 = Config::from_extra_config(serde_json::json!({
        "backend": "memory", "lookup_rpc_port": 111, "use_layerwise": true, "key_format": "v0.18",
    }))
    .unwrap();
    assert!(err(layerwise_layout(), &v018).contains("key_format"));
    // A worker whose registered layers differ from its stage's count.
    let backend = memory_backend(&config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let two = EngineLayout {
        stage_layers: vec![2],
        ..layout(1, 0, 2)
    };
    let w = WorkerConnector::with_backend(&config, two, backend, rt).unwrap();
    let cache = MemRegion::alloc(BLOCKS * PAGE);
    let tensor = TensorDesc {
        layer: "only".into(),
        ptr: cache.as_ptr() as usize,
        shape: vec![BLOCKS, PAGE],
        strides: vec![PAGE as isize, 1],
        elem_size: 1,
        device: Device::Host,
    };
    // SAFETY: `cache` outlives the worker in this test.
    let e = unsafe { w.register_kv_caches(&[tensor], None) }.unwrap_err();
    assert!(e.to_string().contains("1 KV-cache layers"), "{e}");
}
