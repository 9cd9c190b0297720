//! The `tiered` section of the configuration.

use kvpool_core::size::ByteSize;
use serde::Deserialize;

fn default_queue() -> usize {
    1024
}

fn default_promote_bytes() -> ByteSize {
    ByteSize(256 << 20)
}

fn default_backoff_ms() -> u64 {
    100
}

fn default_max_backoff_ms() -> u64 {
    30_000
}

/// The `tiered` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TieredConfig {
    /// The tiers, fastest first; each is a whole backend configuration
    /// (`{"backend": "memory", "memory": {...}}`).
    #[serde(default)]
    pub tiers: Vec<serde_json::Value>,
    /// Writes waiting to flow down; a full queue makes writes go down synchronously.
    #[serde(default = "default_queue")]
    pub write_back_queue: usize,
    /// Copy hits from lower tiers into the tiers above.
    #[serde(default = "default_true")]
    pub promote: bool,
    /// Bytes of promotions in flight at most; more are skipped.
    #[serde(default = "default_promote_bytes")]
    pub promote_max_inflight: ByteSize,
    /// First backoff after a tier fails, doubled per consecutive failure.
    #[serde(default = "default_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// The longest backoff.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_true() -> bool {
    true
}
