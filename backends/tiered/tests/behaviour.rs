//! `tiered` behaviour beyond the conformance suite: write-back, promotion (both seen in
//! metrics), and a dead lower tier under a healthy top tier.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvpool_backend_tiered::{TieredBackend, TieredConfig};
use kvpool_core::{BlockHash, BlockKey, Config, KvBackend, KvBackendExt, Namespace};
// The tiers are opened by name through the registry: these crates must be linked.
use kvpool_backend_memory as _;
use kvpool_backend_redis as _;
use kvpool_conformance::fixtures::redis::RedisServer;

fn key(i: u64) -> BlockKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[31] = 0x7e;
    BlockKey::new(
        Arc::new(Namespace::single_rank("tiered-test").unwrap()),
        BlockHash(h),
    )
}

fn value(i: u64) -> Bytes {
    Bytes::from(
        (0..4096u32)
            .map(|j| (j as u64 * 31 + i) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn counter(text: &str, op: &str, outcome: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.contains("backend=\"tiered\"")
                && l.contains(&format!("op=\"{op}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

async fn open_over_redis(url: &str, prefix: &str) -> TieredBackend {
    let cfg: TieredConfig = serde_json::from_value(serde_json::json!({
        "tiers": [
            {"backend": "memory", "memory": {"capacity": "64MiB"}},
            {"backend": "redis", "redis": {"url": url, "key_prefix": prefix,
                "connect_timeout_ms": 300, "request_timeout_ms": 500}},
        ],
        "retry_backoff_ms": 50,
    }))
    .unwrap();
    TieredBackend::open(cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_flow_down_and_lower_hits_are_promoted() {
    let redis = RedisServer::plain();
    let pool = open_over_redis(&redis.url(), "wb:").await;
    let before = kvpool_core::metrics::global().encode();
    for i in 0..8 {
        assert!(pool.put_bytes(key(i), value(i)).await.unwrap().is_present());
    }
    pool.flush().await;

    // The lower tier alone holds every value: a second stack over the same redis, with an
    // empty memory tier, reads them from below and promotes them.
    let second = open_over_redis(&redis.url(), "wb:").await;
    for i in 0..8 {
        assert_eq!(second.get_bytes(&key(i)).await.unwrap(), Some(value(i)));
    }
    let after = kvpool_core::metrics::global().encode();
    let written = counter(&after, "write_back", "tier1") - counter(&before, "write_back", "tier1");
    assert!(written >= 8.0, "write-back counted: {written}");
    let found =
        counter(&after, "promote", "found_below") - counter(&before, "promote", "found_below");
    assert!(found >= 8.0, "reads served from below counted: {found}");
    // Promotion runs in the background; it lands in tier 0.
    let mut promoted = 0.0;
    for _ in 0..100 {
        let now = kvpool_core::metrics::global().encode();
        promoted = counter(&now, "promote", "tier0") - counter(&before, "promote", "tier0");
        if promoted >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(promoted >= 8.0, "promotions counted: {promoted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lower_tier_does_not_stop_top_tier_hits() {
    let mut redis = RedisServer::plain();
    let pool = open_over_redis(&redis.url(), "dead:").await;
    for i in 0..4 {
        pool.put_bytes(key(100 + i), value(i)).await.unwrap();
    }
    pool.flush().await;
    redis.kill();
    let before = kvpool_core::metrics::global().encode();

    // Hits in memory are served; a key in neither tier is a miss, not an error.
    for i in 0..4 {
        assert_eq!(pool.get_bytes(&key(100 + i)).await.unwrap(), Some(value(i)));
    }
    let started = std::time::Instant::now();
    assert_eq!(pool.get_bytes(&key(999)).await.unwrap(), None);
    assert_eq!(
        pool.exists(&[key(100), key(999)]).await.unwrap(),
        vec![true, false]
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Writes still land in the top tier.
    assert!(pool
        .put_bytes(key(200), value(9))
        .await
        .unwrap()
        .is_present());
    assert_eq!(pool.get_bytes(&key(200)).await.unwrap(), Some(value(9)));
    let after = kvpool_core::metrics::global().encode();
    let errors: f64 = after
        .lines()
        .filter(|l| l.starts_with("kvpool_errors_total") && l.contains("backend=\"tiered\""))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum::<f64>()
        - before
            .lines()
            .filter(|l| l.starts_with("kvpool_errors_total") && l.contains("backend=\"tiered\""))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>();
    assert!(
        errors >= 1.0,
        "the dead tier's errors are counted: {errors}"
    );
}

#[tokio::test]
async fn bad_stacks_are_config_errors() {
    let one =
        serde_json::json!({"backend": "tiered", "tiered": {"tiers": [{"backend": "memory"}]}});
    let err = kvpool_core::open(&Config::from_extra_config(one).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("2 to 8 tiers"), "{err}");
    let typo = serde_json::json!({"backend": "tiered", "tiered": {"tiers": [
        {"backend": "memory"}, {"backend": "memory", "memory": {"capcity": "1GB"}}]}});
    let err = kvpool_core::open(&Config::from_extra_config(typo).unwrap())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("capcity") && err.to_string().contains("tier"),
        "{err}"
    );
}
