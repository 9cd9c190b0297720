//! `chain`: an LRU that knows about prefix chains and reuse; see [`ChainLru`].

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Debug};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use foldhash::fast::{FixedState, RandomState};

use super::EvictionPolicy;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;
/// List of blocks used once since admission.
const FRESH: usize = 0;
/// List of blocks used at least twice.
const REUSED: usize = 1;
/// `ratio` never favours fresh blocks over reused ones: a block that was
/// reused is at least as likely to be reused again.
const RATIO_MIN: f64 = 1.0;
/// Bounds how long a reused block may outlive fresh ones, so a workload that
/// changes phase can win the cache back within a few capacities of traffic.
const RATIO_MAX: f64 = 64.0;
/// Relative change of `ratio` per marginal ghost hit: small enough that noise
/// averages out over a capacity's worth of traffic, large enough to move the
/// ratio by orders of magnitude within a few.
const STEP: f64 = 0.01;
/// A ghost hit counts as marginal if the key was among the last
/// `len / WINDOW_DIV` keys evicted from its list.
const WINDOW_DIV: usize = 16;

#[derive(Debug)]
struct Slot<K> {
    key: Option<K>,
    size: u64,
    /// Clock value of the last access; non-decreasing from a list's oldest end.
    stamp: u64,
    older: u32,
    newer: u32,
    list: u8,
}

#[derive(Debug, Clone, Copy)]
struct Ends {
    oldest: u32,
    newest: u32,
    len: usize,
}

const EMPTY: Ends = Ends {
    oldest: NIL,
    newest: NIL,
    len: 0,
};

/// Fingerprints of recently evicted keys, one FIFO per list.
#[derive(Debug, Default)]
struct Ghosts {
    /// fingerprint → (list, eviction sequence number within that list)
    seen: HashMap<u64, (u8, u64), FixedState>,
    /// Eviction order; may hold entries already taken out of `seen` (those
    /// are skipped when they reach the front).
    order: [VecDeque<(u64, u64)>; 2],
}

impl Ghosts {
    fn add(&mut self, list: usize, fp: u64, seq: u64, bound: usize) {
        self.seen.insert(fp, (list as u8, seq));
        let order = &mut self.order[list];
        order.push_back((fp, seq));
        while order.len() > bound {
            let Some((old, old_seq)) = order.pop_front() else {
                break;
            };
            if self.seen.get(&old) == Some(&(list as u8, old_seq)) {
                self.seen.remove(&old);
            }
        }
    }

    fn take(&mut self, fp: u64) -> Option<(usize, u64)> {
        self.seen
            .remove(&fp)
            .map(|(list, seq)| (list as usize, seq))
    }
}

/// An LRU that knows about prefix chains and reuse (policy `"chain"`).
///
/// Why LRU wastes a KV pool: most blocks are read once and never again (on
/// Mooncake's conversation trace 76% of blocks are), yet LRU keeps every new
/// block exactly as long as a block that has already proved useful. And a
/// block is worth something only while all of its ancestors are cached.
///
/// It keeps two recency lists:
///
/// - *fresh*: blocks used once since they were admitted;
/// - *reused*: blocks touched again, or re-admitted soon after their eviction
///   (a "ghost" hit: the second use of a block is what admits it for good).
///
/// Eviction compares the oldest block of each list by age, letting reused
/// blocks grow `ratio` times older than fresh ones. With `ratio = 1` this is
/// exactly LRU, so the policy cannot be tuned into a corner LRU would avoid:
/// `ratio` moves on evidence. Evicted keys leave a fingerprint in a ghost
/// queue of their list; a re-admission whose fingerprint was among the most
/// recently evicted 1/16 of that list means the list's tail was still
/// useful, so `ratio` shifts 1% in its favour. Both lists thus end up with
/// tails of equal marginal value — the classic condition for the best split
/// of one cache between two streams — whatever the workload's mix of one-off
/// prompts, multi-turn chats and shared prefixes.
///
/// Chains: the blocks of one request's chain — hits and new blocks alike,
/// named through [`EvictionPolicy::touch_after`] and
/// [`EvictionPolicy::insert_after`] — share one stamp, each just *older* than
/// its ancestor, and fresh blocks age no slower than reused ones
/// (`ratio ≥ 1`). So a chain is trimmed from its leaf, and its prefix, which
/// every continuation needs, survives longest; plain LRU does the opposite,
/// since a request touches its root first.
///
/// Shards: a sharded store keeps one instance per shard
/// ([`ChainLru::sharded`]); they order their own keys but learn one shared
/// `ratio`, since hashed keys give every shard the same mix of traffic and
/// each shard alone would see a fraction of the evidence.
///
/// Every operation is O(1) amortized: hash lookups, linked-list splices in a
/// slab, and ghost queues bounded by the number of cached keys.
///
/// Holds up to 2³² − 1 keys.
pub struct ChainLru<K> {
    index: HashMap<K, u32, RandomState>,
    slots: Vec<Slot<K>>,
    free: Vec<u32>,
    lists: [Ends; 2],
    clock: u64,
    /// `ratio` as f64 bits, shared by the shards of one store.
    ratio: Arc<AtomicU64>,
    /// Keys evicted so far from each list: the ghosts' sequence numbers.
    evicted: [u64; 2],
    ghosts: Ghosts,
    fingerprints: FixedState,
}

impl<K> Debug for ChainLru<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainLru")
            .field("fresh", &self.lists[FRESH].len)
            .field("reused", &self.lists[REUSED].len)
            .field("ratio", &f64::from_bits(self.ratio.load(Ordering::Relaxed)))
            .field("ghosts", &self.ghosts.seen.len())
            .finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> Default for ChainLru<K> {
    fn default() -> Self {
        ChainLru {
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            lists: [EMPTY; 2],
            clock: 0,
            ratio: Arc::new(AtomicU64::new(RATIO_MIN.to_bits())),
            evicted: [0; 2],
            ghosts: Ghosts::default(),
            fingerprints: FixedState::with_seed(0x6b76_706f_6f6c_0001),
        }
    }
}

impl<K: Hash + Eq + Clone> ChainLru<K> {
    /// An empty policy; it starts as plain LRU (`ratio = 1`).
    pub fn new() -> Self {
        Self::default()
    }

    /// `n` instances for the shards of one store: each orders its own keys,
    /// all share one learned `ratio`.
    pub fn sharded(n: usize) -> Vec<Self> {
        let first = Self::new();
        let ratio = first.ratio.clone();
        std::iter::once(first)
            .chain((1..n).map(|_| ChainLru {
                ratio: ratio.clone(),
                ..Self::new()
            }))
            .take(n)
            .collect()
    }

    /// How many times older than the oldest fresh block the oldest reused
    /// block may grow before it is evicted first (1 = LRU).
    pub fn ratio(&self) -> f64 {
        f64::from_bits(self.ratio.load(Ordering::Relaxed))
    }

    /// Keys used once since admission, and keys used again.
    pub fn list_lens(&self) -> (usize, usize) {
        (self.lists[FRESH].len, self.lists[REUSED].len)
    }

    fn fingerprint(&self, key: &K) -> u64 {
        self.fingerprints.hash_one(key)
    }

    fn alloc(&mut self, key: K, size: u64, stamp: u64, list: usize) -> u32 {
        let slot = Slot {
            key: Some(key),
            size,
            stamp,
            older: NIL,
            newer: NIL,
            list: list as u8,
        };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = slot;
                i
            }
            None => {
                let i = u32::try_from(self.slots.len())
                    .ok()
                    .filter(|&i| i != NIL)
                    .expect("the chain policy holds at most 2^32 - 1 keys");
                self.slots.push(slot);
                i
            }
        }
    }

    fn push_newest(&mut self, list: usize, i: u32) {
        let newest = self.lists[list].newest;
        let slot = &mut self.slots[i as usize];
        slot.older = newest;
        slot.newer = NIL;
        slot.list = list as u8;
        match newest {
            NIL => self.lists[list].oldest = i,
            n => self.slots[n as usize].newer = i,
        }
        self.lists[list].newest = i;
        self.lists[list].len += 1;
    }

    /// Links `i` just older than `anchor`, in `anchor`'s list.
    fn insert_older_than(&mut self, anchor: u32, i: u32) {
        let list = self.slots[anchor as usize].list as usize;
        let older = self.slots[anchor as usize].older;
        let slot = &mut self.slots[i as usize];
        slot.older = older;
        slot.newer = anchor;
        slot.list = list as u8;
        match older {
            NIL => self.lists[list].oldest = i,
            o => self.slots[o as usize].newer = i,
        }
        self.slots[anchor as usize].older = i;
        self.lists[list].len += 1;
    }

    fn unlink(&mut self, i: u32) {
        let Slot {
            older, newer, list, ..
        } = self.slots[i as usize];
        let list = list as usize;
        match older {
            NIL => self.lists[list].oldest = newer,
            o => self.slots[o as usize].newer = newer,
        }
        match newer {
            NIL => self.lists[list].newest = older,
            n => self.slots[n as usize].older = older,
        }
        self.lists[list].len -= 1;
    }

    fn take_slot(&mut self, i: u32) -> (K, u64) {
        self.unlink(i);
        self.free.push(i);
        let slot = &mut self.slots[i as usize];
        let key = slot.key.take().expect("a linked slot holds a key");
        (key, slot.size)
    }

    /// The slot of `ancestor` if it is the key this policy handled last, in
    /// the same run of one request's chain (its stamp is the clock).
    fn run_anchor(&self, ancestor: Option<&K>) -> Option<u32> {
        ancestor
            .and_then(|a| self.index.get(a).copied())
            .filter(|&a| self.clock > 0 && self.slots[a as usize].stamp == self.clock)
    }

    /// Links the unlinked slot `i` into `list`. A key that continues a run
    /// shares its ancestor's stamp and goes just older than the ancestor
    /// when both are in one list, so a chain leaves leaf first; any other
    /// access starts a run with a new stamp.
    fn place(&mut self, i: u32, list: usize, anchor: Option<u32>) {
        match anchor {
            Some(a) => {
                self.slots[i as usize].stamp = self.clock;
                if self.slots[a as usize].list as usize == list {
                    self.insert_older_than(a, i);
                } else {
                    self.push_newest(list, i);
                }
            }
            None => {
                self.clock += 1;
                self.slots[i as usize].stamp = self.clock;
                self.push_newest(list, i);
            }
        }
    }

    /// A second use: the key moves to the reused list.
    fn promote(&mut self, i: u32, anchor: Option<u32>) {
        self.unlink(i);
        self.place(i, REUSED, anchor);
    }

    /// A key evicted from `list` as its `seq`-th victim came back.
    fn adapt(&mut self, list: usize, seq: u64) {
        let window = (self.index.len() / WINDOW_DIV).max(1) as u64;
        if self.evicted[list] - seq > window {
            // Not marginal: a slightly longer life would not have saved it.
            return;
        }
        let factor = if list == FRESH {
            1.0 - STEP
        } else {
            1.0 + STEP
        };
        // Shards update concurrently: a lost step would only be noise, but
        // the compare-exchange loop is as cheap and keeps replays exact.
        let _ = self
            .ratio
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let r = (f64::from_bits(bits) * factor).clamp(RATIO_MIN, RATIO_MAX);
                Some(r.to_bits())
            });
    }

    fn victim_list(&self) -> Option<usize> {
        match (self.lists[FRESH].oldest, self.lists[REUSED].oldest) {
            (NIL, NIL) => None,
            (_, NIL) => Some(FRESH),
            (NIL, _) => Some(REUSED),
            (f, r) => {
                let fresh_age = (self.clock - self.slots[f as usize].stamp) as f64;
                let reused_age = (self.clock - self.slots[r as usize].stamp) as f64;
                Some(if fresh_age * self.ratio() >= reused_age {
                    FRESH
                } else {
                    REUSED
                })
            }
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Debug> EvictionPolicy<K> for ChainLru<K> {
    fn name(&self) -> &'static str {
        "chain"
    }

    fn insert(&mut self, key: K, size: u64) {
        self.insert_after(key, size, None);
    }

    fn insert_after(&mut self, key: K, size: u64, ancestor: Option<&K>) {
        let anchor = self.run_anchor(ancestor);
        if let Some(&i) = self.index.get(&key) {
            self.slots[i as usize].size = size;
            self.promote(i, anchor);
            return;
        }
        // A second use soon after an eviction admits the key as reused.
        let list = match self.ghosts.take(self.fingerprint(&key)) {
            Some((list, seq)) => {
                self.adapt(list, seq);
                REUSED
            }
            None => FRESH,
        };
        let i = self.alloc(key.clone(), size, self.clock, list);
        self.index.insert(key, i);
        self.place(i, list, anchor);
    }

    fn touch(&mut self, key: &K) -> bool {
        self.touch_after(key, None)
    }

    fn touch_after(&mut self, key: &K, ancestor: Option<&K>) -> bool {
        let anchor = self.run_anchor(ancestor);
        match self.index.get(key) {
            Some(&i) => {
                self.promote(i, anchor);
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, key: &K) -> bool {
        match self.index.remove(key) {
            Some(i) => {
                self.take_slot(i);
                true
            }
            None => false,
        }
    }

    fn pop_victim(&mut self) -> Option<(K, u64)> {
        let list = self.victim_list()?;
        let i = self.lists[list].oldest;
        let (key, size) = self.take_slot(i);
        self.index.remove(&key);
        let fp = self.fingerprint(&key);
        let seq = self.evicted[list];
        self.evicted[list] += 1;
        // Each ghost queue remembers as many keys as are cached: enough to
        // recognise a second use one capacity later.
        let bound = self.index.len().max(1);
        self.ghosts.add(list, fp, seq, bound);
        Some((key, size))
    }

    fn len(&self) -> usize {
        self.index.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(p: &mut ChainLru<u64>) -> Vec<u64> {
        std::iter::from_fn(|| p.pop_victim().map(|(k, _)| k)).collect()
    }

    #[test]
    fn starts_as_lru() {
        let mut p = ChainLru::new();
        for k in 1..=4u64 {
            p.insert(k, k);
        }
        assert!(p.touch(&1));
        assert!(!p.touch(&99));
        assert_eq!(p.pop_victim(), Some((2, 2)));
        assert_eq!(p.len(), 3);
        assert_eq!(drain(&mut p), vec![3, 4, 1]);
        assert!(p.is_empty());
        assert_eq!(p.pop_victim(), None);
    }

    #[test]
    fn reinsert_counts_as_an_access_and_resizes() {
        let mut p = ChainLru::new();
        p.insert(1u64, 10);
        p.insert(2u64, 10);
        p.insert(1u64, 30);
        assert_eq!(p.pop_victim(), Some((2, 10)));
        assert_eq!(p.pop_victim(), Some((1, 30)));
    }

    #[test]
    fn remove_forgets_without_a_ghost() {
        let mut p = ChainLru::new();
        p.insert(1u64, 1);
        p.insert(2u64, 1);
        assert!(p.remove(&1));
        assert!(!p.remove(&1));
        assert_eq!(p.len(), 1);
        p.insert(1u64, 1);
        // Not re-admitted as reused: a removal is no eviction.
        assert_eq!(p.list_lens(), (2, 0));
        assert_eq!(drain(&mut p), vec![2, 1]);
    }

    #[test]
    fn a_chain_is_trimmed_from_its_leaf() {
        let mut p = ChainLru::new();
        p.insert(100u64, 1);
        p.insert_after(1u64, 1, Some(&100));
        p.insert_after(2, 1, Some(&1));
        p.insert_after(3, 1, Some(&2));
        // 100 was admitted fresh just before, so 1, 2, 3 join its run
        // leaf-first: the chain loses its deepest block first.
        assert_eq!(drain(&mut p), vec![3, 2, 1, 100]);

        // An ancestor touched (reused) starts no leaf-first run; an ancestor
        // from an older run is no anchor either.
        let mut p = ChainLru::new();
        p.insert(10u64, 1);
        p.insert(20u64, 1);
        p.insert_after(11, 1, Some(&10));
        assert_eq!(drain(&mut p), vec![10, 20, 11]);
    }

    #[test]
    fn a_request_chain_leaves_leaf_first_across_both_lists() {
        let mut p = ChainLru::new();
        p.insert(1u64, 1);
        p.insert_after(2, 1, Some(&1));
        p.insert(50, 1);
        // A request hits 1, 2 and appends 3, 4: all four share a stamp.
        p.touch(&1);
        p.touch_after(&2, Some(&1));
        p.insert_after(3, 1, Some(&2));
        p.insert_after(4, 1, Some(&3));
        assert_eq!(p.list_lens(), (3, 2));
        assert_eq!(drain(&mut p), vec![50, 4, 3, 2, 1]);
    }

    #[test]
    fn second_use_outlives_first_use_once_reuse_pays() {
        let mut p = ChainLru::<u64>::new();
        // Fill with 100 keys, then evict 50 from the fresh list...
        for k in 0..100 {
            p.insert(k, 1);
        }
        let gone: Vec<_> = (0..50).map(|_| p.pop_victim().unwrap().0).collect();
        assert_eq!(gone, (0..50).collect::<Vec<_>>());
        // ...and bring the most recently evicted back: marginal ghost hits
        // of the fresh list pull the ratio down, but never below LRU's 1.
        for k in 45..50 {
            p.insert(k, 1);
        }
        assert_eq!(p.ratio(), 1.0);
        assert_eq!(p.list_lens(), (50, 5));
        // Evictions from the reused list whose keys come straight back make
        // reused blocks worth keeping longer.
        for round in 0..20 {
            let victim = loop {
                let (k, _) = p.pop_victim().unwrap();
                if (45..50).contains(&k) {
                    break k;
                }
                p.insert(1000 + round * 100 + k, 1);
            };
            p.insert(victim, 1);
        }
        assert!(p.ratio() > 1.0, "{}", p.ratio());
    }

    #[test]
    fn shards_share_what_they_learn() {
        let mut shards = ChainLru::<u64>::sharded(3);
        assert_eq!(shards.len(), 3);
        let [a, b, _] = &mut shards[..] else {
            unreachable!()
        };
        // Shard `a` learns that reused blocks come back...
        for k in 0..32 {
            a.insert(k, 1);
            a.touch(&k);
        }
        for _ in 0..10 {
            let (k, _) = a.pop_victim().unwrap();
            a.insert(k, 1);
        }
        assert!(a.ratio() > 1.0);
        // ...and shard `b`, holding other keys, ages by the same ratio.
        assert_eq!(b.ratio(), a.ratio());
        b.insert(100, 1);
        assert_eq!(b.len(), 1);
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn ghosts_stay_bounded_by_the_cached_keys() {
        let mut p = ChainLru::<u64>::new();
        for k in 0..10_000 {
            p.insert(k, 1);
            if p.len() > 100 {
                p.pop_victim();
            }
        }
        assert_eq!(p.len(), 100);
        assert!(p.ghosts.seen.len() <= 200, "{}", p.ghosts.seen.len());
        assert!(p.ghosts.order.iter().all(|q| q.len() <= 101));
        assert!(p.slots.len() <= 101);
    }

    #[test]
    fn ratio_stays_in_bounds_under_any_sequence() {
        let mut p = ChainLru::<u64>::new();
        let mut x = 1u64;
        for _ in 0..50_000 {
            // xorshift: a reproducible mix of inserts, touches, evictions.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % 500;
            match x % 4 {
                0 => {
                    p.touch(&k);
                }
                1 if p.len() > 50 => {
                    p.pop_victim();
                }
                2 => {
                    p.remove(&k);
                }
                _ => p.insert_after(k, 1, Some(&(k / 2))),
            }
            assert!((RATIO_MIN..=RATIO_MAX).contains(&p.ratio()));
        }
        let (fresh, reused) = p.list_lens();
        assert_eq!(fresh + reused, p.len());
        let n = p.len();
        assert_eq!(drain(&mut p).len(), n);
    }
}
