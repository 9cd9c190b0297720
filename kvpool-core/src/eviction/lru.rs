//! Least recently used.

use std::fmt::Debug;
use std::hash::Hash;

use hashlink::LinkedHashMap;

use super::EvictionPolicy;

/// Least recently used: evicts the key whose last access is oldest.
///
/// It ignores chain hints: within one request the root block is touched
/// first, so it is also the first of that request to go.
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
    fn chain_hints_do_not_change_lru_order() {
        let mut lru = Lru::new();
        lru.insert_after(1u64, 1, None);
        lru.insert_after(2u64, 1, Some(&1));
        assert_eq!(lru.pop_victim(), Some((1, 1)));
    }
}
