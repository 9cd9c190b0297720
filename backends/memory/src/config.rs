use kvpool_core::eviction::Watermark;
use kvpool_core::size::ByteSize;
use kvpool_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The `[memory]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of storage, allocated (and pre-faulted) when the backend opens.
    pub capacity: ByteSize,
    /// Storage is handed out in chunks of this size; a value takes
    /// `ceil(len / chunk_size)` chunks, so capacity is counted in whole chunks.
    pub chunk_size: ByteSize,
    /// Independent index shards; more shards let concurrent callers scale.
    pub shards: usize,
    /// Eviction starts once usage passes this fraction of capacity.
    pub eviction_high_watermark_ratio: f64,
    /// One eviction pass frees this fraction of capacity.
    pub eviction_ratio: f64,
    /// The eviction policy: `chain` (default; see
    /// [`kvpool_core::eviction::ChainLru`]) or `lru`.
    pub policy: String,
    /// Touch every page at open so the first puts do not pay page faults.
    pub prefault: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        let w = Watermark::default();
        MemoryConfig {
            capacity: ByteSize(1 << 30),
            chunk_size: ByteSize(4 << 10),
            shards: 16,
            eviction_high_watermark_ratio: w.high_watermark_ratio,
            eviction_ratio: w.eviction_ratio,
            policy: kvpool_core::eviction::DEFAULT_POLICY.to_string(),
            prefault: true,
        }
    }
}

impl MemoryConfig {
    /// The watermark these settings describe.
    pub fn watermark(&self) -> Watermark {
        Watermark {
            high_watermark_ratio: self.eviction_high_watermark_ratio,
            eviction_ratio: self.eviction_ratio,
        }
    }

    /// Checks every field; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config_invalid(msg).with_context("section", "memory"));
        if self.chunk_size.0 < 64 || self.chunk_size.0 > (64 << 20) {
            return bad(format!(
                "memory.chunk_size must be between 64 B and 64 MiB, got {}",
                self.chunk_size
            ));
        }
        if self.capacity.0 < self.chunk_size.0 {
            return bad(format!(
                "memory.capacity ({}) must hold at least one chunk of memory.chunk_size ({})",
                self.capacity, self.chunk_size
            ));
        }
        if self.capacity.0 / self.chunk_size.0 > u32::MAX as u64 {
            return bad(format!(
                "memory.capacity ({}) / memory.chunk_size ({}) exceeds 2^32 chunks; raise chunk_size",
                self.capacity, self.chunk_size
            ));
        }
        if self.shards == 0 || self.shards > 4096 {
            return bad(format!(
                "memory.shards must be between 1 and 4096, got {}",
                self.shards
            ));
        }
        self.watermark()
            .validate()
            .map_err(|e| Error::config_invalid(format!("memory.{}", e.message())))?;
        kvpool_core::eviction::policy_by_name::<u64>(&self.policy)
            .map_err(|e| Error::config_invalid(format!("memory.policy: {}", e.message())))?;
        Ok(())
    }
}
