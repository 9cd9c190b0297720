//! Runs the shared conformance suite against the rocksdb-ssd backend: built
//! directly (WAL on and off), and opened from config through the registry
//! (which adds the contract-check and metrics layer users get). Each case
//! gets a fresh database in its own temporary directory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvpool_backend_rocksdb_ssd::{RocksDbSsdBackend, RocksDbSsdConfig};
use kvpool_conformance::Subject;
use kvpool_core::size::ByteSize;
use kvpool_core::{Config, KvBackend};
use tempfile::TempDir;

const CAPACITY: u64 = 64 << 20;

/// Every case's directory, deleted when the suite ends: cases close their
/// backends on their own schedule, so a directory cannot go with the case.
static DIRS: Mutex<Vec<TempDir>> = Mutex::new(Vec::new());

fn fresh_dir() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("kvpool-rocksdb-conformance-")
        .tempdir()
        .expect("a temporary directory");
    let path = dir.path().to_path_buf();
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
    path
}

fn direct(wal: bool) -> Subject {
    let name = if wal {
        "rocksdb_ssd"
    } else {
        "rocksdb_ssd_no_wal"
    };
    Subject::new(name, Some(CAPACITY), move || async move {
        let cfg = RocksDbSsdConfig {
            path: fresh_dir(),
            capacity: ByteSize(CAPACITY),
            wal,
            ..RocksDbSsdConfig::default()
        };
        let backend = tokio::task::spawn_blocking(move || RocksDbSsdBackend::open(cfg))
            .await
            .expect("open task")?;
        Ok(Arc::new(backend) as Arc<dyn KvBackend>)
    })
}

fn main() -> std::process::ExitCode {
    let code = kvpool_conformance::run_all(&[
        direct(true),
        direct(false),
        Subject::new("rocksdb_ssd_opened_from_config", Some(CAPACITY), || async {
            let config = Config::from_extra_config(serde_json::json!({
                "backend": "rocksdb-ssd",
                "rocksdb_ssd": { "path": fresh_dir(), "capacity": CAPACITY },
            }))?;
            kvpool_core::open(&config).await
        }),
    ]);
    DIRS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    code
}
