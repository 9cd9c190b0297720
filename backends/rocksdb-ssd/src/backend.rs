//! The backend: its state, opening it, and the data path of the
//! [`KvBackend`] calls.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvpool_core::batch::{check_value_len, Outcomes, Repeats};
use kvpool_core::eviction::{ShardedIndex, Watermark};
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use parking_lot::{Mutex, RwLock};
use rocksdb::{ColumnFamilyDescriptor, FlushOptions, WriteBatch, WriteOptions, DB};

use crate::config::RocksDbSsdConfig;
use crate::record::{self, BatchRep};
use crate::SCHEME;

// Parts of this backend (backend/*.rs), children of this module so they
// reach its private state.
mod db;
mod space;

use db::{
    cf, close_db, db_error, directory_bytes, join_error, prepare_directory, reserved_bytes,
    rocksdb_options, write_buffer_for,
};
use space::{charge_of, DiskEstimate, Meta};

/// The one column family. Values and index records share it, so one flush
/// always persists both (two families would need atomic flush, whose 7.8
/// implementation trips its own assertions when manual and automatic
/// flushes meet).
const CF: &str = "default";
/// Value records: `v` + key string → checksummed payload.
const VALUE_PREFIX: u8 = b'v';
/// Index records: `i` + key string → length and insertion stamp. Small and
/// contiguous, so open scans them instead of the values in blob files.
const INDEX_PREFIX: u8 = b'i';
/// Index shards; more let concurrent callers scale.
const SHARDS: usize = 16;
/// The largest value: a value sits whole in the memtable and the WAL before
/// it reaches a blob file, so values far past the block sizes kvpool stores
/// (16 KiB – 16 MiB) would only stall writers.
const MAX_VALUE: u64 = 256 << 20;
/// The most value bytes one multi-get returns (see `get_batch`).
const MULTI_GET_BYTES: usize = 1 << 20;
/// Write batch buffers kept for reuse: one per concurrent put is enough.
const REP_BUFFERS: usize = 4;
/// Larger buffers are freed rather than kept.
const REP_BUFFER_MAX: usize = 64 << 20;

/// The persistent SSD backend.
pub struct RocksDbSsdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    info: BackendInfo,
    path: PathBuf,
    /// `None` once closed. Operations clone the `Arc`, so `close` can wait
    /// for the last one to finish before RocksDB's lock is released.
    db: RwLock<Option<Arc<DB>>>,
    closed: AtomicBool,
    index: ShardedIndex<Meta>,
    /// The bytes values may take: the configured capacity less what
    /// RocksDB's own files may need ([`reserved_bytes`]).
    capacity: u64,
    /// The configured capacity: the most the directory may hold.
    disk_capacity: u64,
    /// Headroom kept under `disk_capacity` for files RocksDB is writing.
    transient: u64,
    watermark: Watermark,
    /// Logical bytes: the sum of the stored keys' charges plus reservations
    /// of puts in flight.
    used: AtomicU64,
    stamp: AtomicU64,
    wal: bool,
    sync: bool,
    disk: Mutex<DiskEstimate>,
    /// Re-measure the directory after this many bytes were written (or
    /// after `DISK_REFRESH`).
    disk_refresh_bytes: u64,
    reclaiming: Mutex<()>,
    /// Wakes the background reclaimer: evicted values' garbage is collected before puts
    /// would have to wait for it.
    reclaim_requests: std::sync::mpsc::SyncSender<()>,
    corrupted: AtomicU64,
    /// Value reads skip RocksDB's own checksums: every value carries an
    /// xxh3 over key and bytes that is checked anyway, and the crc32c that
    /// RocksDB verifies runs at 1.4 GB/s in Debian's portable build (xxh3:
    /// 19 GB/s), most of the cost of reading a blob from the page cache.
    read_options: rocksdb::ReadOptions,
    /// Write batch buffers of earlier puts, for reuse (see `BatchRep::reusing`).
    rep_buffers: Mutex<Vec<Vec<u8>>>,
}

impl std::fmt::Debug for RocksDbSsdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksDbSsdBackend")
            .field("info", &self.inner.info)
            .field("used_bytes", &self.used_bytes())
            .finish_non_exhaustive()
    }
}

fn value_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(VALUE_PREFIX);
    k.extend_from_slice(name);
    k
}

impl RocksDbSsdBackend {
    /// Opens (or creates) the database and loads its index. Blocking: it
    /// reads the whole index column family.
    pub fn open(cfg: RocksDbSsdConfig) -> Result<Self> {
        cfg.validate()?;
        prepare_directory(&cfg)?;
        let opts = rocksdb_options(&cfg)?;
        // Named explicitly so `cf_handle` finds it for multi-get.
        let db = DB::open_cf_descriptors(
            &opts,
            &cfg.path,
            [ColumnFamilyDescriptor::new(CF, opts.clone())],
        )
        .map_err(|e| {
            let lock_held = e.to_string().contains("lock");
            let err = db_error(e, "open").with_context("path", cfg.path.display());
            if lock_held {
                err.with_context(
                    "hint",
                    "another process (or backend) has this database open",
                )
            } else {
                err
            }
        })?;

        let index = ShardedIndex::new(&cfg.policy, SHARDS)?;
        let disk_capacity = cfg.capacity.0;
        // Evicted values stay on disk until compaction drops them (RocksDB
        // compacts after 4 flushes) and blob garbage collection frees their
        // files: room for two eviction passes and four memtables of garbage
        // keeps puts from reclaiming in line in steady state.
        let garbage =
            2 * cfg.watermark().bytes_to_free(disk_capacity) + 4 * write_buffer_for(disk_capacity);
        let capacity = disk_capacity
            .saturating_sub(reserved_bytes(disk_capacity))
            .saturating_sub(garbage)
            .max(1 << 20);
        let info = BackendInfo {
            scheme: SCHEME,
            description: format!(
                "{}, capacity {}, {} eviction at {:.0}% freeing {:.0}%, wal {}, compression {}",
                cfg.path.display(),
                cfg.capacity,
                cfg.policy,
                cfg.eviction_high_watermark_ratio * 100.0,
                cfg.eviction_ratio * 100.0,
                if cfg.wal { "on" } else { "off" },
                cfg.compression
            ),
            capabilities: Capabilities {
                shared: false,
                persistent: true,
                remove: true,
                requires_registration: false,
                capacity_bound: true,
                max_batch: None,
                max_value_size: Some((capacity / 2).min(MAX_VALUE) as usize),
                holds_for_load: false,
            },
        };
        let (reclaim_requests, reclaim_wakeups) = std::sync::mpsc::sync_channel(1);
        let inner = Inner {
            info,
            path: cfg.path.clone(),
            db: RwLock::new(Some(Arc::new(db))),
            closed: AtomicBool::new(false),
            index,
            capacity,
            disk_capacity,
            transient: 2 * write_buffer_for(disk_capacity),
            watermark: cfg.watermark(),
            used: AtomicU64::new(0),
            stamp: AtomicU64::new(0),
            wal: cfg.wal,
            sync: cfg.sync,
            disk: Mutex::new(DiskEstimate {
                measured: 0,
                written_since: 0,
                at: Instant::now(),
            }),
            disk_refresh_bytes: (capacity / 64).clamp(1 << 20, 64 << 20),
            reclaiming: Mutex::new(()),
            reclaim_requests,
            corrupted: AtomicU64::new(0),
            rep_buffers: Mutex::new(Vec::new()),
            read_options: {
                let mut ro = rocksdb::ReadOptions::default();
                ro.set_verify_checksums(false);
                ro
            },
        };
        inner.load_index()?;
        // A capacity lowered since the last run applies at once.
        if inner.used.load(Ordering::Acquire) > inner.high_bytes() {
            let excess = inner.used.load(Ordering::Acquire) - inner.high_bytes();
            inner.evict(excess + inner.watermark.bytes_to_free(capacity));
        }
        // So does the limit on disk: a crash can leave the garbage of
        // evictions that compaction had not dropped yet.
        if inner.refresh_disk() > inner.disk_limit() {
            let db = inner.db("open")?;
            for thorough in [false, true] {
                // Not fatal: puts reclaim again before they would not fit.
                if let Err(e) = inner.reclaim(&db, thorough) {
                    tracing::warn!("rocksdb-ssd: reclaiming space at open failed: {e}");
                }
                if inner.refresh_disk() <= inner.disk_limit() {
                    break;
                }
            }
        }
        let inner = Arc::new(inner);
        space::start_reclaimer(Arc::downgrade(&inner), reclaim_wakeups)?;
        Ok(RocksDbSsdBackend { inner })
    }

    /// Logical bytes stored (values plus per-key overhead).
    pub fn used_bytes(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// Bytes the database directory occupies now.
    pub fn disk_bytes(&self) -> u64 {
        directory_bytes(&self.inner.path)
    }

    /// The configured capacity in bytes: the most the directory holds.
    pub fn capacity_bytes(&self) -> u64 {
        self.inner.disk_capacity
    }

    /// The bytes values may take: the capacity less what RocksDB's own
    /// files (WAL, manifest, info log, flush output) may need.
    pub fn value_capacity_bytes(&self) -> u64 {
        self.inner.capacity
    }

    /// Waits (up to `timeout`) until RocksDB runs no flush or compaction;
    /// returns whether it got there. A running compaction holds its input
    /// files until it finishes, so the directory is at its true size only
    /// at rest: tests and benchmarks measure after this.
    pub fn wait_for_background_work(&self, timeout: Duration) -> bool {
        let Ok(db) = self.inner.db("wait_for_background_work") else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        loop {
            let busy = [
                "rocksdb.num-running-compactions",
                "rocksdb.num-running-flushes",
                "rocksdb.compaction-pending",
                "rocksdb.mem-table-flush-pending",
            ]
            .iter()
            .any(|&p| db.property_int_value(p).ok().flatten().unwrap_or(0) > 0);
            if !busy {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Values that failed their checksum (and were dropped) since open.
    pub fn corrupted_values(&self) -> u64 {
        self.inner.corrupted.load(Ordering::Relaxed)
    }

    fn check_open(&self, op: &'static str) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(Error::closed(SCHEME).with_operation(op))
        } else {
            Ok(())
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Inner, &DB) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.inner.db(op)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner, &db))
            .await
            .map_err(|e| join_error(e, op))?
    }
}

impl Inner {
    fn db(&self, op: &'static str) -> Result<Arc<DB>> {
        self.db
            .read()
            .clone()
            .ok_or_else(|| Error::closed(SCHEME).with_operation(op))
    }

    fn write_options(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.disable_wal(!self.wal);
        wo.set_sync(self.wal && self.sync);
        wo
    }

    fn put_batch(&self, db: &DB, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        let mut out = Outcomes::new(items.len(), "put");
        let mut todo = Vec::new();
        let mut repeats = Repeats::with_capacity(items.len());
        let max = self.info.capabilities.max_value_size.unwrap_or(usize::MAX);
        let mut incoming = 0;
        for (i, (key, iov)) in items.iter().enumerate() {
            let checked = check_value_len(key, iov.len(), max, |len| {
                format!("a value of {len} bytes is over this backend's max_value_size of {max}")
            });
            if let Err(e) = checked {
                out.set(i, PutOutcome::Failed(e));
            } else if self.index.contains(key) || !repeats.first(i, key) {
                // Present, or an earlier item of this batch stores it. A
                // repeat is `Exists` at once, whatever becomes of its first.
                out.set(i, PutOutcome::Exists);
            } else {
                let key_string = key.to_key_string();
                incoming += charge_of(key_string.len(), iov.len());
                todo.push((i, key_string));
            }
        }
        if todo.is_empty() {
            return Ok(out.into_vec());
        }
        let failed_all = |out: &mut Outcomes<PutOutcome>, todo: &[(usize, String)], e: &Error| {
            for (i, _) in todo {
                out.set(
                    *i,
                    PutOutcome::Failed(
                        Error::new(e.kind(), e.message().to_string())
                            .with_operation("put")
                            .with_context("key", &items[*i].0)
                            .set_temporary_if(e.is_temporary()),
                    ),
                );
            }
        };
        if let Err(e) = self.reserve(db, incoming) {
            failed_all(&mut out, &todo, &e);
            return Ok(out.into_vec());
        }

        let spare = self.rep_buffers.lock().pop().unwrap_or_default();
        let mut rep = BatchRep::reusing(spare, incoming as usize + 16 * todo.len());
        for (i, key_string) in &todo {
            let iov = &items[*i].1;
            let stamp = self.stamp.fetch_add(1, Ordering::Relaxed);
            let name = key_string.as_bytes();
            rep.put_value(VALUE_PREFIX, name, iov.chunks(), iov.len());
            rep.put(INDEX_PREFIX, name, &record::encode_index(iov.len(), stamp));
        }
        let rep = rep.finish();
        let batch = WriteBatch::from_data(&rep);
        {
            let mut spare = self.rep_buffers.lock();
            if spare.len() < REP_BUFFERS && rep.capacity() <= REP_BUFFER_MAX {
                spare.push(rep);
            }
        }
        if let Err(e) = db.write_opt(batch, &self.write_options()) {
            self.used.fetch_sub(incoming, Ordering::AcqRel);
            failed_all(&mut out, &todo, &db_error(e, "put"));
            return Ok(out.into_vec());
        }
        self.disk.lock().written_since += incoming;

        // Publish: a key stored concurrently by another caller keeps that
        // caller's entry (the bytes are the same, keys being content-derived).
        let mut chain = self.index.chain();
        for (i, key_string) in &todo {
            let (key, iov) = &items[*i];
            let charge = charge_of(key_string.len(), iov.len());
            let ancestor = chain.next(*i, key).map(|j| &items[j].0);
            let meta = Meta {
                len: iov.len(),
                charge,
            };
            let outcome = match self.index.insert_if_absent(key, charge, ancestor, meta) {
                Ok(()) => PutOutcome::Stored,
                Err(_) => {
                    self.used.fetch_sub(charge, Ordering::AcqRel);
                    PutOutcome::Exists
                }
            };
            out.set(*i, outcome);
        }
        Ok(out.into_vec())
    }

    fn get_batch(&self, db: &DB, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        let mut out = Outcomes::new(items.len(), "get_into");
        let mut reads = Vec::new();
        let mut chain = self.index.chain();
        for (i, (key, dst)) in items.iter().enumerate() {
            let ancestor = chain.next(i, key).map(|j| &items[j].0);
            match self.index.access(key, ancestor, |meta| *meta) {
                None => out.set(i, GetOutcome::Miss),
                Some(meta) if meta.len != dst.len() => out.set(
                    i,
                    GetOutcome::Failed(
                        Error::invalid_argument(format!(
                            "destination holds {} bytes but the stored value has {}",
                            dst.len(),
                            meta.len
                        ))
                        .with_operation("get_into")
                        .with_context("key", key),
                    ),
                ),
                Some(_) => reads.push((i, key.to_key_string())),
            }
        }
        if reads.is_empty() {
            return Ok(out.into_vec());
        }
        let data = cf(db, CF)?;
        let mut dropped = Vec::new();
        // One multi-get per run of values up to MULTI_GET_BYTES: the values
        // it returns are still in the CPU cache when they are verified and
        // copied out, where one multi-get of a whole batch of large values
        // would read them back from memory twice (measured: 512 KiB values
        // in batches of 16 read 2x faster this way).
        let mut start = 0;
        while start < reads.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < reads.len() && (end == start || bytes < MULTI_GET_BYTES) {
                bytes += items[reads[end].0].1.len();
                end += 1;
            }
            let run = &reads[start..end];
            start = end;
            let values = db.batched_multi_get_cf_opt(
                data,
                run.iter().map(|(_, k)| value_key(k.as_bytes())),
                false,
                &self.read_options,
            );
            for ((i, key_string), value) in run.iter().zip(values) {
                let (key, dst) = &items[*i];
                let outcome = match value {
                    Ok(Some(record)) => {
                        match record::decode_value(key_string.as_bytes(), &record) {
                            Ok(payload) if payload.len() == dst.len() => {
                                match dst.copy_from_slice(payload) {
                                    Ok(()) => GetOutcome::Hit,
                                    Err(e) => GetOutcome::Failed(e.with_operation("get_into")),
                                }
                            }
                            Ok(payload) => self.corrupted(
                                key,
                                format!(
                                    "the index says {} bytes but the record holds {}",
                                    dst.len(),
                                    payload.len()
                                ),
                                &mut dropped,
                            ),
                            Err(why) => self.corrupted(key, why, &mut dropped),
                        }
                    }
                    // Evicted or removed since the index lookup, or a value whose
                    // flush a crash without WAL lost.
                    Ok(None) => {
                        self.forget(key);
                        GetOutcome::Miss
                    }
                    Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                        self.corrupted(key, format!("RocksDB: {e}"), &mut dropped)
                    }
                    Err(e) => GetOutcome::Failed(db_error(e, "get_into").with_context("key", key)),
                };
                out.set(*i, outcome);
            }
        }
        if !dropped.is_empty() {
            if let Err(e) = self.delete_records(&dropped) {
                tracing::warn!("rocksdb-ssd: deleting corrupted values failed: {e}");
            }
        }
        Ok(out.into_vec())
    }

    /// A value that failed verification: dropped, counted, reported, never
    /// handed out.
    fn corrupted(&self, key: &BlockKey, why: String, dropped: &mut Vec<BlockKey>) -> GetOutcome {
        self.corrupted.fetch_add(1, Ordering::Relaxed);
        self.forget(key);
        dropped.push(key.clone());
        tracing::warn!(%key, %why, "rocksdb-ssd: dropping a corrupted value");
        GetOutcome::Failed(
            Error::new(
                ErrorKind::Corrupted,
                format!("stored value failed verification: {why}"),
            )
            .set_permanent()
            .with_operation("get_into")
            .with_context("key", key)
            .with_context("backend", SCHEME),
        )
    }
}

trait SetTemporaryIf {
    fn set_temporary_if(self, temporary: bool) -> Self;
}

impl SetTemporaryIf for Error {
    fn set_temporary_if(self, temporary: bool) -> Self {
        if temporary {
            self.set_temporary()
        } else {
            self.set_permanent()
        }
    }
}

#[async_trait]
impl KvBackend for RocksDbSsdBackend {
    fn info(&self) -> &BackendInfo {
        &self.inner.info
    }

    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>> {
        self.check_open("exists")?;
        Ok(keys.iter().map(|k| self.inner.index.contains(k)).collect())
    }

    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>> {
        self.check_open("value_lens")?;
        Ok(keys
            .iter()
            .map(|k| self.inner.index.peek(k, |m| m.len))
            .collect())
    }

    /// As in the memory backend, a batch is taken to be one request's chain
    /// in prefix order: each key reaches its shard's policy with the batch's
    /// previous key in that shard as its ancestor. One batch is one RocksDB
    /// write (one WAL record), so a crash keeps all of it or none.
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>> {
        self.check_open("put")?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking("put", move |inner, db| inner.put_batch(db, items))
            .await
    }

    /// One multi-get per batch, on the blocking pool.
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>> {
        self.check_open("get_into")?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.blocking("get_into", move |inner, db| inner.get_batch(db, items))
            .await
    }

    async fn remove(&self, keys: &[BlockKey]) -> Result<()> {
        self.check_open("remove")?;
        if keys.is_empty() {
            return Ok(());
        }
        let keys = keys.to_vec();
        self.blocking("remove", move |inner, _| {
            for key in &keys {
                inner.forget(key);
            }
            // Deleted even when the index did not hold them: a record left
            // over by a failed eviction goes too.
            inner.delete_records(&keys)
        })
        .await
    }

    /// The directory is this process's own (RocksDB locks it): both scopes delete every
    /// record the index holds.
    async fn clear(&self, _scope: kvpool_core::ClearScope) -> Result<bool> {
        self.check_open("clear")?;
        let keys = self.inner.index.keys();
        if !keys.is_empty() {
            self.remove(&keys).await?;
        }
        Ok(true)
    }

    /// Flushes memtables when the WAL is off (so what was written survives),
    /// then waits for running operations and releases the database.
    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let Some(db) = self.inner.db.write().take() else {
            return Ok(());
        };
        let wal = self.inner.wal;
        tokio::task::spawn_blocking(move || close_db(db, wal))
            .await
            .map_err(|e| join_error(e, "close"))?
    }
}

impl Drop for RocksDbSsdBackend {
    fn drop(&mut self) {
        // Without close, memtables of a WAL-less database would be lost.
        if !self.inner.wal && !self.inner.closed.swap(true, Ordering::AcqRel) {
            if let Some(db) = self.inner.db.write().take() {
                let mut fo = FlushOptions::default();
                fo.set_wait(true);
                if let Ok(data) = cf(&db, CF) {
                    let _ = db.flush_cf_opt(data, &fo);
                }
            }
        }
    }
}
