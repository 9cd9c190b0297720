//! Runs the shared conformance suite against real redis servers started here: a plain
//! server (built directly, and opened from config through the registry), one with
//! `requirepass`, one serving TLS only with a CA made at test time, and a 3-master
//! cluster. A missing `redis-server` fails the run.

use std::sync::Arc;

use kvpool_backend_redis::{RedisBackend, RedisConfig};
use kvpool_conformance::fixtures::redis::{RedisCluster, RedisOptions, RedisServer};
use kvpool_conformance::Subject;
use kvpool_core::{Config, KvBackend};

const PASSWORD: &str = "conformance-secret";

fn subject(name: &'static str, cfg: RedisConfig) -> Subject {
    Subject::new(name, None, move || {
        let cfg = cfg.clone();
        async move { Ok(Arc::new(RedisBackend::connect(cfg).await?) as Arc<dyn KvBackend>) }
    })
}

fn main() -> std::process::ExitCode {
    let plain = RedisServer::plain();
    let auth = RedisServer::start(RedisOptions {
        password: Some(PASSWORD.into()),
        ..RedisOptions::default()
    });
    let tls = RedisServer::start(RedisOptions {
        tls: true,
        ..RedisOptions::default()
    });
    let cluster = RedisCluster::start(3);
    let files = tls.tls_files().expect("TLS files").clone();

    let from_config = serde_json::json!({
        "backend": "redis",
        "redis": { "url": plain.url(), "key_prefix": "conformance-config:" },
    });
    let code = kvpool_conformance::run_all(&[
        subject(
            "redis",
            RedisConfig {
                url: Some(plain.url()),
                ..RedisConfig::default()
            },
        ),
        Subject::new("redis_opened_from_config", None, move || {
            let json = from_config.clone();
            async move { kvpool_core::open(&Config::from_extra_config(json)?).await }
        }),
        subject(
            "redis_auth",
            RedisConfig {
                url: Some(auth.url()),
                password: Some(PASSWORD.into()),
                ..RedisConfig::default()
            },
        ),
        subject(
            "redis_tls",
            RedisConfig {
                url: Some(tls.url()),
                tls_ca_file: Some(files.ca_cert),
                tls_cert_file: Some(files.client_cert),
                tls_key_file: Some(files.client_key),
                ..RedisConfig::default()
            },
        ),
        subject(
            "redis_cluster",
            RedisConfig {
                cluster_nodes: cluster.urls(),
                ..RedisConfig::default()
            },
        ),
    ]);
    // The servers outlive every case and are killed here.
    drop((plain, auth, tls, cluster));
    code
}
