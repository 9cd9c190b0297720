use std::path::PathBuf;

use kvpool_core::eviction::Watermark;
use kvpool_core::size::ByteSize;
use kvpool_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// The `[rocksdb_ssd]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RocksDbSsdConfig {
    /// The database directory; created when missing. Required.
    pub path: PathBuf,
    /// Bytes the backend may hold: both the values' logical size and the
    /// bytes of every file in `path` stay under it.
    pub capacity: ByteSize,
    /// Eviction starts once usage passes this fraction of capacity.
    pub eviction_high_watermark_ratio: f64,
    /// One eviction pass frees this fraction of capacity.
    pub eviction_ratio: f64,
    /// The eviction policy: `chain` (default) or `lru`, as in the memory backend.
    pub policy: String,
    /// Write-ahead log. Without it a crash loses the writes not yet flushed
    /// (never more: what reads back is still whole and verified).
    pub wal: bool,
    /// fsync the WAL on every put batch: survives power loss, not only a
    /// process crash, at the cost of one device flush per batch.
    pub sync: bool,
    /// `none` (default: KV tensors barely compress), `lz4`, `zstd` or `snappy`.
    pub compression: String,
    /// RocksDB block cache for index and filter blocks and small values.
    /// Large values live in blob files and are read through the OS page cache.
    pub block_cache: ByteSize,
    /// Values of at least this many bytes go to blob files; smaller ones stay
    /// in the LSM tree.
    pub min_blob_size: ByteSize,
}

impl Default for RocksDbSsdConfig {
    fn default() -> Self {
        let w = Watermark::default();
        RocksDbSsdConfig {
            path: PathBuf::new(),
            capacity: ByteSize(64 << 30),
            eviction_high_watermark_ratio: w.high_watermark_ratio,
            eviction_ratio: w.eviction_ratio,
            policy: kvpool_core::eviction::DEFAULT_POLICY.to_string(),
            wal: true,
            sync: false,
            compression: "none".to_string(),
            block_cache: ByteSize(64 << 20),
            min_blob_size: ByteSize(4 << 10),
        }
    }
}

/// The smallest capacity: RocksDB's own files (WAL, manifest, info log, the
/// output of a flush) may take 6 MiB of a small tier.
pub const MIN_CAPACITY: u64 = 16 << 20;

impl RocksDbSsdConfig {
    /// The watermark these settings describe.
    pub fn watermark(&self) -> Watermark {
        Watermark {
            high_watermark_ratio: self.eviction_high_watermark_ratio,
            eviction_ratio: self.eviction_ratio,
        }
    }

    /// The compression setting as RocksDB's enum.
    pub(crate) fn compression_type(&self) -> Result<rocksdb::DBCompressionType> {
        use rocksdb::DBCompressionType as C;
        Ok(match self.compression.to_ascii_lowercase().as_str() {
            "none" => C::None,
            "lz4" => C::Lz4,
            "zstd" => C::Zstd,
            "snappy" => C::Snappy,
            other => {
                return Err(Error::config_invalid(format!(
                    "rocksdb_ssd.compression must be one of none, lz4, zstd, snappy; got {other:?}"
                ))
                .with_context("section", "rocksdb_ssd"))
            }
        })
    }

    /// Checks every field; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |msg: String| Err(Error::config_invalid(msg).with_context("section", "rocksdb_ssd"));
        if self.path.as_os_str().is_empty() {
            return bad("rocksdb_ssd.path must name the database directory".to_string());
        }
        if self.capacity.0 < MIN_CAPACITY {
            return bad(format!(
                "rocksdb_ssd.capacity must be at least {} (RocksDB's own files need room), got {}",
                ByteSize(MIN_CAPACITY),
                self.capacity
            ));
        }
        if self.min_blob_size.0 > (1 << 30) {
            return bad(format!(
                "rocksdb_ssd.min_blob_size must be at most 1GiB, got {}",
                self.min_blob_size
            ));
        }
        self.watermark()
            .validate()
            .map_err(|e| Error::config_invalid(format!("rocksdb_ssd.{}", e.message())))?;
        kvpool_core::eviction::policy_by_name::<u64>(&self.policy)
            .map_err(|e| Error::config_invalid(format!("rocksdb_ssd.policy: {}", e.message())))?;
        self.compression_type()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_path() -> RocksDbSsdConfig {
        RocksDbSsdConfig {
            path: "/tmp/x".into(),
            ..RocksDbSsdConfig::default()
        }
    }

    #[test]
    fn defaults_validate_once_a_path_is_set() {
        let err = RocksDbSsdConfig::default().validate().unwrap_err();
        assert!(err.to_string().contains("rocksdb_ssd.path"), "{err}");
        with_path().validate().unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                RocksDbSsdConfig {
                    capacity: ByteSize(0),
                    ..with_path()
                },
                "rocksdb_ssd.capacity",
            ),
            (
                RocksDbSsdConfig {
                    compression: "brotli".into(),
                    ..with_path()
                },
                "rocksdb_ssd.compression",
            ),
            (
                RocksDbSsdConfig {
                    policy: "fifo".into(),
                    ..with_path()
                },
                "rocksdb_ssd.policy",
            ),
            (
                RocksDbSsdConfig {
                    eviction_ratio: 0.0,
                    ..with_path()
                },
                "rocksdb_ssd.eviction_ratio",
            ),
        ];
        for (cfg, key) in cases {
            let err = cfg.validate().unwrap_err();
            assert_eq!(err.kind(), kvpool_core::ErrorKind::ConfigInvalid);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
    }
}
