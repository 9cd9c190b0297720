//! kvpool's `tiered` backend: an ordered stack of backends used as one (memory → rocksdb-ssd → mooncake, ...).
//!
//! - Reads search top-down, one batch call per tier for the keys still missing, and copy hits
//!   from lower tiers into the tiers above in the background (bounded by bytes in flight; a
//!   promotion that does not fit is skipped, never waited for).
//! - Writes land in the top tier and flow down to every lower tier through a bounded
//!   write-back queue; when the queue is full the write goes down synchronously instead of
//!   being dropped. The stack is inclusive: every lower tier receives every value, so an upper
//!   tier's eviction never discards the only copy — the value has been demoted ahead of time.
//! - A lower tier that fails is counted (`kvpool_errors_total{backend="tiered"}`), skipped for
//!   a backoff that doubles on each consecutive failure, and retried after it; reads the upper
//!   tiers can answer never fail because of it.
//!
//! ```toml
//! backend = "tiered"
//! [[tiered.tiers]]
//! backend = "memory"
//! memory = { capacity = "8GB" }
//! [[tiered.tiers]]
//! backend = "rocksdb-ssd"
//! rocksdb_ssd = { path = "/data/kvpool", capacity = "500GB" }
//! ```

mod backend;
mod config;

pub use backend::TieredBackend;
pub use config::TieredConfig;

use std::sync::Arc;

use kvpool_core::config::BackendSection;
use kvpool_core::registry::{BackendFactory, OpenFuture};
use kvpool_core::{Config, KvBackend};

/// The scheme `"backend": "tiered"` selects.
pub const SCHEME: &str = "tiered";

fn open(config: Config) -> OpenFuture {
    Box::pin(async move {
        let cfg: TieredConfig = config.section(SCHEME)?;
        Ok(Arc::new(TieredBackend::open(cfg).await?) as Arc<dyn KvBackend>)
    })
}

inventory::submit! {
    BackendFactory {
        scheme: SCHEME,
        description: "an ordered stack of other backends: read-through with promotion, write-back",
        open,
    }
}

inventory::submit! {
    BackendSection {
        scheme: SCHEME,
        extra_layers: None,
    }
}
