//! The RocksDB underneath: its options, the directory it lives in, its
//! errors in kvpool's terms, and closing it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kvpool_core::{Error, ErrorKind, Result};
use rocksdb::{BlockBasedOptions, Cache, ColumnFamily, DBRecoveryMode, FlushOptions, Options, DB};

use super::CF;
use crate::config::RocksDbSsdConfig;
use crate::SCHEME;

/// Memtables per database: one filling while others flush.
const MEMTABLES: u64 = 3;
/// RocksDB's fixed files: manifest (preallocated), info logs, options.
const FIXED_FILES: u64 = 3 << 19;
/// The share of blob files (oldest first) whose live values an in-line
/// reclaim relocates; see `reclaim`.
pub(super) const BLOB_GC_AGE_CUTOFF: f64 = 0.25;

/// The memtable size: memtables and the WAL hold values until a flush moves
/// them to blob files, so both are sized from the capacity, and a small
/// tier does not spend most of its bytes on them.
pub(super) fn write_buffer_for(capacity: u64) -> u64 {
    (capacity / 32).clamp(1 << 20, 64 << 20)
}

/// Bytes of the directory that RocksDB's own files may take at any moment:
/// a WAL per memtable (preallocated 10% past the memtable size), the output
/// of a flush in progress (its data still in the WAL too), and the fixed
/// files. Values get the rest of the capacity.
pub(super) fn reserved_bytes(capacity: u64) -> u64 {
    let wb = write_buffer_for(capacity);
    MEMTABLES * wb * 11 / 10 + wb + FIXED_FILES
}

pub(super) fn db_error(e: rocksdb::Error, op: &'static str) -> Error {
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

pub(super) fn join_error(e: tokio::task::JoinError, op: &'static str) -> Error {
    Error::new(
        ErrorKind::Unexpected,
        format!("the blocking RocksDB task failed: {e}"),
    )
    .with_operation(op)
}

pub(super) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| {
        Error::new(
            ErrorKind::Unexpected,
            format!("column family {name:?} is missing"),
        )
    })
}

/// Bytes the directory's files occupy on the device (allocated blocks, so
/// RocksDB's fallocate'd WAL and SST tails count too).
pub(super) fn directory_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(dir) = std::fs::read_dir(path) else {
        return 0;
    };
    dir.filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| (m.blocks() * 512).max(m.len()))
        .sum()
}

/// Bytes the filesystem holding `path` can still give an unprivileged writer,
/// or `None` when statvfs fails.
pub(super) fn filesystem_available(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `st` is only
    // read below, after statvfs reported that it filled it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    // Both are u64 here, narrower on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
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
pub(super) fn prepare_directory(cfg: &RocksDbSsdConfig) -> Result<()> {
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

pub(super) fn rocksdb_options(cfg: &RocksDbSsdConfig) -> Result<Options> {
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

pub(super) fn close_db(mut db: Arc<DB>, wal: bool) -> Result<()> {
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
