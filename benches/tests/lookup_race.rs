//! The lookup-to-load race on every backend that evicts, before and after
//! [`KvBackend::exists_for_load`] (harness: `kvpool_conformance::race`).
//!
//! The full measurement (10,000 requests per run; prints a markdown table):
//!
//! ```text
//! cargo test --release -p kvpool-benches --test lookup_race -- --ignored --nocapture
//! ```
//!
//! `RACE_REQUESTS`, `RACE_INSTANCES`, `RACE_STEP_MS`, `RACE_HOLD_MS` and `RACE_BACKENDS`
//! (comma-separated: memory, tiered, redis, mooncake, mooncake-lease1s) change it. The short
//! form, `race_short`, runs in CI.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use kvpool::size::ByteSize;
use kvpool::KvBackend;
use kvpool_backend_memory::{MemoryBackend, MemoryConfig};
use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_backend_redis::{RedisBackend, RedisConfig};
use kvpool_backend_tiered::{TieredBackend, TieredConfig};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_conformance::fixtures::redis::{RedisOptions, RedisServer};
use kvpool_conformance::race::{self, RaceConfig, RaceReport};

/// Every store holds about 256 blocks of 8 KiB, against a working set of thousands: it
/// evicts all the time.
const POOL: u64 = 2 << 20;

/// The hold the connector's lookup asks for.
const HOLD: Duration = kvpool::backend::DEFAULT_LOAD_HOLD;

/// A backend under test with the servers it needs, all stopped on drop.
struct Opened {
    backends: Vec<Arc<dyn KvBackend>>,
    _servers: Vec<Box<dyn Any + Send>>,
}

impl Opened {
    async fn close(self) {
        for b in &self.backends {
            let _ = b.close().await;
        }
    }
}

async fn open(kind: &str) -> Opened {
    match kind {
        "memory" => {
            let b = MemoryBackend::new(MemoryConfig {
                capacity: ByteSize(POOL),
                ..MemoryConfig::default()
            })
            .expect("memory backend");
            Opened {
                backends: vec![Arc::new(b)],
                _servers: Vec::new(),
            }
        }
        // The usual stack, a small fast tier over a larger one, both evicting.
        "tiered" => {
            let tier = |bytes: u64| serde_json::json!({"backend": "memory", "memory": {"capacity": bytes}});
            let cfg: TieredConfig = serde_json::from_value(serde_json::json!({
                "tiers": [tier(POOL / 2), tier(POOL)]
            }))
            .expect("tiered config");
            let b = TieredBackend::open(cfg).await.expect("tiered backend");
            Opened {
                backends: vec![Arc::new(b)],
                _servers: Vec::new(),
            }
        }
        // redis counts its own ~1 MiB of baseline memory against maxmemory.
        "redis" => {
            let server = RedisServer::start(RedisOptions {
                maxmemory: Some((POOL + (3 << 19), "allkeys-lru".into())),
                ..RedisOptions::default()
            });
            let b = RedisBackend::connect(RedisConfig {
                url: Some(server.url()),
                ..RedisConfig::default()
            })
            .await
            .expect("redis backend");
            Opened {
                backends: vec![Arc::new(b)],
                _servers: vec![Box::new(server)],
            }
        }
        // Two instances, each contributing half the pool, reading each other's segments.
        "mooncake" | "mooncake-lease1s" => {
            let master = if kind == "mooncake" {
                MooncakeMaster::start()
            } else {
                MooncakeMaster::start_with(&["--default_kv_lease_ttl=1000"])
            };
            let mut backends: Vec<Arc<dyn KvBackend>> = Vec::new();
            for _ in 0..2 {
                let cfg = MooncakeConfig {
                    master_server_address: master.address(),
                    global_segment_size: ByteSize(POOL / 2),
                    local_hostname: "127.0.0.1".into(),
                    ..MooncakeConfig::default()
                };
                backends.push(Arc::new(
                    MooncakeBackend::open(cfg).await.expect("mooncake backend"),
                ));
            }
            Opened {
                backends,
                _servers: vec![Box::new(master)],
            }
        }
        other => panic!("unknown backend {other:?}"),
    }
}

/// One run on a fresh store.
async fn measure(kind: &str, cfg: &RaceConfig) -> RaceReport {
    let opened = open(kind).await;
    let model = format!("race-{:016x}", rand::random::<u64>());
    let report = race::run(&opened.backends, &model, cfg).await;
    opened.close().await;
    report
}

/// Before (`exists`), before with one retry of the failed loads, after (`exists_for_load`).
async fn compare(kind: &str, base: &RaceConfig, with_retry: bool) -> [(String, RaceReport); 3] {
    let before = measure(kind, base).await;
    println!("{}", before.row(&format!("{kind}: exists")));
    let retry = if with_retry {
        let r = measure(
            kind,
            &RaceConfig {
                retry: true,
                ..base.clone()
            },
        )
        .await;
        println!("{}", r.row(&format!("{kind}: exists + retry")));
        r
    } else {
        RaceReport::default()
    };
    let after = measure(
        kind,
        &RaceConfig {
            hold: if base.hold.is_zero() { HOLD } else { base.hold },
            ..base.clone()
        },
    )
    .await;
    println!("{}", after.row(&format!("{kind}: exists_for_load")));
    [
        (format!("{kind}: exists"), before),
        (format!("{kind}: exists + retry"), retry),
        (format!("{kind}: exists_for_load"), after),
    ]
}

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The measurement behind the README's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the full measurement, minutes long: --ignored --nocapture"]
async fn race_full() {
    let base = RaceConfig {
        requests: env("RACE_REQUESTS").unwrap_or(10_000),
        instances: env("RACE_INSTANCES").unwrap_or(8),
        step: Duration::from_millis(env("RACE_STEP_MS").unwrap_or(10)),
        hold: Duration::from_millis(env("RACE_HOLD_MS").unwrap_or(0)),
        ..RaceConfig::default()
    };
    let kinds: String =
        env("RACE_BACKENDS").unwrap_or_else(|| "memory,tiered,redis,mooncake".into());
    println!(
        "{} requests, {} instances, step {:?}, 8 KiB blocks, pool {} KiB\n{}",
        base.requests,
        base.instances,
        base.step,
        POOL >> 10,
        RaceReport::header()
    );
    let mut failures = Vec::new();
    for kind in kinds.split(',') {
        for (name, r) in compare(kind, &base, true).await {
            if r.wrong_bytes != 0 || r.incomplete != 0 {
                failures.push(format!("{name}: {r:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The short form: a few hundred requests per run. Wrong bytes and unfinished requests must
/// be 0 on every backend. Where the backend promises holds (`holds_for_load`: memory, tiered
/// of memory tiers, mooncake's lease) the held runs must fail no more loads than the plain
/// ones plus 1% of the blocks promised: a race that the hold closes shows up as a drop, while
/// the margin keeps a quiet run (few failures either way) from failing on noise. redis only
/// refreshes LRU positions, so its counts are printed, not compared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn race_short() {
    let base = RaceConfig {
        requests: 240,
        instances: 6,
        step: Duration::from_millis(5),
        ..RaceConfig::default()
    };
    println!("{}", RaceReport::header());
    for kind in ["memory", "tiered", "redis", "mooncake"] {
        let [(_, before), _, (_, after)] = compare(kind, &base, false).await;
        for r in [&before, &after] {
            assert_eq!(r.wrong_bytes, 0, "{kind}: {r:?}");
            assert_eq!(r.incomplete, 0, "{kind}: {r:?}");
            assert!(
                r.hits > 0,
                "{kind}: no lookup hit, nothing was measured: {r:?}"
            );
        }
        if kind != "redis" {
            assert!(
                after.failed_loads <= before.failed_loads + after.promised / 100,
                "{kind}: held lookups failed more loads than plain ones: {before:?} then {after:?}"
            );
        }
    }
}
