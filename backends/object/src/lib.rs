//! kvpool's `object` backend: a shared, persistent block store on object storage
//! (S3 and S3-compatible servers, Google Cloud Storage, Azure Blob Storage) or a local
//! directory, through the `object_store` crate.
//!
//! Every value carries the redis backend's checksummed header, verified on every read: an
//! object that fails is reported `Corrupted`, never returned as a hit. See `README.md` for
//! its configuration and capabilities.

mod backend;
mod config;
mod store;

pub use backend::{ObjectBackend, MAX_VALUE_SIZE};
pub use config::{redact_url, ObjectConfig, PutMode};

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "object"` selects; also the name of its config section.
pub const SCHEME: &str = "object";

/// Bytes of kvpool's header stored before each value (magic, length, checksum).
pub const HEADER_LEN: usize = kvpool_core::frame::HEADER_LEN;

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: ObjectConfig = config.section(SCHEME)?;
        let backend: Arc<dyn KvBackend> = Arc::new(ObjectBackend::open(cfg).await?);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "object storage: S3 and S3-compatible servers, GCS, Azure Blob Storage, a local directory",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}
