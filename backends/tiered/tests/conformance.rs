//! The conformance suite on `tiered` stacks of real backends: memory → rocksdb-ssd, and
//! memory → redis (a real redis-server started here), each opened from config through the
//! registry as users open it.

use kvpool_core::Config;
// The tiers are opened by name through the registry: these crates must be linked.
use kvpool_backend_memory as _;
use kvpool_backend_redis as _;
use kvpool_backend_rocksdb_ssd as _;
use kvpool_backend_tiered as _;
use kvpool_conformance::fixtures::redis::RedisServer;
use kvpool_conformance::Subject;

fn main() -> std::process::ExitCode {
    let redis = RedisServer::plain();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let root = dir.path().to_path_buf();
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let redis_url = redis.url();
    let code = kvpool_conformance::run_all(&[
        Subject::new("tiered_memory_rocksdb", None, move || {
            // A fresh database per case: cases assume an empty backend.
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = root.join(format!("db{n}"));
            async move {
                let json = serde_json::json!({
                    "backend": "tiered",
                    "tiered": {"tiers": [
                        {"backend": "memory", "memory": {"capacity": "256MiB"}},
                        {"backend": "rocksdb-ssd", "rocksdb_ssd": {
                            "path": path, "capacity": "1GiB"}},
                    ]},
                });
                kvpool_core::open(&Config::from_extra_config(json)?).await
            }
        }),
        Subject::new("tiered_memory_redis", None, move || {
            let url = redis_url.clone();
            async move {
                let prefix = format!("tiered-{}:", rand_suffix());
                let json = serde_json::json!({
                    "backend": "tiered",
                    "tiered": {"tiers": [
                        {"backend": "memory", "memory": {"capacity": "256MiB"}},
                        {"backend": "redis", "redis": {"url": url, "key_prefix": prefix}},
                    ]},
                });
                kvpool_core::open(&Config::from_extra_config(json)?).await
            }
        }),
    ]);
    drop(redis);
    code
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
