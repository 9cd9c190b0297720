//! Eviction policies and Mooncake's watermark semantics.
//!
//! A policy only orders keys; it holds no values. Capacity-bound backends ask
//! it for victims when [`Watermark`] says usage is too high, and `kvpool
//! replay` drives the very same policy objects over a trace, so hit rates
//! measured offline are the ones the pool delivers.
//!
//! Two policies ship: [`Lru`] (`"lru"`) and [`ChainLru`] (`"chain"`, the
//! default), which knows that KV blocks come in prefix chains and that most
//! blocks are never read again.
//!
//! [`ShardedIndex`] is the key index capacity-bound backends keep: shards of
//! keys, each with its own policy instance, evicted round-robin.

use std::fmt::Debug;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

mod chain;
mod lru;
mod sharded;

pub use chain::ChainLru;
pub use lru::Lru;
pub use sharded::{BatchChain, Evictor, ShardedIndex};

/// Orders keys for eviction.
///
/// Implementations are not thread-safe on their own; a sharded backend keeps
/// one per shard behind the shard's lock.
///
/// Keys usually arrive in prefix chains: one request's blocks, root first,
/// each block's KV valid only after all of its ancestors. Callers that know
/// a chain say so through [`insert_after`](Self::insert_after) and
/// [`touch_after`](Self::touch_after); a policy that ignores the hint is
/// still correct.
pub trait EvictionPolicy<K>: Send + Debug {
    /// The policy's name, as `--policy` and the config spell it.
    fn name(&self) -> &'static str;
    /// Records a new key of `size` bytes. Inserting a key already present
    /// updates its size and counts as an access.
    fn insert(&mut self, key: K, size: u64);
    /// Records a new key that extends a request's chain: `ancestor` is a key
    /// of the same request that comes earlier in the chain and was handed to
    /// this policy just before (its parent, or the closest earlier key a
    /// sharded caller gives this policy instance); `None` when there is none.
    ///
    /// The default ignores the hint.
    fn insert_after(&mut self, key: K, size: u64, ancestor: Option<&K>) {
        let _ = ancestor;
        self.insert(key, size);
    }
    /// Records an access; returns whether the key was tracked.
    fn touch(&mut self, key: &K) -> bool;
    /// Records an access to a key of a request's chain, `ancestor` as in
    /// [`insert_after`](Self::insert_after); returns whether the key was
    /// tracked. The default ignores the hint.
    fn touch_after(&mut self, key: &K, ancestor: Option<&K>) -> bool {
        let _ = ancestor;
        self.touch(key)
    }
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

/// The names [`policy_by_name`] accepts.
pub const POLICIES: &[&str] = &["chain", "lru"];

/// The policy capacity-bound backends and `kvpool replay` use unless told
/// otherwise: [`ChainLru`].
pub const DEFAULT_POLICY: &str = "chain";

/// Builds a policy by name (case-insensitive); an unknown name errors and
/// lists the known ones.
pub fn policy_by_name<K>(name: &str) -> Result<Box<dyn EvictionPolicy<K>>>
where
    K: Hash + Eq + Clone + Send + Debug + 'static,
{
    match name.to_ascii_lowercase().as_str() {
        "lru" => Ok(Box::new(Lru::<K>::new())),
        "chain" => Ok(Box::new(ChainLru::<K>::new())),
        other => Err(Error::config_invalid(format!(
            "unknown eviction policy {other:?}; known policies: {}",
            POLICIES.join(", ")
        ))),
    }
}

/// Builds `n` instances of a policy for the shards of one store. Each orders
/// its own keys; what a policy learns from the traffic (the chain policy's
/// aging ratio) is shared, so a sharded store behaves like one policy.
pub fn sharded_policies_by_name<K>(name: &str, n: usize) -> Result<Vec<Box<dyn EvictionPolicy<K>>>>
where
    K: Hash + Eq + Clone + Send + Debug + 'static,
{
    match name.to_ascii_lowercase().as_str() {
        "chain" => Ok(ChainLru::<K>::sharded(n)
            .into_iter()
            .map(|p| Box::new(p) as Box<dyn EvictionPolicy<K>>)
            .collect()),
        _ => (0..n).map(|_| policy_by_name(name)).collect(),
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
        assert!(err.to_string().contains("chain"), "{err}");
        assert_eq!(policy_by_name::<u64>("LRU").unwrap().name(), "lru");
        assert_eq!(
            policy_by_name::<u64>(DEFAULT_POLICY).unwrap().name(),
            DEFAULT_POLICY
        );
        for name in POLICIES {
            assert_eq!(policy_by_name::<u64>(name).unwrap().name(), *name);
            let shards = sharded_policies_by_name::<u64>(name, 4).unwrap();
            assert_eq!(shards.len(), 4);
            assert!(shards.iter().all(|p| p.name() == *name));
        }
        assert!(sharded_policies_by_name::<u64>("fifo", 2).is_err());
    }
}
