//! kvpool's `memory` backend: an in-process, capacity-bound block store.
//!
//! See `README.md` for its configuration and capabilities.

mod backend;
mod config;

pub use backend::MemoryBackend;
pub use config::MemoryConfig;

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "memory"` selects.
pub const SCHEME: &str = "memory";

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: MemoryConfig = config.section(SCHEME)?;
        let backend: Arc<dyn KvBackend> = Arc::new(MemoryBackend::new(cfg)?);
        Ok(backend)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "in-process memory, capacity-bound with watermark eviction",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}
