use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kvpool_core::batch::{check_value_len, Outcomes, Repeats};
use kvpool_core::eviction::{ShardedIndex, Watermark};
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BackendInfo, BlockKey, Capabilities, Error, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend,
    PutOutcome, Result,
};
use parking_lot::{Mutex, RwLock};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBRecoveryMode, FlushOptions,
    Options, WriteBatch, WriteOptions, DB,
};

use crate::config::RocksDbSsdConfig;
use crate::record::{self, BatchRep, HEADER_LEN, INDEX_LEN};
use crate::SCHEME;

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
/// Memtables per database: one filling while others flush.
const MEMTABLES: u64 = 3;
/// RocksDB's fixed files: manifest (preallocated), info logs, options.
const FIXED_FILES: u64 = 3 << 19;
/// The share of blob files (oldest first) whose live values an in-line
/// reclaim relocates; see `reclaim`.
const BLOB_GC_AGE_CUTOFF: f64 = 0.25;

/// The memtable size: memtables and the WAL hold values until a flush moves
/// them to blob files, so both are sized from the capacity, and a small
/// tier does not spend most of its bytes on them.
fn write_buffer_for(capacity: u64) -> u64 {
    (capacity / 32).clamp(1 << 20, 64 << 20)
}

/// Bytes of the directory that RocksDB's own files may take at any moment:
/// a WAL per memtable (preallocated 10% past the memtable size), the output
/// of a flush in progress (its data still in the WAL too), and the fixed
/// files. Values get the rest of the capacity.
pub(crate) fn reserved_bytes(capacity: u64) -> u64 {
    let wb = write_buffer_for(capacity);
    MEMTABLES * wb * 11 / 10 + wb + FIXED_FILES
}

/// What the index keeps per key.
#[derive(Debug, Clone, Copy)]
struct Meta {
    len: usize,
    /// Bytes counted against capacity: value, header, key twice, index record.
    charge: u64,
}

/// The last measurement of the database directory, plus what was written since.
#[derive(Debug)]
struct DiskEstimate {
    measured: u64,
    written_since: u64,
    at: Instant,
}

/// How old a measurement of the directory may get: files appear there that
/// the backend did not write (flush and compaction output, or anything
/// else), and reading a directory of a few hundred files costs microseconds.
const DISK_REFRESH: Duration = Duration::from_millis(200);

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

fn db_error(e: rocksdb::Error, op: &'static str) -> Error {
    use rocksdb::ErrorKind as K;
    let text = e.to_string();
    let kind = match e.kind() {
        K::Corruption => ErrorKind::Corrupted,
        K::NotSupported => ErrorKind::Unsupported,
        K::InvalidArgument => ErrorKind::InvalidArgument,
        K::IOError if text.contains("No space left") || text.contains("NoSpace") => {
            ErrorKind::NoSpace
        }
        K::IOError | K::Busy | K::TryAgain | K::Incomplete | K::Aborted => ErrorKind::Unavailable,
        K::TimedOut => ErrorKind::Timeout,
        K::ShutdownInProgress => ErrorKind::Closed,
        _ => ErrorKind::Unexpected,
    };
    Error::new(kind, format!("RocksDB: {text}"))
        .with_operation(op)
        .with_context("backend", SCHEME)
}

fn join_error(e: tokio::task::JoinError, op: &'static str) -> Error {
    Error::new(
        ErrorKind::Unexpected,
        format!("the blocking RocksDB task failed: {e}"),
    )
    .with_operation(op)
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| {
        Error::new(
            ErrorKind::Unexpected,
            format!("column family {name:?} is missing"),
        )
    })
}

fn value_key(name: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(VALUE_PREFIX);
    k.extend_from_slice(name);
    k
}

fn charge_of(key_len: usize, value_len: usize) -> u64 {
    (value_len + HEADER_LEN + 2 * key_len + INDEX_LEN) as u64
}

/// Bytes the directory's files occupy on the device (allocated blocks, so
/// RocksDB's fallocate'd WAL and SST tails count too).
fn directory_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(path) else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| (m.blocks() * 512).max(m.len()))
        .sum()
}

fn path_error(cfg: &RocksDbSsdConfig, what: &str, e: std::io::Error) -> Error {
    Error::config_invalid(format!(
        "rocksdb_ssd.path {} {what}: {e}",
        cfg.path.display()
    ))
    .with_operation("open")
    .with_context("backend", SCHEME)
    .set_source(e)
}

/// Checks the directory before RocksDB sees it, for errors a user can act on.
fn prepare_directory(cfg: &RocksDbSsdConfig) -> Result<()> {
    let path = &cfg.path;
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => {
            return Err(Error::config_invalid(format!(
                "rocksdb_ssd.path {} exists and is not a directory",
                path.display()
            ))
            .with_operation("open")
            .with_context("backend", SCHEME))
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| path_error(cfg, "cannot be created", e))?
        }
        Err(e) => return Err(path_error(cfg, "cannot be read", e)),
    }
    // RocksDB would fail later with a less direct message (on its LOCK file).
    let probe = path.join(".kvpool-write-probe");
    std::fs::write(&probe, b"").map_err(|e| path_error(cfg, "is not a writable directory", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

fn rocksdb_options(cfg: &RocksDbSsdConfig) -> Result<Options> {
    let capacity = cfg.capacity.0;
    let compression = cfg.compression_type()?;
    let write_buffer = write_buffer_for(capacity);

    let mut db = Options::default();
    db.create_if_missing(true);
    // After SIGKILL the WAL may end in a torn record: recover every write
    // before it and open without manual repair.
    db.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    db.set_max_total_wal_size(2 * write_buffer);
    // Smooth write-back of flush and compaction output instead of one large
    // sync per file. Not for the WAL: syncing it in 1 MiB steps put the
    // device on every put's path and cost 20-30% of write throughput, for
    // nothing a process crash needs (`sync` is the setting for power loss).
    db.set_bytes_per_sync(1 << 20);
    // RocksDB's info log lives in the same directory and counts against capacity.
    db.set_keep_log_file_num(2);
    db.set_max_log_file_size(512 << 10);
    db.set_max_manifest_file_size(4 << 20);
    // The default preallocates 4 MiB of manifest, a fixed cost a small tier
    // would feel; the manifest grows by a few KiB per flush.
    db.set_manifest_preallocation_size(256 << 10);
    db.set_max_background_jobs(2);

    let mut table = BlockBasedOptions::default();
    let cache =
        Cache::new_lru_cache(cfg.block_cache.0 as usize).map_err(|e| db_error(e, "open"))?;
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    // No bloom filter: reads only ask for keys the in-memory index holds, so
    // a filter would never save a lookup.

    db.set_write_buffer_size(write_buffer as usize);
    db.set_max_write_buffer_number(MEMTABLES as i32);
    db.set_compression_type(compression);
    db.set_block_based_table_factory(&table);
    db.set_level_compaction_dynamic_level_bytes(true);
    // Large values are written once into blob files; the LSM tree holds only
    // small blob references, so compaction rewrites little, and deleting an
    // evicted value never rewrites the others.
    db.set_enable_blob_files(true);
    db.set_min_blob_size(cfg.min_blob_size.0);
    db.set_blob_file_size((capacity / 64).clamp(1 << 20, 256 << 20));
    db.set_blob_compression_type(compression);
    // No blob garbage collection in RocksDB's own compactions. A cache
    // evicts oldest first, so a blob file's values go together and the file
    // is dropped, without rewriting anything, once compaction has dropped
    // their tombstoned references. GC would instead relocate the live values
    // of the oldest quarter of blob files in every compaction, and those are
    // the values evicted next: with GC on, a 256 MiB tier evicting as it
    // wrote rewrote 20-40 MiB of blobs per L0 compaction, compactions fell
    // behind, garbage piled up and puts spent most of their time reclaiming
    // in line (put 87-192 MiB/s; 418-459 MiB/s without). Values an access
    // keeps alive (`lru`) can pin a file of garbage; `reclaim` turns GC on
    // for its own compaction (oldest quarter, then every file), so the
    // directory stays bounded either way. The settings below apply to it.
    db.set_enable_blob_gc(false);
    db.set_blob_gc_age_cutoff(BLOB_GC_AGE_CUTOFF);
    db.set_blob_gc_force_threshold(0.5);
    Ok(db)
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
            },
        };
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
        Ok(RocksDbSsdBackend {
            inner: Arc::new(inner),
        })
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

    /// The most the directory may hold once a put is admitted: the capacity
    /// less headroom for the files a flush writes.
    fn disk_limit(&self) -> u64 {
        self.disk_capacity - self.transient
    }

    fn high_bytes(&self) -> u64 {
        self.watermark.high_bytes(self.capacity)
    }

    fn write_options(&self) -> WriteOptions {
        let mut wo = WriteOptions::default();
        wo.disable_wal(!self.wal);
        wo.set_sync(self.wal && self.sync);
        wo
    }

    /// Rebuilds the in-memory index from the index column family, oldest
    /// first so the eviction order survives a restart (insertion order; the
    /// accesses of the last run are not persisted).
    fn load_index(&self) -> Result<()> {
        let db = self.db("open")?;
        let mut entries = Vec::new();
        let mut malformed = Vec::new();
        let from = [INDEX_PREFIX];
        let mode = rocksdb::IteratorMode::From(&from, rocksdb::Direction::Forward);
        // The bound keeps the iterator off the value records: positioned on
        // one, RocksDB 7.8 reads its blob, so a damaged value would fail the
        // open instead of its own read.
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound([INDEX_PREFIX + 1]);
        for item in db.iterator_opt(mode, ro) {
            let (k, v) = item.map_err(|e| db_error(e, "open"))?;
            let Some(name) = k.strip_prefix(&[INDEX_PREFIX]) else {
                break;
            };
            let parsed = std::str::from_utf8(name)
                .ok()
                .and_then(|s| BlockKey::parse(s).ok())
                .zip(record::decode_index(&v));
            match parsed {
                Some((key, (len, stamp))) => entries.push((stamp, key, len, name.len())),
                None => malformed.push(name.to_vec()),
            }
        }
        if !malformed.is_empty() {
            tracing::warn!(
                count = malformed.len(),
                "rocksdb-ssd: dropping malformed index records"
            );
            let mut rep = BatchRep::with_capacity(0);
            for name in &malformed {
                rep.delete(INDEX_PREFIX, name);
                rep.delete(VALUE_PREFIX, name);
            }
            let batch = WriteBatch::from_data(&rep.finish());
            db.write_opt(batch, &self.write_options())
                .map_err(|e| db_error(e, "open"))?;
        }
        entries.sort_unstable_by_key(|e| e.0);
        let mut used = 0;
        let mut next_stamp = 0;
        for (stamp, key, len, key_len) in entries {
            let charge = charge_of(key_len, len);
            next_stamp = stamp + 1;
            // Index records are unique by key, so every one is inserted.
            if self
                .index
                .insert_if_absent(&key, charge, None, Meta { len, charge })
                .is_ok()
            {
                used += charge;
            }
        }
        self.used.store(used, Ordering::Release);
        self.stamp.store(next_stamp, Ordering::Release);
        Ok(())
    }

    fn refresh_disk(&self) -> u64 {
        let measured = directory_bytes(&self.path);
        let mut disk = self.disk.lock();
        disk.measured = measured;
        disk.written_since = 0;
        disk.at = Instant::now();
        measured
    }

    /// The directory's size as last measured plus what was written since,
    /// re-measured once enough was written or enough time passed.
    fn disk_estimate(&self) -> u64 {
        {
            let disk = self.disk.lock();
            if disk.written_since < self.disk_refresh_bytes && disk.at.elapsed() < DISK_REFRESH {
                return disk.measured + disk.written_since;
            }
        }
        self.refresh_disk()
    }

    /// Frees the space of deleted values now: flushes the memtables (so
    /// tombstones reach the LSM tree and old WAL files go) and compacts the
    /// data, collecting the garbage of every blob file when `thorough`.
    fn reclaim(&self, db: &DB, thorough: bool) -> Result<()> {
        let _one = self.reclaiming.lock();
        let data = cf(db, CF)?;
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        db.flush_cf_opt(data, &fo)
            .map_err(|e| db_error(e, "reclaim"))?;
        // Background compactions leave blob garbage collection off (see
        // `rocksdb_options`); this one collects the garbage of the oldest
        // quarter of blob files, or of every file when `thorough`, which
        // frees files that values still alive keep from being dropped.
        let cutoff = if thorough {
            "1.0".to_string()
        } else {
            BLOB_GC_AGE_CUTOFF.to_string()
        };
        db.set_options_cf(
            data,
            &[
                ("enable_blob_garbage_collection", "true"),
                ("blob_garbage_collection_age_cutoff", cutoff.as_str()),
            ],
        )
        .map_err(|e| db_error(e, "reclaim"))?;
        let mut co = rocksdb::CompactOptions::default();
        co.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        db.compact_range_cf_opt(data, None::<&[u8]>, None::<&[u8]>, &co);
        db.set_options_cf(
            data,
            &[
                ("enable_blob_garbage_collection", "false"),
                (
                    "blob_garbage_collection_age_cutoff",
                    BLOB_GC_AGE_CUTOFF.to_string().as_str(),
                ),
            ],
        )
        .map_err(|e| db_error(e, "reclaim"))?;
        tracing::debug!(
            disk = directory_bytes(&self.path),
            thorough,
            "rocksdb-ssd reclaimed space"
        );
        Ok(())
    }

    /// Reserves `incoming` logical bytes, evicting as Mooncake does (past the
    /// high watermark, free `eviction_ratio` of capacity in one pass), and
    /// makes sure the directory stays under capacity too, reclaiming the
    /// space of evicted values when it would not.
    fn reserve(&self, db: &DB, incoming: u64) -> Result<()> {
        let no_space = |why: String| {
            Error::new(ErrorKind::NoSpace, why)
                .with_operation("put")
                .with_context("capacity", ByteSize(self.disk_capacity))
        };
        if incoming > self.capacity {
            return Err(no_space(format!(
                "{} of values cannot fit in the capacity",
                ByteSize(incoming)
            ))
            .set_permanent());
        }
        let pass = self.watermark.bytes_to_free(self.capacity);
        let used = self.used.fetch_add(incoming, Ordering::AcqRel) + incoming;
        if used > self.high_bytes() {
            let over_capacity = used.saturating_sub(self.capacity);
            self.evict(pass.max(over_capacity));
        }
        if self.used.load(Ordering::Acquire) > self.capacity {
            self.used.fetch_sub(incoming, Ordering::AcqRel);
            return Err(no_space(
                "the rocksdb-ssd backend is full and nothing more can be evicted".to_string(),
            ));
        }
        // Evicted values leave the directory only once compaction drops them
        // (and blob garbage collection their files), so the bytes on disk can
        // run ahead of the logical size.
        let disk_limit = self.disk_limit();
        let mut disk = self.disk_estimate();
        // Near the limit the estimate is not good enough: what RocksDB wrote
        // in the background (flush and compaction output, blob garbage not
        // yet collected) shows only in a fresh measurement.
        if disk + incoming > disk_limit / 10 * 9 {
            disk = self.refresh_disk();
        }
        if disk + incoming > disk_limit {
            let mut fits = false;
            for thorough in [false, true] {
                if let Err(e) = self.reclaim(db, thorough) {
                    tracing::warn!("rocksdb-ssd: reclaiming space failed: {e}");
                }
                if self.refresh_disk() + incoming <= disk_limit {
                    fits = true;
                    break;
                }
                // Still over: RocksDB's own files or per-value overhead take
                // more than the watermark leaves; give up one more pass
                // before the thorough attempt (after it, evicting would only
                // add garbage that nothing collects before the put).
                if !thorough {
                    self.evict(pass);
                }
            }
            if !fits {
                self.used.fetch_sub(incoming, Ordering::AcqRel);
                return Err(no_space(format!(
                    "the database directory holds {} and cannot take {} more",
                    ByteSize(self.refresh_disk()),
                    ByteSize(incoming)
                ))
                .with_context("path", self.path.display()));
            }
        }
        Ok(())
    }

    /// Evicts values until `target` bytes are released; returns the bytes released.
    fn evict(&self, target: u64) -> u64 {
        // Held until the victims' records are deleted, so the next pass
        // starts after this one's writes.
        let mut evictor = self.index.evictor();
        let mut victims = Vec::new();
        let released = evictor.evict(target, |key, meta| {
            self.used.fetch_sub(meta.charge, Ordering::AcqRel);
            victims.push(key);
            meta.charge
        });
        if !victims.is_empty() {
            if let Err(e) = self.delete_records(&victims) {
                // The keys are gone from the index; their records come back
                // at the next open, where capacity is enforced again.
                tracing::warn!("rocksdb-ssd: deleting evicted values failed: {e}");
            }
            tracing::trace!(
                count = victims.len(),
                bytes = released,
                "rocksdb-ssd evicted values"
            );
        }
        released
    }

    fn delete_records(&self, keys: &[BlockKey]) -> Result<()> {
        let db = self.db("remove")?;
        let mut rep = BatchRep::with_capacity(0);
        for key in keys {
            let name = key.to_key_string();
            rep.delete(INDEX_PREFIX, name.as_bytes());
            rep.delete(VALUE_PREFIX, name.as_bytes());
        }
        let batch = WriteBatch::from_data(&rep.finish());
        db.write_opt(batch, &self.write_options())
            .map_err(|e| db_error(e, "remove"))
    }

    /// Drops `key` from the index; returns whether it was there.
    fn forget(&self, key: &BlockKey) -> bool {
        if let Some(meta) = self.index.remove(key) {
            self.used.fetch_sub(meta.charge, Ordering::AcqRel);
            true
        } else {
            false
        }
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
        Ok(keys
            .iter()
            .map(|k| self.inner.index.contains(k))
            .collect())
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

fn close_db(mut db: Arc<DB>, wal: bool) -> Result<()> {
    let mut flushed = Ok(());
    if !wal {
        let mut fo = FlushOptions::default();
        fo.set_wait(true);
        flushed = cf(&db, CF)
            .and_then(|data| db.flush_cf_opt(data, &fo).map_err(|e| db_error(e, "close")));
    }
    // Operations that started before `close` hold clones; RocksDB's lock
    // on the directory goes with the last one.
    loop {
        match Arc::try_unwrap(db) {
            Ok(db) => {
                drop(db);
                return flushed;
            }
            Err(shared) => {
                db = shared;
                std::thread::sleep(Duration::from_millis(1));
            }
        }
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
