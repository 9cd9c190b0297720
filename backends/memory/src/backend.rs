use std::alloc::{self, Layout};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvpool_core::buffer::copy_segments;
use kvpool_core::eviction::{ShardedIndex, Watermark};
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use parking_lot::Mutex;

use crate::config::MemoryConfig;
use crate::SCHEME;

/// Pre-faulted storage handed out in runs of fixed-size chunks.
///
/// A store that allocates per put cannot reach memcpy speed on these machines
/// (fresh pages fault at 2–3 GB/s against 7 GB/s for warm memory), so all
/// storage is allocated and touched once and recycled. Free space is kept as
/// coalesced extents and handed out best-fit, so a value is one contiguous
/// run whenever one is free — KV blocks of one deployment share a size, so an
/// evicted block's run fits the next block exactly — and long sequential
/// copies keep the hardware prefetchers busy.
struct Arena {
    base: NonNull<u8>,
    layout: Layout,
    chunk_size: usize,
    total_chunks: usize,
    free: Mutex<FreeExtents>,
}

// SAFETY: the arena is raw memory; every chunk is accessed either by the one
// writer that took it from the free extents or, once published in an
// immutable `Entry`, only read.
unsafe impl Send for Arena {}
// SAFETY: see `Send`.
unsafe impl Sync for Arena {}

/// A run of chunks: `(first chunk, chunk count)`.
type Extent = (u32, u32);

/// Free chunks as maximal extents, indexed by start (to coalesce) and by
/// length (to find the best fit).
#[derive(Default)]
struct FreeExtents {
    by_start: BTreeMap<u32, u32>,
    by_len: BTreeSet<(u32, u32)>,
    free: usize,
}

impl FreeExtents {
    fn add(&mut self, start: u32, len: u32) {
        self.by_start.insert(start, len);
        self.by_len.insert((len, start));
        self.free += len as usize;
    }

    fn take(&mut self, start: u32, len: u32) {
        self.by_start.remove(&start);
        self.by_len.remove(&(len, start));
        self.free -= len as usize;
    }

    /// Returns an extent, merging it with free neighbours.
    fn release(&mut self, (mut start, mut len): Extent) {
        if let Some((&prev, &prev_len)) = self.by_start.range(..start).next_back() {
            if prev + prev_len == start {
                self.take(prev, prev_len);
                start = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.by_start.get(&(start + len)) {
            self.take(start + len, next_len);
            len += next_len;
        }
        self.add(start, len);
    }

    /// `n` chunks as few extents: the smallest free extent that holds them
    /// all, else the largest extents until `n` are gathered.
    fn alloc(&mut self, n: u32) -> Option<Vec<Extent>> {
        if self.free < n as usize {
            return None;
        }
        if let Some(&(len, start)) = self.by_len.range((n, 0)..).next() {
            self.take(start, len);
            if len > n {
                self.add(start + n, len - n);
            }
            return Some(vec![(start, n)]);
        }
        let mut out = Vec::new();
        let mut need = n;
        while need > 0 {
            let &(len, start) = self.by_len.iter().next_back()?;
            self.take(start, len);
            let used = len.min(need);
            if len > used {
                self.add(start + used, len - used);
            }
            out.push((start, used));
            need -= used;
        }
        Some(out)
    }
}

impl Arena {
    fn new(capacity: usize, chunk_size: usize, prefault: bool) -> Result<Self> {
        let total_chunks = capacity / chunk_size;
        let bytes = total_chunks * chunk_size;
        // 2 MiB alignment lets the kernel back the arena with huge pages.
        let layout = Layout::from_size_align(bytes, 2 << 20).map_err(|e| {
            Error::config_invalid(format!("memory.capacity {bytes} B is not allocatable: {e}"))
        })?;
        // Not `alloc_zeroed`: for this alignment the system allocator would
        // memset the whole arena, and its contents never matter.
        // SAFETY: `bytes >= chunk_size >= 64`, so the layout is non-zero-sized.
        let ptr = unsafe { alloc::alloc(layout) };
        let base = NonNull::new(ptr).ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                format!("could not allocate memory.capacity = {bytes} bytes"),
            )
            .set_permanent()
        })?;
        // Huge pages cut TLB misses on long copies; where transparent huge
        // pages are off (or "never") this is a harmless no-op.
        // SAFETY: the range is the mapping we just allocated.
        unsafe { libc::madvise(base.as_ptr().cast(), bytes, libc::MADV_HUGEPAGE) };
        if prefault {
            for offset in (0..bytes).step_by(4096) {
                // SAFETY: in bounds; volatile so the write is not elided.
                unsafe { base.as_ptr().add(offset).write_volatile(0) };
            }
        }
        let mut free = FreeExtents::default();
        free.add(0, total_chunks as u32);
        Ok(Arena {
            base,
            layout,
            chunk_size,
            total_chunks,
            free: Mutex::new(free),
        })
    }

    fn try_alloc(&self, n: usize) -> Option<Vec<Extent>> {
        self.free.lock().alloc(n as u32)
    }

    fn release(&self, extents: &[Extent]) {
        let mut free = self.free.lock();
        for &e in extents {
            free.release(e);
        }
    }

    fn free_chunks(&self) -> usize {
        self.free.lock().free
    }

    fn chunk_ptr(&self, index: u32) -> *mut u8 {
        debug_assert!((index as usize) < self.total_chunks);
        // SAFETY: every chunk index handed out is below `total_chunks`.
        unsafe { self.base.as_ptr().add(index as usize * self.chunk_size) }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// One stored value: immutable once published; its extents go back to the
/// arena when the last reader drops it, so eviction never frees memory that a
/// `get_into` is still copying from.
struct Entry {
    arena: Arc<Arena>,
    extents: Vec<Extent>,
    len: usize,
}

impl Entry {
    fn segments(&self) -> impl Iterator<Item = (*mut u8, usize)> + '_ {
        let size = self.arena.chunk_size;
        let mut left = self.len;
        self.extents.iter().map(move |&(start, count)| {
            let n = left.min(count as usize * size);
            left -= n;
            (self.arena.chunk_ptr(start), n)
        })
    }

    fn chunks(&self) -> usize {
        self.extents.iter().map(|&(_, n)| n as usize).sum()
    }

    fn charged_bytes(&self) -> u64 {
        (self.chunks() * self.arena.chunk_size) as u64
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.arena.release(&self.extents);
    }
}

/// Values a lookup promised to a load ([`KvBackend::exists_for_load`]). A held value that
/// eviction takes from the index is still served from here until its load or its deadline,
/// and its chunks stay taken meanwhile: eviction never waits for a hold, so a pass always
/// makes progress. Held values outside the index may take a quarter of the capacity
/// ([`HELD_SHARE`]); past that, and whenever a put finds no other room, the holds that end
/// first are revoked (the oldest lookups, whose loads are the likeliest to be done).
#[derive(Default)]
struct Holds {
    map: HashMap<BlockKey, Hold>,
    /// Chunks of held values that eviction took from the index.
    evicted_chunks: usize,
    /// Expired holds are swept when the map grows past this, so the sweep costs O(1) a hold.
    sweep_at: usize,
}

/// The share of the capacity held values evicted from the index may take: without a bound,
/// holds of keys looked up and never loaded would crowd the index out of its own arena.
const HELD_SHARE: usize = 4;

struct Hold {
    entry: Arc<Entry>,
    until: Instant,
    /// Eviction took the key from the index; its chunks count in `evicted_chunks`.
    evicted: bool,
    /// Lookups that found the key and whose loads have not come: the first loads after
    /// them end the hold (keys are content-derived, so any load of the key is theirs).
    lookups: u32,
}

impl Holds {
    const MIN_SWEEP: usize = 1024;

    /// Holds `entry` under `key` until `until` (an earlier, longer hold is kept); returns
    /// entries to drop outside the lock.
    fn hold(&mut self, key: &BlockKey, entry: Arc<Entry>, until: Instant) -> Vec<Arc<Entry>> {
        let mut unlocked = Vec::new();
        match self.map.get_mut(key) {
            Some(h) => {
                h.until = h.until.max(until);
                h.lookups = h.lookups.saturating_add(1);
                // The entry found now (in the index) replaces one from before an eviction, or
                // a remove and re-put.
                if std::mem::take(&mut h.evicted) {
                    self.evicted_chunks -= h.entry.chunks();
                }
                unlocked.push(std::mem::replace(&mut h.entry, entry));
            }
            None => {
                self.map.insert(
                    key.clone(),
                    Hold {
                        entry,
                        until,
                        evicted: false,
                        lookups: 1,
                    },
                );
            }
        }
        if self.map.len() > self.sweep_at.max(Self::MIN_SWEEP) {
            let now = Instant::now();
            let mut freed = 0;
            self.map.retain(|_, h| {
                let keep = h.until > now;
                if !keep {
                    if h.evicted {
                        freed += h.entry.chunks();
                    }
                    unlocked.push(h.entry.clone());
                }
                keep
            });
            self.evicted_chunks -= freed;
            self.sweep_at = 2 * self.map.len();
        }
        unlocked
    }

    /// Takes `key`'s hold out, whatever its state.
    fn remove(&mut self, key: &BlockKey) -> Option<Arc<Entry>> {
        let h = self.map.remove(key)?;
        if h.evicted {
            self.evicted_chunks -= h.entry.chunks();
        }
        Some(h.entry)
    }

    /// Eviction took `key` from the index: a hold on it now keeps its chunks.
    fn evicted(&mut self, key: &BlockKey) {
        if let Some(h) = self.map.get_mut(key) {
            if !h.evicted {
                h.evicted = true;
                self.evicted_chunks += h.entry.chunks();
            }
        }
    }

    /// Revokes holds of evicted values, soonest-ending first, until `target` chunks are
    /// let go; returns their entries, to drop outside the lock.
    fn revoke(&mut self, target: usize) -> Vec<Arc<Entry>> {
        let mut evicted: Vec<(Instant, BlockKey)> = self
            .map
            .iter()
            .filter(|(_, h)| h.evicted)
            .map(|(k, h)| (h.until, k.clone()))
            .collect();
        evicted.sort_unstable_by_key(|(until, _)| *until);
        let mut freed = 0;
        let mut out = Vec::new();
        for (_, key) in evicted {
            if freed >= target {
                break;
            }
            if let Some(entry) = self.remove(&key) {
                freed += entry.chunks();
                out.push(entry);
            }
        }
        out
    }

    fn get(&self, key: &BlockKey) -> Option<Arc<Entry>> {
        self.map
            .get(key)
            .filter(|h| h.until > Instant::now())
            .map(|h| h.entry.clone())
    }

    /// A load of `key` came: one lookup's hold on it ends.
    fn loaded(&mut self, key: &BlockKey) -> Option<Arc<Entry>> {
        let h = self.map.get_mut(key)?;
        h.lookups = h.lookups.saturating_sub(1);
        if h.lookups == 0 || h.until <= Instant::now() {
            self.remove(key)
        } else {
            None
        }
    }
}

/// The in-process memory backend.
pub struct MemoryBackend {
    info: BackendInfo,
    arena: Arc<Arena>,
    index: ShardedIndex<Arc<Entry>>,
    holds: Mutex<Holds>,
    watermark: Watermark,
    closed: AtomicBool,
}

impl std::fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("info", &self.info)
            .field("used_bytes", &self.used_bytes())
            .finish_non_exhaustive()
    }
}

impl MemoryBackend {
    /// Builds the backend, allocating its whole capacity.
    pub fn new(cfg: MemoryConfig) -> Result<Self> {
        cfg.validate()?;
        let capacity = usize::try_from(cfg.capacity.0).map_err(|_| {
            Error::config_invalid(format!(
                "memory.capacity {} does not fit in memory",
                cfg.capacity
            ))
        })?;
        let chunk_size = cfg.chunk_size.0 as usize;
        let arena = Arc::new(Arena::new(capacity, chunk_size, cfg.prefault)?);
        // One policy per shard, sharing what they learn from the traffic.
        let index = ShardedIndex::new(&cfg.policy, cfg.shards)?;
        let bytes = arena.total_chunks * chunk_size;
        let info = BackendInfo {
            scheme: SCHEME,
            description: format!(
                "capacity {}, {} chunks of {}, {} shards, {} eviction at {:.0}% freeing {:.0}%",
                cfg.capacity,
                arena.total_chunks,
                cfg.chunk_size,
                cfg.shards,
                cfg.policy,
                cfg.eviction_high_watermark_ratio * 100.0,
                cfg.eviction_ratio * 100.0
            ),
            capabilities: Capabilities {
                shared: false,
                persistent: false,
                remove: true,
                requires_registration: false,
                capacity_bound: true,
                max_batch: None,
                max_value_size: Some(bytes),
                holds_for_load: true,
            },
        };
        Ok(MemoryBackend {
            info,
            arena,
            index,
            holds: Mutex::new(Holds::default()),
            watermark: cfg.watermark(),
            closed: AtomicBool::new(false),
        })
    }

    /// Bytes of capacity, in whole chunks.
    pub fn capacity_bytes(&self) -> u64 {
        (self.arena.total_chunks * self.arena.chunk_size) as u64
    }

    /// Bytes held by stored values (and by evicted values still being read).
    pub fn used_bytes(&self) -> u64 {
        ((self.arena.total_chunks - self.arena.free_chunks()) * self.arena.chunk_size) as u64
    }

    fn check_open(&self, op: &'static str) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::closed(SCHEME).with_operation(op))
        } else {
            Ok(())
        }
    }

    /// The entry of `key`; with `touch`, an access recorded with `ancestor`
    /// as the chain hint.
    fn lookup(
        &self,
        key: &BlockKey,
        touch: bool,
        ancestor: Option<&BlockKey>,
    ) -> Option<Arc<Entry>> {
        if touch {
            self.index.access(key, ancestor, Arc::clone)
        } else {
            self.index.peek(key, Arc::clone)
        }
    }

    /// Takes `n` chunks, evicting as Mooncake does: when free chunks run out,
    /// or once usage passes the high watermark, free `eviction_ratio` of
    /// capacity in one pass.
    fn allocate(&self, n: usize) -> Result<Vec<Extent>> {
        let total = self.arena.total_chunks;
        if n > total {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!(
                    "a value of {n} chunks cannot fit in a capacity of {total} chunks of {} bytes",
                    self.arena.chunk_size
                ),
            )
            .set_permanent());
        }
        let pass = chunks_for(
            self.watermark.bytes_to_free(self.capacity_bytes()),
            self.arena.chunk_size,
        );
        // Held values outside the index past their share go first, down to half of it so
        // that this runs once in many puts.
        let share = total / HELD_SHARE;
        let outside = self.holds.lock().evicted_chunks;
        if outside > share {
            self.revoke_evicted_holds(outside - share / 2);
        }
        for _ in 0..3 {
            if let Some(chunks) = self.arena.try_alloc(n) {
                let used = (total - self.arena.free_chunks()) * self.arena.chunk_size;
                if self
                    .watermark
                    .should_evict(used as u64, self.capacity_bytes())
                {
                    self.evict(pass);
                }
                return Ok(chunks);
            }
            if self.evict(pass.max(n)) == 0 {
                break;
            }
        }
        if let Some(chunks) = self.arena.try_alloc(n) {
            return Ok(chunks);
        }
        // What is left is held by lookups or being read: a hold never fails a put, so holds
        // of evicted values are revoked, those ending first first (their loads will miss and
        // recompute).
        if self.revoke_evicted_holds(pass.max(n)) > 0 {
            if let Some(chunks) = self.arena.try_alloc(n) {
                return Ok(chunks);
            }
            self.evict(pass.max(n));
        }
        self.arena.try_alloc(n).ok_or_else(|| {
            Error::new(
                ErrorKind::NoSpace,
                "the memory backend is full and nothing more can be evicted \
                 (values being read are freed when the reads finish)",
            )
        })
    }

    /// Revokes holds of evicted values, soonest-ending first, until `target` chunks are let
    /// go; returns how many holds it revoked.
    fn revoke_evicted_holds(&self, target: usize) -> usize {
        let revoked = self.holds.lock().revoke(target);
        if !revoked.is_empty() {
            tracing::debug!(
                holds = revoked.len(),
                "memory backend revoked lookup holds to make room"
            );
        }
        // Dropped outside the lock: their chunks return to the arena.
        revoked.len()
    }

    /// Evicts values until `target` chunks are released; returns the chunks released.
    fn evict(&self, target: usize) -> usize {
        self.index.evict(target as u64, |key, entry| {
            tracing::trace!(chunks = entry.chunks(), "memory backend evicted a value");
            self.holds.lock().evicted(&key);
            // Its chunks return to the arena once the last reader lets go.
            entry.chunks() as u64
        }) as usize
    }

    /// Stores one value; `ancestor` is the previous key of the same batch
    /// that lands in the same shard (see [`KvBackend::put`] below).
    fn put_one(&self, key: &BlockKey, iov: &IoVec, ancestor: Option<&BlockKey>) -> PutOutcome {
        if iov.is_empty() {
            return PutOutcome::Failed(
                Error::invalid_argument("a value must be at least 1 byte").with_context("key", key),
            );
        }
        // Cheap check first: a present key costs no allocation or copy.
        if self.index.contains(key) {
            return PutOutcome::Exists;
        }
        let extents = match self.allocate(chunks_for(iov.len() as u64, self.arena.chunk_size)) {
            Ok(e) => e,
            Err(e) => return PutOutcome::Failed(e.with_operation("put").with_context("key", key)),
        };
        let entry = Arc::new(Entry {
            arena: self.arena.clone(),
            extents,
            len: iov.len(),
        });
        let src = iov.chunks().map(|c| (c.as_ptr(), c.len()));
        // SAFETY: the chunks were just popped from the free list, so this
        // call owns them; the source slices are bounds-checked descriptors.
        let copied = unsafe { copy_segments(src, entry.segments()) };
        debug_assert_eq!(copied, iov.len());
        let charge = entry.charged_bytes();
        match self.index.insert_if_absent(key, charge, ancestor, entry) {
            Ok(()) => PutOutcome::Stored,
            // A concurrent writer won; ours is dropped and its chunks return.
            Err(_ours) => PutOutcome::Exists,
        }
    }
}

fn chunks_for(bytes: u64, chunk_size: usize) -> usize {
    bytes.div_ceil(chunk_size as u64) as usize
}

#[async_trait]
impl KvBackend for MemoryBackend {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.check_open("exists")?;
        Ok(keys.iter().map(|k| self.index.contains(k)).collect())
    }

    /// Each present key is touched (an access, so eviction reaches it last) and held: its
    /// entry is kept until the key's next load or the hold's deadline, and a load that finds
    /// the key evicted from the index is served from the hold. A put that finds no room
    /// otherwise revokes holds of evicted values, soonest-ending first, so holds never cost
    /// a put.
    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        self.check_open("exists_for_load")?;
        if hold.is_zero() {
            return self.exists(keys).await;
        }
        let until = Instant::now() + hold;
        let mut chain = self.index.chain();
        let found: Vec<Option<Arc<Entry>>> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                let ancestor = chain.next(i, key).map(|j| &keys[j]);
                self.lookup(key, true, ancestor)
            })
            .collect();
        let mut unlocked = Vec::new();
        {
            let mut holds = self.holds.lock();
            for (key, entry) in keys.iter().zip(&found) {
                if let Some(entry) = entry {
                    unlocked.extend(holds.hold(key, entry.clone(), until));
                }
            }
        }
        // Dropped outside the lock: chunks of evicted values return to the arena.
        drop(unlocked);
        Ok(found.iter().map(Option::is_some).collect())
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.check_open("value_lens")?;
        Ok(keys.iter().map(|k| self.index.peek(k, |e| e.len)).collect())
    }

    /// A batch from the connector is one request's missing blocks in prefix
    /// order, so each key is handed to its shard's policy with the previous
    /// key of the batch in that shard as its ancestor: the chain policy
    /// orders a request's blocks so its chain is evicted leaf first.
    /// Callers that batch unrelated keys lose nothing but that ordering.
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.check_open("put")?;
        let mut chain = self.index.chain();
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, (key, iov))| {
                let ancestor = chain.next(i, key).map(|j| &items[j].0);
                self.put_one(key, iov, ancestor)
            })
            .collect())
    }

    /// Like [`put`](Self::put), a batch is taken to be one request's chain
    /// in prefix order: each hit is recorded with the batch's previous key
    /// in the same shard as its ancestor.
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.check_open("get_into")?;
        // Most loads follow no hold: they skip the holds' lock.
        let held = !self.holds.lock().map.is_empty();
        let mut chain = self.index.chain();
        Ok(items
            .iter()
            .enumerate()
            .map(|(i, (key, dst))| {
                let ancestor = chain.next(i, key).map(|j| &items[j].0);
                let Some(entry) = self
                    .lookup(key, true, ancestor)
                    .or_else(|| self.holds.lock().get(key))
                else {
                    return GetOutcome::Miss;
                };
                if held {
                    let ended = self.holds.lock().loaded(key);
                    drop(ended);
                }
                if entry.len != dst.len() {
                    return GetOutcome::Failed(
                        Error::invalid_argument(format!(
                            "destination holds {} bytes but the stored value has {}",
                            dst.len(),
                            entry.len
                        ))
                        .with_operation("get_into")
                        .with_context("key", key),
                    );
                }
                let dst = dst.slices().iter().map(|s| (s.as_ptr(), s.len()));
                // SAFETY: the entry is immutable and kept alive by our Arc;
                // the destination is a bounds-checked descriptor of equal
                // length that the caller gave us exclusive use of.
                unsafe { copy_segments(entry.segments().map(|(p, n)| (p.cast_const(), n)), dst) };
                GetOutcome::Hit
            })
            .collect())
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.check_open("remove")?;
        for key in keys {
            // Dropped here, outside the shard's lock: its chunks return to the arena.
            drop(self.index.remove(key));
            let held = self.holds.lock().remove(key);
            drop(held);
        }
        Ok(())
    }

    /// The store is this process's own: both scopes empty it.
    async fn clear(&self, _scope: kvpool_core::ClearScope) -> Result<bool> {
        self.check_open("clear")?;
        self.index.clear();
        let held = std::mem::take(&mut *self.holds.lock());
        drop(held);
        Ok(true)
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.index.clear();
        let held = std::mem::take(&mut *self.holds.lock());
        drop(held);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_core::size::ByteSize;
    use kvpool_core::{BlockHash, MemRegion, Namespace};

    fn key(i: u32) -> BlockKey {
        let ns = Arc::new(Namespace::single_rank("m").unwrap());
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        h[31] = 1;
        BlockKey::new(ns, BlockHash(h))
    }

    fn small(capacity: u64, chunk: u64) -> MemoryBackend {
        MemoryBackend::new(MemoryConfig {
            capacity: ByteSize(capacity),
            chunk_size: ByteSize(chunk),
            shards: 4,
            ..MemoryConfig::default()
        })
        .unwrap()
    }

    #[tokio::test]
    async fn watermark_pass_frees_eviction_ratio_of_capacity() {
        // 100 chunks of 64 B; high watermark 90 chunks; a pass frees 5.
        let b = small(6400, 64);
        let src = MemRegion::from_vec(vec![7u8; 64]);
        for i in 0..90 {
            let out = b.put(vec![(key(i), IoVec::whole(&src))]).await.unwrap();
            assert!(matches!(out[0], PutOutcome::Stored));
        }
        assert_eq!(b.used_bytes(), 90 * 64);
        b.put(vec![(key(90), IoVec::whole(&src))]).await.unwrap();
        // 91 chunks passed the watermark: 5 were freed at once.
        assert_eq!(b.used_bytes(), 86 * 64);
        let present = b
            .exists(&(0..91).map(key).collect::<Vec<_>>())
            .await
            .unwrap();
        assert!(present[90], "the value just written survives its own pass");
        assert_eq!(present.iter().filter(|p| !**p).count(), 5);
    }

    #[tokio::test]
    async fn value_larger_than_capacity_is_no_space_and_permanent() {
        let b = small(6400, 64);
        let src = MemRegion::alloc(6401);
        let out = b.put(vec![(key(1), IoVec::whole(&src))]).await.unwrap();
        match &out[0] {
            PutOutcome::Failed(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace);
                assert!(!e.is_temporary());
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert_eq!(b.used_bytes(), 0);
    }

    #[tokio::test]
    async fn evicted_value_being_read_keeps_its_chunks_until_dropped() {
        let b = small(6400, 64);
        let src = MemRegion::from_vec(vec![3u8; 128]);
        b.put(vec![(key(1), IoVec::whole(&src))]).await.unwrap();
        let held = b.lookup(&key(1), false, None).unwrap();
        b.remove(&[key(1)]).await.unwrap();
        assert_eq!(b.used_bytes(), 128, "a reader still holds the chunks");
        drop(held);
        assert_eq!(b.used_bytes(), 0);
    }

    #[tokio::test]
    async fn a_hold_outlives_eviction_until_its_load_and_never_fails_a_put() {
        // 100 chunks of 64 B, one chunk a value.
        let b = small(6400, 64);
        let v = |i: u32| MemRegion::from_vec(vec![i as u8; 64]);
        let put = |i: u32| {
            let r = v(i);
            let b = &b;
            async move { b.put(vec![(key(i), IoVec::whole(&r))]).await.unwrap() }
        };
        put(0).await;
        let hold = Duration::from_secs(60);
        assert_eq!(
            b.exists_for_load(&[key(0), key(1)], hold).await.unwrap(),
            [true, false]
        );
        for i in 1..300 {
            assert!(put(i).await[0].is_present(), "put {i} beside a hold");
        }
        assert_eq!(
            b.exists(&[key(0)]).await.unwrap(),
            [false],
            "evicted from the index"
        );
        let dst = MemRegion::alloc(64);
        let out = b
            .get_into(vec![(key(0), IoVecMut::whole(&dst))])
            .await
            .unwrap();
        assert!(out[0].is_hit(), "the held value loads: {:?}", out[0]);
        assert_eq!(dst.read(0, 64).unwrap(), vec![0u8; 64]);
        // The load ended the hold: its chunk is free again, and a second load misses.
        assert!(b.holds.lock().map.is_empty());
        let out = b
            .get_into(vec![(key(0), IoVecMut::whole(&dst))])
            .await
            .unwrap();
        assert!(matches!(out[0], GetOutcome::Miss));

        // Everything present held, then three times the capacity written: the holds that end
        // first are revoked as puts need room, and no put fails.
        let present: Vec<BlockKey> = (0..300).map(key).collect();
        b.exists_for_load(&present, hold).await.unwrap();
        for i in 300..600 {
            assert!(
                put(i).await[0].is_present(),
                "put {i} with every value held"
            );
        }
        assert!(b.used_bytes() <= b.capacity_bytes());
    }

    #[test]
    fn free_extents_best_fit_coalesce_and_gather() {
        let mut f = FreeExtents::default();
        f.add(0, 100);
        let a = f.alloc(10).unwrap();
        let b = f.alloc(20).unwrap();
        let c = f.alloc(10).unwrap();
        assert_eq!(
            (a.clone(), b.clone(), c.clone()),
            (vec![(0, 10)], vec![(10, 20)], vec![(30, 10)])
        );
        // Freeing `a` and `c` leaves holes of 10 around `b`; a 10 fits a hole exactly.
        f.release(a[0]);
        f.release(c[0]);
        assert_eq!(f.alloc(10).unwrap(), vec![(0, 10)]);
        // Freeing `b` merges it with the hole after it and the tail: 20 + 10 + 60.
        f.release(b[0]);
        assert_eq!(f.by_start.get(&10), Some(&90));
        assert_eq!(f.free, 90);
        // Fragmented: take everything but two 5-chunk holes, then ask for 8.
        let mut f = FreeExtents::default();
        f.add(0, 30);
        let parts: Vec<_> = (0..6).map(|_| f.alloc(5).unwrap()[0]).collect();
        f.release(parts[1]);
        f.release(parts[4]);
        let got = f.alloc(8).unwrap();
        assert_eq!(got.iter().map(|e| e.1).sum::<u32>(), 8);
        assert_eq!(got.len(), 2);
        assert_eq!(f.free, 2);
        assert!(f.alloc(3).is_none());
    }

    #[test]
    fn invalid_config_names_the_key() {
        let err = MemoryBackend::new(MemoryConfig {
            shards: 0,
            ..MemoryConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("memory.shards"), "{err}");
        let err = MemoryBackend::new(MemoryConfig {
            eviction_ratio: 2.0,
            ..MemoryConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("memory.eviction_ratio"), "{err}");
    }
}
