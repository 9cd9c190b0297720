//! kvpool's `redis` backend: a shared block store on a redis (or Valkey) server or a
//! Redis Cluster, over TCP, TLS or a unix socket, with AUTH.
//!
//! See `README.md` for its configuration and capabilities.

mod backend;
mod config;
mod conn;
mod resp;

pub use backend::{RedisBackend, MAX_VALUE_SIZE};
pub use config::{redact_url, RedisConfig, DEFAULT_URL};

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "redis"` selects; also the name of its config section.
pub const SCHEME: &str = "redis";

/// Bytes of kvpool's header stored before each value (magic, length, checksum).
pub const HEADER_LEN: usize = kvpool_core::frame::HEADER_LEN;

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: RedisConfig = config.section(SCHEME)?;
        let backend: Arc<dyn KvBackend> = Arc::new(RedisBackend::connect(cfg).await?);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "redis server or Redis Cluster (TCP, TLS, unix socket), shared between hosts",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}
