//! The key index of a capacity-bound backend: shards of keys, each with its
//! own eviction policy, evicted round-robin; see [`ShardedIndex`].

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::{sharded_policies_by_name, EvictionPolicy};
use crate::error::{Error, Result};
use crate::key::BlockKey;

type KeyMap<V> = HashMap<BlockKey, V, foldhash::fast::RandomState>;

struct Shard<V> {
    map: KeyMap<V>,
    policy: Box<dyn EvictionPolicy<BlockKey>>,
}

/// The keys a capacity-bound backend holds, each with the backend's value
/// `V` (its stored entry, or what it needs to find the value), in shards
/// that each pair a map with one instance of the eviction policy.
///
/// A key's shard is its fingerprint modulo the shard count, so concurrent
/// callers mostly take different locks; each operation takes exactly one
/// shard lock and allocates nothing. Values leave the index by value
/// ([`remove`](Self::remove), [`evict`](Self::evict)) so that the caller
/// drops them after the lock is released: dropping one may free memory or
/// take other locks.
///
/// A batch taken as one request's chain reaches each shard's policy with
/// the previous key of the batch in the same shard as its ancestor; see
/// [`BatchChain`].
pub struct ShardedIndex<V> {
    shards: Box<[Mutex<Shard<V>>]>,
    // One evictor at a time: concurrent passes would each free a full
    // `eviction_ratio` and overshoot.
    evicting: Mutex<()>,
    cursor: AtomicUsize,
}

impl<V> fmt::Debug for ShardedIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedIndex")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// A shard's lock; a panic elsewhere cannot leave a shard half-updated (each
/// change is one map and one policy call), so a poisoned lock is used as is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V> ShardedIndex<V> {
    /// An empty index of `shards` shards, each with an instance of the
    /// policy named `policy`, sharing what they learn
    /// ([`sharded_policies_by_name`]).
    pub fn new(policy: &str, shards: usize) -> Result<Self> {
        if shards == 0 {
            return Err(Error::config_invalid(
                "a sharded index needs at least one shard",
            ));
        }
        Ok(Self::with_policies(sharded_policies_by_name(
            policy, shards,
        )?))
    }

    /// An empty index with one shard per policy instance.
    ///
    /// # Panics
    /// If `policies` is empty.
    pub fn with_policies(policies: Vec<Box<dyn EvictionPolicy<BlockKey>>>) -> Self {
        assert!(!policies.is_empty(), "a sharded index needs a shard");
        ShardedIndex {
            shards: policies
                .into_iter()
                .map(|policy| {
                    Mutex::new(Shard {
                        map: KeyMap::default(),
                        policy,
                    })
                })
                .collect(),
            evicting: Mutex::new(()),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// The shard `key` belongs to.
    pub fn shard_of(&self, key: &BlockKey) -> usize {
        (key.fingerprint() % self.shards.len() as u64) as usize
    }

    fn shard(&self, key: &BlockKey) -> MutexGuard<'_, Shard<V>> {
        lock(&self.shards[self.shard_of(key)])
    }

    /// The per-batch chain hints of a batch of keys; see [`BatchChain`].
    pub fn chain(&self) -> BatchChain {
        BatchChain {
            last: vec![None; self.shards.len()],
            shards: self.shards.len() as u64,
        }
    }

    /// Every key present now, shard by shard (keys added meanwhile may be missing).
    pub fn keys(&self) -> Vec<BlockKey> {
        let mut keys = Vec::new();
        for shard in self.shards.iter() {
            keys.extend(lock(shard).map.keys().cloned());
        }
        keys
    }

    /// Whether `key` is present. Not an access.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.shard(key).map.contains_key(key)
    }

    /// `f` of the value of `key`, if present. Not an access.
    pub fn peek<R>(&self, key: &BlockKey, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.shard(key).map.get(key).map(f)
    }

    /// `f` of the value of `key`, if present, recorded as an access with
    /// `ancestor` as the chain hint ([`EvictionPolicy::touch_after`]).
    pub fn access<R>(
        &self,
        key: &BlockKey,
        ancestor: Option<&BlockKey>,
        f: impl FnOnce(&V) -> R,
    ) -> Option<R> {
        let mut shard = self.shard(key);
        let found = shard.map.get(key).map(f);
        if found.is_some() {
            shard.policy.touch_after(key, ancestor);
        }
        found
    }

    /// Adds `key` with `value`, charged `charge` bytes to its policy and
    /// linked after `ancestor` ([`EvictionPolicy::insert_after`]), unless it
    /// is present: then the index is unchanged and `value` comes back, for
    /// the caller to drop outside the lock.
    pub fn insert_if_absent(
        &self,
        key: &BlockKey,
        charge: u64,
        ancestor: Option<&BlockKey>,
        value: V,
    ) -> std::result::Result<(), V> {
        let mut shard = self.shard(key);
        if shard.map.contains_key(key) {
            return Err(value);
        }
        shard.policy.insert_after(key.clone(), charge, ancestor);
        shard.map.insert(key.clone(), value);
        Ok(())
    }

    /// Takes `key` out of the index and its policy; returns its value.
    pub fn remove(&self, key: &BlockKey) -> Option<V> {
        let mut shard = self.shard(key);
        shard.policy.remove(key);
        shard.map.remove(key)
    }

    /// Empties every shard, each value dropped outside the shard's lock.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            let drained = {
                let mut shard = lock(shard);
                while shard.policy.pop_victim().is_some() {}
                std::mem::take(&mut shard.map)
            };
            drop(drained);
        }
    }

    /// Takes the eviction lock: one pass at a time. A caller that must
    /// finish a pass (delete the victims from storage) before the next may
    /// start keeps the [`Evictor`] until then.
    pub fn evictor(&self) -> Evictor<'_, V> {
        Evictor {
            index: self,
            _one: lock(&self.evicting),
        }
    }

    /// One eviction pass: [`Evictor::evict`] under a fresh [`evictor`](Self::evictor).
    pub fn evict(&self, target: u64, on_victim: impl FnMut(BlockKey, V) -> u64) -> u64 {
        self.evictor().evict(target, on_victim)
    }
}

/// The eviction lock of a [`ShardedIndex`], held for one pass.
pub struct Evictor<'a, V> {
    index: &'a ShardedIndex<V>,
    _one: MutexGuard<'a, ()>,
}

impl<V> fmt::Debug for Evictor<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Evictor")
            .field("index", self.index)
            .finish_non_exhaustive()
    }
}

impl<V> Evictor<'_, V> {
    /// Evicts until `target` is released: takes each shard's next victim in
    /// turn and hands it to `on_victim`, outside the shard's lock, which
    /// returns what evicting it released (bytes, chunks: the caller's unit).
    /// Stops early once every shard came up empty in a row; returns the
    /// amount released.
    pub fn evict(&mut self, target: u64, mut on_victim: impl FnMut(BlockKey, V) -> u64) -> u64 {
        let shards = &self.index.shards;
        let mut released = 0;
        let mut idle_round = 0;
        // Round-robin over shards approximates one global policy without a
        // global lock on the hot path; the cursor carries over between
        // passes so no shard is always asked first.
        while released < target && idle_round < shards.len() {
            let i = self.index.cursor.fetch_add(1, Ordering::Relaxed) % shards.len();
            let victim = {
                let mut shard = lock(&shards[i]);
                match shard.policy.pop_victim() {
                    Some((key, _)) => shard.map.remove(&key).map(|v| (key, v)),
                    None => None,
                }
            };
            match victim {
                Some((key, value)) => {
                    idle_round = 0;
                    released += on_victim(key, value);
                }
                None => idle_round += 1,
            }
        }
        released
    }
}

/// Chain hints for one batch taken as one request's chain in prefix order:
/// for each key, the index of the batch's previous key in the same shard,
/// the closest earlier key that shard's policy instance sees. Callers that
/// batch unrelated keys lose nothing but that ordering.
#[derive(Debug, Clone)]
pub struct BatchChain {
    last: Vec<Option<usize>>,
    shards: u64,
}

impl BatchChain {
    /// Records item `index` of the batch, with key `key`; returns the index
    /// of its ancestor, the previous item recorded in the same shard.
    pub fn next(&mut self, index: usize, key: &BlockKey) -> Option<usize> {
        let shard = (key.fingerprint() % self.shards) as usize;
        self.last[shard].replace(index)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::eviction::{Lru, POLICIES};
    use crate::key::{BlockHash, Namespace};

    fn key(i: u32) -> BlockKey {
        let ns = Arc::new(Namespace::single_rank("m").unwrap());
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        BlockKey::new(ns, BlockHash(h))
    }

    fn lru(shards: usize) -> ShardedIndex<u64> {
        ShardedIndex::with_policies(
            (0..shards)
                .map(|_| Box::new(Lru::new()) as Box<dyn EvictionPolicy<BlockKey>>)
                .collect(),
        )
    }

    /// Keys 0.. in shard `s` of `index`, in order.
    fn keys_in(index: &ShardedIndex<u64>, s: usize, n: usize) -> Vec<BlockKey> {
        (0..)
            .map(key)
            .filter(|k| index.shard_of(k) == s)
            .take(n)
            .collect()
    }

    #[test]
    fn keys_spread_by_fingerprint() {
        let index = lru(4);
        assert_eq!(index.shards(), 4);
        let mut seen = [0; 4];
        for i in 0..400 {
            let k = key(i);
            let s = index.shard_of(&k);
            assert_eq!(s, (k.fingerprint() % 4) as usize);
            seen[s] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn insert_peek_access_remove() {
        let index = lru(2);
        let (a, b) = (key(1), key(2));
        assert!(!index.contains(&a));
        assert_eq!(index.insert_if_absent(&a, 10, None, 100), Ok(()));
        assert_eq!(index.insert_if_absent(&a, 10, None, 999), Err(999));
        assert_eq!(index.insert_if_absent(&b, 20, Some(&a), 200), Ok(()));
        assert!(index.contains(&a));
        assert_eq!(index.peek(&a, |v| *v), Some(100));
        assert_eq!(index.access(&b, None, |v| *v + 1), Some(201));
        assert_eq!(index.access(&key(3), None, |v| *v), None);
        assert_eq!(index.remove(&a), Some(100));
        assert_eq!(index.remove(&a), None);
        assert!(!index.contains(&a));
        // Removed from the policy too: only `b` is left to evict.
        let mut evicted = Vec::new();
        let released = index.evict(u64::MAX, |k, v| {
            evicted.push((k, v));
            v
        });
        assert_eq!(evicted, [(b, 200)]);
        assert_eq!(released, 200);
    }

    #[test]
    fn eviction_goes_round_robin_in_policy_order_until_the_target() {
        let index = lru(2);
        let zero = keys_in(&index, 0, 3);
        let one = keys_in(&index, 1, 3);
        for (i, k) in zero.iter().chain(&one).enumerate() {
            index.insert_if_absent(k, 1, None, i as u64).unwrap();
        }
        // Accessed: the oldest key of shard 0 becomes its newest.
        assert_eq!(index.access(&zero[0], None, |v| *v), Some(0));
        let mut order = Vec::new();
        let released = index.evict(3, |k, _| {
            order.push(k);
            1
        });
        assert_eq!(released, 3);
        assert_eq!(order, [zero[1].clone(), one[0].clone(), zero[2].clone()]);
        // The cursor carries over: the next pass starts at shard 1.
        let mut order = Vec::new();
        index.evict(1, |k, _| {
            order.push(k);
            1
        });
        assert_eq!(order, [one[1].clone()]);
    }

    #[test]
    fn eviction_stops_when_every_shard_is_empty() {
        let index = lru(3);
        let only = keys_in(&index, 2, 2);
        for k in &only {
            index.insert_if_absent(k, 5, None, 5).unwrap();
        }
        let mut calls = 0;
        let released = index.evict(1_000, |_, v| {
            calls += 1;
            v
        });
        assert_eq!((released, calls), (10, 2));
        assert_eq!(index.evict(1, |_, v| v), 0);
    }

    #[test]
    fn an_evictor_holds_the_eviction_lock_for_its_pass() {
        let index = lru(1);
        index.insert_if_absent(&key(1), 1, None, 1).unwrap();
        let mut evictor = index.evictor();
        assert!(index.evicting.try_lock().is_err());
        assert_eq!(evictor.evict(1, |_, v| v), 1);
        drop(evictor);
        assert!(index.evicting.try_lock().is_ok());
    }

    #[test]
    fn clear_empties_maps_and_policies() {
        let index = lru(2);
        for i in 0..10 {
            index.insert_if_absent(&key(i), 1, None, 1).unwrap();
        }
        index.clear();
        assert!((0..10).all(|i| !index.contains(&key(i))));
        assert_eq!(index.evict(u64::MAX, |_, v| v), 0);
    }

    #[test]
    fn batch_chain_names_the_previous_key_in_the_same_shard() {
        let index = lru(2);
        let zero = keys_in(&index, 0, 2);
        let one = keys_in(&index, 1, 2);
        let batch = [&zero[0], &one[0], &zero[1], &one[1]];
        let mut chain = index.chain();
        let ancestors: Vec<_> = batch
            .iter()
            .enumerate()
            .map(|(i, k)| chain.next(i, k))
            .collect();
        assert_eq!(ancestors, [None, None, Some(0), Some(1)]);
    }

    #[test]
    fn chain_hints_reach_the_policy() {
        // The chain policy evicts a chain inserted in one run leaf first.
        let index = ShardedIndex::<u64>::new("chain", 1).unwrap();
        let keys: Vec<_> = (0..3).map(key).collect();
        let mut chain = index.chain();
        for (i, k) in keys.iter().enumerate() {
            let ancestor = chain.next(i, k).map(|j| &keys[j]);
            index.insert_if_absent(k, 1, ancestor, i as u64).unwrap();
        }
        let mut order = Vec::new();
        index.evict(3, |_, v| {
            order.push(v);
            1
        });
        assert_eq!(order, [2, 1, 0]);
    }

    #[test]
    fn built_by_policy_name() {
        for name in POLICIES {
            assert_eq!(ShardedIndex::<()>::new(name, 3).unwrap().shards(), 3);
        }
        assert!(ShardedIndex::<()>::new("fifo", 3).is_err());
        assert!(ShardedIndex::<()>::new("lru", 0).is_err());
    }
}
