//! Eviction policies and Mooncake's watermark semantics.
//!
//! A policy only orders keys; it holds no values. Capacity-bound backends ask
//! it for victims when [`Watermark`] says usage is too high, and `kvpool
//! replay` drives the very same policy objects over a trace, so hit rates
//! measured offline are the ones the pool delivers.

use std::fmt::Debug;
use std::hash::Hash;

use hashlink::LinkedHashMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Orders keys for eviction.
///
/// Implementations are not thread-safe on their own; a sharded backend keeps
/// one per shard behind the shard's lock.
pub trait EvictionPolicy<K>: Send + Debug {
    /// The policy's name, as `--policy` and the config spell it.
    fn name(&self) -> &'static str;
    /// Records a new key of `size` bytes. Inserting a key already present
    /// updates its size and counts as an access.
    fn insert(&mut self, key: K, size: u64);
    /// Records an access; returns whether the key was tracked.
    fn touch(&mut self, key: &K) -> bool;
    /// Forgets a key (removed or overwritten); returns whether it was tracked.
    fn remove(&mut self, key: &K) -> bool;
    /// Removes and returns the key to evict next, with its size.
    fn pop_victim(&mut self) -> Option<(K, u64)>;
    /// Number of tracked keys.
    fn len(&self) -> usize;
    /// Whether no key is tracked.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Least recently used.
#[derive(Debug)]
pub struct Lru<K: Hash + Eq> {
    order: LinkedHashMap<K, u64>,
}

impl<K: Hash + Eq> Default for Lru<K> {
    fn default() -> Self {
        Lru {
            order: LinkedHashMap::new(),
        }
    }
}

impl<K: Hash + Eq> Lru<K> {
    /// An empty LRU.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<K: Hash + Eq + Send + Debug> EvictionPolicy<K> for Lru<K> {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn insert(&mut self, key: K, size: u64) {
        // `insert` moves an existing entry to the back (most recent);
        // hashlink's `replace` would keep its old position.
        self.order.insert(key, size);
    }

    fn touch(&mut self, key: &K) -> bool {
        self.order.to_back(key).is_some()
    }

    fn remove(&mut self, key: &K) -> bool {
        self.order.remove(key).is_some()
    }

    fn pop_victim(&mut self) -> Option<(K, u64)> {
        self.order.pop_front()
    }

    fn len(&self) -> usize {
        self.order.len()
    }
}

/// The names [`policy_by_name`] accepts.
pub const POLICIES: &[&str] = &["lru"];

/// Builds a policy by name; an unknown name errors and lists the known ones.
pub fn policy_by_name<K>(name: &str) -> Result<Box<dyn EvictionPolicy<K>>>
where
    K: Hash + Eq + Send + Debug + 'static,
{
    match name.to_ascii_lowercase().as_str() {
        "lru" => Ok(Box::new(Lru::<K>::new())),
        other => Err(Error::config_invalid(format!(
            "unknown eviction policy {other:?}; known policies: {}",
            POLICIES.join(", ")
        ))),
    }
}

/// Mooncake's capacity semantics: once usage passes
/// `high_watermark_ratio × capacity`, evict `eviction_ratio × capacity` bytes
/// in one go (`mooncake_master --eviction_high_watermark_ratio --eviction_ratio`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Watermark {
    /// Usage ratio above which eviction starts. Default 0.90.
    #[serde(rename = "eviction_high_watermark_ratio")]
    pub high_watermark_ratio: f64,
    /// Fraction of capacity freed by one eviction pass. Default 0.05.
    pub eviction_ratio: f64,
}

impl Default for Watermark {
    fn default() -> Self {
        Watermark {
            high_watermark_ratio: 0.90,
            eviction_ratio: 0.05,
        }
    }
}

impl Watermark {
    /// Checks both ratios; the error names the offending key.
    pub fn validate(&self) -> Result<()> {
        if !(self.high_watermark_ratio > 0.0 && self.high_watermark_ratio <= 1.0) {
            return Err(Error::config_invalid(format!(
                "eviction_high_watermark_ratio must be in (0, 1], got {}",
                self.high_watermark_ratio
            )));
        }
        if !(self.eviction_ratio > 0.0 && self.eviction_ratio <= 1.0) {
            return Err(Error::config_invalid(format!(
                "eviction_ratio must be in (0, 1], got {}",
                self.eviction_ratio
            )));
        }
        Ok(())
    }

    /// The usage in bytes above which an eviction pass runs.
    pub fn high_bytes(&self, capacity: u64) -> u64 {
        (capacity as f64 * self.high_watermark_ratio) as u64
    }

    /// Whether `used` bytes of `capacity` call for an eviction pass.
    pub fn should_evict(&self, used: u64, capacity: u64) -> bool {
        used > self.high_bytes(capacity)
    }

    /// How many bytes one eviction pass frees (at least one byte, so a pass
    /// always makes progress).
    pub fn bytes_to_free(&self, capacity: u64) -> u64 {
        ((capacity as f64 * self.eviction_ratio) as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_evicts_least_recently_used_first() {
        let mut lru = Lru::new();
        lru.insert("a", 1);
        lru.insert("b", 2);
        lru.insert("c", 3);
        assert!(lru.touch(&"a"));
        assert_eq!(lru.pop_victim(), Some(("b", 2)));
        lru.insert("c", 4); // re-insert refreshes and resizes
        assert_eq!(lru.pop_victim(), Some(("a", 1)));
        assert_eq!(lru.pop_victim(), Some(("c", 4)));
        assert_eq!(lru.pop_victim(), None);
        assert!(!lru.touch(&"zz"));
    }

    #[test]
    fn remove_forgets_key() {
        let mut lru = Lru::new();
        lru.insert(1u64, 10);
        lru.insert(2u64, 10);
        assert!(lru.remove(&1));
        assert!(!lru.remove(&1));
        assert_eq!(lru.len(), 1);
        assert_eq!(lru.pop_victim(), Some((2, 10)));
    }

    #[test]
    fn watermark_matches_mooncake_defaults() {
        let w = Watermark::default();
        assert_eq!(w.high_bytes(1000), 900);
        assert!(!w.should_evict(900, 1000));
        assert!(w.should_evict(901, 1000));
        assert_eq!(w.bytes_to_free(1000), 50);
        assert_eq!(w.bytes_to_free(1), 1);
    }

    #[test]
    fn watermark_validation_names_the_key() {
        let w = Watermark {
            high_watermark_ratio: 1.5,
            eviction_ratio: 0.05,
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eviction_high_watermark_ratio"));
        let w = Watermark {
            high_watermark_ratio: 0.9,
            eviction_ratio: 0.0,
        };
        assert!(w
            .validate()
            .unwrap_err()
            .to_string()
            .contains("eviction_ratio"));
    }

    #[test]
    fn unknown_policy_lists_known_ones() {
        let err = policy_by_name::<u64>("fifo").unwrap_err();
        assert!(err.to_string().contains("lru"), "{err}");
        assert_eq!(policy_by_name::<u64>("LRU").unwrap().name(), "lru");
    }
}
