//! The scheduler-side lookup of a 1,000-block prompt: `get_num_new_matched_tokens` through the
//! lookup socket to worker rank 0, which checks every key with one batch `exists` on the memory
//! backend and applies the hit rules of every KV-cache group.
//!
//! Measured: a hybrid model (a full-attention group and a sliding-window group, 2,000 keys per
//! lookup) against the same prompt on a single-group model (1,000 keys), in the same run, with
//! vLLM's hashes (`hash_mode = "vllm"`, Ascend Store's) and with kvpool's own token hashes
//! (which hash the prompt's 16,000 tokens in the scheduler first). Every block is in the pool,
//! so every key is checked. Printed at the end: p50 and p99 of single lookups, and the hybrid
//! / single-group ratio; the target is a p99 of at most 200 µs for two groups.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use kvpool::{BlockHash, BlockKey, Config, KvBackendExt, Namespace};
use kvpool_benches::step;
use kvpool_connector::{
    EngineLayout, GroupKind, KvCacheGroup, RequestInfo, SchedulerConnector, WorkerConnector,
};

const BLOCKS: usize = 1000;
const SAMPLES: usize = 2000;

struct Rig {
    sched: SchedulerConnector,
    _worker: WorkerConnector,
    tokens: Vec<u32>,
    hashes: Vec<BlockHash>,
    next_req: u64,
    _rpc_dir: tempfile::TempDir,
}

fn layout(hybrid: bool) -> EngineLayout {
    let mut layout = step::layout("bench-model");
    if hybrid {
        layout.groups = vec![
            KvCacheGroup::full_attention(step::TOKENS),
            KvCacheGroup {
                kind: GroupKind::SlidingWindow {
                    sliding_window: 4096,
                },
                block_size: step::TOKENS,
            },
        ];
    }
    layout
}

impl Rig {
    fn new(hybrid: bool, hash_mode: &str, port: u32) -> Rig {
        let rpc_dir = tempfile::tempdir().unwrap();
        std::env::set_var("VLLM_RPC_BASE_PATH", rpc_dir.path());
        let config = Config::from_extra_config(serde_json::json!({
            "backend": "memory",
            "hash_mode": hash_mode,
            "lookup_rpc_port": port,
        }))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let backend = runtime.block_on(kvpool::open(&config)).unwrap();
        let tokens: Vec<u32> = (0..(BLOCKS * step::TOKENS) as u32).collect();
        let hashes = if hash_mode == "vllm" {
            (0..BLOCKS as u64)
                .map(|i| {
                    let mut h = [0u8; 32];
                    h[..8].copy_from_slice(&i.to_le_bytes());
                    BlockHash(h)
                })
                .collect()
        } else {
            let size = std::num::NonZeroUsize::new(step::TOKENS).unwrap();
            kvpool::hash::token_block_hashes(&tokens, size, None, None)
        };
        let groups = if hybrid { 2 } else { 1 };
        for g in 0..groups {
            let ns = Namespace::current("bench-model", 0, 0, 0, 0, g, "default").unwrap();
            let ns = Arc::new(ns);
            runtime.block_on(async {
                for h in &hashes {
                    let key = BlockKey::new(ns.clone(), *h);
                    backend.put_bytes(key, vec![1u8; 64].into()).await.unwrap();
                }
            });
        }
        let worker = WorkerConnector::with_backend(&config, layout(hybrid), backend, runtime);
        Rig {
            sched: SchedulerConnector::new(&config, layout(hybrid)).unwrap(),
            _worker: worker.unwrap(),
            tokens,
            hashes,
            next_req: 0,
            _rpc_dir: rpc_dir,
        }
    }

    /// One lookup of the whole prompt as a new request; the hit is checked.
    fn lookup(&mut self) -> Duration {
        self.next_req += 1;
        let id = format!("r{}", self.next_req);
        let info = RequestInfo {
            req_id: &id,
            prompt_token_ids: &self.tokens,
            block_hashes: &self.hashes,
            num_tokens: self.tokens.len() + 1,
            lora_name: None,
            cache_salt: None,
        };
        let start = Instant::now();
        let (hit, _) = self.sched.get_num_new_matched_tokens(&info, 0);
        let took = start.elapsed();
        assert_eq!(hit, self.tokens.len(), "every block is in the pool");
        self.sched.request_finished(&id, 0);
        took
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn bench(c: &mut Criterion) {
    let mut summary = Vec::new();
    let mut port = 9000;
    for hash_mode in ["vllm", "tokens"] {
        let mut p99 = [Duration::ZERO; 2];
        for (i, hybrid) in [false, true].into_iter().enumerate() {
            port += 1;
            let mut rig = Rig::new(hybrid, hash_mode, port);
            let name = format!(
                "lookup/{}/{}",
                if hybrid { "two-groups" } else { "one-group" },
                hash_mode
            );
            c.bench_function(&name, |b| b.iter(|| rig.lookup()));
            let mut samples: Vec<Duration> = (0..SAMPLES).map(|_| rig.lookup()).collect();
            let p50 = percentile(&mut samples, 0.50);
            p99[i] = percentile(&mut samples, 0.99);
            summary.push(format!("{name}: p50 {p50:?}, p99 {:?}", p99[i]));
        }
        summary.push(format!(
            "lookup/{hash_mode}: two groups / one group p99 = {:.2}x",
            p99[1].as_secs_f64() / p99[0].as_secs_f64()
        ));
    }
    for line in summary {
        println!("{line}");
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
