//! What the backend holds and what it may hold: the key index (rebuilt at
//! open), logical and on-disk capacity, eviction, and reclaiming the space
//! of evicted values.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kvpool_core::size::ByteSize;
use kvpool_core::{BlockKey, Error, ErrorKind, Result};
use rocksdb::{FlushOptions, WriteBatch, DB};

use super::db::{cf, db_error, directory_bytes, filesystem_available, BLOB_GC_AGE_CUTOFF};
use super::{Inner, CF, INDEX_PREFIX, VALUE_PREFIX};
use crate::record::{self, BatchRep, HEADER_LEN, INDEX_LEN};

/// What the index keeps per key.
#[derive(Debug, Clone, Copy)]
pub(super) struct Meta {
    pub(super) len: usize,
    /// Bytes counted against capacity: value, header, key twice, index record.
    pub(super) charge: u64,
}

/// The last measurement of the database directory, plus what was written since.
#[derive(Debug)]
pub(super) struct DiskEstimate {
    pub(super) measured: u64,
    pub(super) written_since: u64,
    pub(super) at: Instant,
}

/// How old a measurement of the directory may get: files appear there that
/// the backend did not write (flush and compaction output, or anything
/// else), and reading a directory of a few hundred files costs microseconds.
const DISK_REFRESH: Duration = Duration::from_millis(200);

/// The background reclaimer's fewest seconds between two passes: a pass that could not free
/// much must not turn into compaction running back to back.
const RECLAIM_INTERVAL: Duration = Duration::from_secs(1);

/// Runs reclaim passes asked for by puts ([`Inner::reserve`]) on a thread of its own, until the
/// backend is dropped. A full compaction can take tens of seconds on a large store; inside a
/// put it blocked that put (and every put behind it) for all of it.
pub(super) fn start_reclaimer(
    inner: std::sync::Weak<Inner>,
    wakeups: std::sync::mpsc::Receiver<()>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("rocksdb-ssd-reclaim".into())
        .spawn(move || {
            // Ends when the backend drops its sender (and with it `Inner`).
            while wakeups.recv().is_ok() {
                let started = Instant::now();
                {
                    let Some(inner) = inner.upgrade() else { return };
                    let Ok(db) = inner.db("reclaim") else { return };
                    if let Err(e) = inner.reclaim(&db, false) {
                        tracing::warn!("rocksdb-ssd: background reclaim failed: {e}");
                    }
                    inner.refresh_disk();
                }
                std::thread::sleep(RECLAIM_INTERVAL.saturating_sub(started.elapsed()));
            }
        })
        .map(|_| ())
        .map_err(|e| {
            Error::new(
                ErrorKind::Unexpected,
                "cannot start the rocksdb-ssd reclaimer",
            )
            .set_source(e)
        })
}

/// Bytes a key counts against capacity: its value record (header and
/// payload) and index record, each under the key.
pub(super) fn charge_of(key_len: usize, value_len: usize) -> u64 {
    (value_len + HEADER_LEN + 2 * key_len + INDEX_LEN) as u64
}

impl Inner {
    /// The most the directory may hold once a put is admitted: the capacity
    /// less headroom for the files a flush writes.
    pub(super) fn disk_limit(&self) -> u64 {
        self.disk_capacity - self.transient
    }

    pub(super) fn high_bytes(&self) -> u64 {
        self.watermark.high_bytes(self.capacity)
    }

    /// Rebuilds the in-memory index from the index column family, oldest
    /// first so the eviction order survives a restart (insertion order; the
    /// accesses of the last run are not persisted).
    pub(super) fn load_index(&self) -> Result<()> {
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

    pub(super) fn refresh_disk(&self) -> u64 {
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
    pub(super) fn reclaim(&self, db: &DB, thorough: bool) -> Result<()> {
        let _one = self.reclaiming.lock();
        self.reclaim_locked(db, thorough)
    }

    /// Reclaims unless `incoming` fits under the disk limit by the time this put's turn
    /// comes: puts that queued behind another's reclaim find the space it freed instead of
    /// each compacting again (eight clients once waited half a minute that way). Whether it
    /// fits now.
    fn reclaim_unless_fits(&self, db: &DB, thorough: bool, incoming: u64) -> Result<bool> {
        let _one = self.reclaiming.lock();
        if self.refresh_disk() + incoming <= self.disk_limit() {
            return Ok(true);
        }
        self.reclaim_locked(db, thorough)?;
        Ok(self.refresh_disk() + incoming <= self.disk_limit())
    }

    fn reclaim_locked(&self, db: &DB, thorough: bool) -> Result<()> {
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
    pub(super) fn reserve(&self, db: &DB, incoming: u64) -> Result<()> {
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
        // Past three quarters of the limit, with garbage worth collecting (the directory
        // holds an eighth of the limit more than the live values), the background reclaimer
        // frees it while puts go on; a put waits for a reclaim only if that fell behind.
        let live = self.used.load(Ordering::Acquire);
        if disk + incoming > disk_limit / 4 * 3 && disk > live.saturating_add(disk_limit / 8) {
            let _ = self.reclaim_requests.try_send(());
        }
        if disk + incoming > disk_limit {
            let mut fits = false;
            for thorough in [false, true] {
                match self.reclaim_unless_fits(db, thorough, incoming) {
                    Ok(true) => fits = true,
                    Ok(false) => {}
                    Err(e) => tracing::warn!("rocksdb-ssd: reclaiming space failed: {e}"),
                }
                if fits {
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
        // The filesystem may be smaller than the capacity, or shared with other
        // files: RocksDB must not meet ENOSPC itself. A WAL or flush write that
        // fails leaves the database refusing every write until it is reopened
        // (and Debian's librocksdb, built with assertions, aborts the process on
        // the next write to that WAL), so puts stop here first, with room left
        // for a flush.
        if let Some(free) = filesystem_available(&self.path) {
            if free < incoming.saturating_add(self.transient) {
                self.used.fetch_sub(incoming, Ordering::AcqRel);
                return Err(no_space(format!(
                    "the filesystem under the database has {} free, less than {} of values \
                     and {} of headroom for RocksDB's own files",
                    ByteSize(free),
                    ByteSize(incoming),
                    ByteSize(self.transient)
                ))
                .with_context("path", self.path.display()));
            }
        }
        Ok(())
    }

    /// Evicts values until `target` bytes are released; returns the bytes released.
    pub(super) fn evict(&self, target: u64) -> u64 {
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

    pub(super) fn delete_records(&self, keys: &[BlockKey]) -> Result<()> {
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
    pub(super) fn forget(&self, key: &BlockKey) -> bool {
        if let Some(meta) = self.index.remove(key) {
            self.used.fetch_sub(meta.charge, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}
