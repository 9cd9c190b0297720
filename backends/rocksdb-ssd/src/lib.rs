//! kvpool's `rocksdb-ssd` backend: a persistent, capacity-bound block store
//! on local disk, built on RocksDB with large values in blob files.
//!
//! Every value carries an xxh3 checksum over its key and bytes, checked on
//! every read; a value that fails is reported `Corrupted`, dropped, and never
//! returned as a hit. See `README.md` for configuration and tuning.

mod backend;
mod config;
mod record;

pub use backend::RocksDbSsdBackend;
pub use config::{RocksDbSsdConfig, MIN_CAPACITY};

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, Error, ErrorKind, KvBackend};

/// The scheme `"backend": "rocksdb-ssd"` selects (config table `rocksdb_ssd`).
pub const SCHEME: &str = "rocksdb-ssd";

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: RocksDbSsdConfig = config.section(SCHEME)?;
        // Opening reads the whole index: keep it off the async workers.
        let backend = tokio::task::spawn_blocking(move || RocksDbSsdBackend::open(cfg))
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::Unexpected,
                    format!("opening rocksdb-ssd failed: {e}"),
                )
                .with_operation("open")
            })??;
        let backend: Arc<dyn KvBackend> = Arc::new(backend);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "persistent SSD tier on RocksDB: blob files, checksummed values, watermark eviction",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}
