//! Persistence, integrity, on-disk capacity and bad input. (The SIGKILL
//! crash test and the read-only directory test run child processes and live
//! in `crash.rs`.)

use std::path::Path;
use std::sync::Arc;

use kvpool_backend_rocksdb_ssd::{RocksDbSsdBackend, RocksDbSsdConfig};
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BlockHash, BlockKey, Config, ErrorKind, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion,
    Namespace, PutOutcome,
};

fn key(i: u64) -> BlockKey {
    let ns = Arc::new(Namespace::single_rank("durability-model").unwrap());
    let mut h = [0x5au8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockKey::new(ns, BlockHash(h))
}

/// Deterministic, incompressible-looking bytes of value `i`.
fn value(i: u64, len: usize) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(path: &Path, capacity: u64, wal: bool) -> RocksDbSsdConfig {
    RocksDbSsdConfig {
        path: path.to_path_buf(),
        capacity: ByteSize(capacity),
        wal,
        ..RocksDbSsdConfig::default()
    }
}

async fn put(b: &dyn KvBackend, items: &[(u64, usize)]) -> Vec<PutOutcome> {
    let batch = items
        .iter()
        .map(|&(i, len)| (key(i), IoVec::whole(&MemRegion::from_vec(value(i, len)))))
        .collect();
    b.put(batch).await.unwrap()
}

/// Each value read back, or the outcome that was not a hit.
async fn get(b: &dyn KvBackend, items: &[(u64, usize)]) -> Vec<Result<Vec<u8>, GetOutcome>> {
    let regions: Vec<_> = items
        .iter()
        .map(|&(_, len)| MemRegion::alloc(len))
        .collect();
    let batch = items
        .iter()
        .zip(&regions)
        .map(|(&(i, _), r)| (key(i), IoVecMut::whole(r)))
        .collect();
    let out = b.get_into(batch).await.unwrap();
    out.into_iter()
        .zip(&regions)
        .map(|(o, r)| match o {
            GetOutcome::Hit => Ok(r.read(0, r.len()).unwrap()),
            other => Err(other),
        })
        .collect()
}

#[tokio::test]
async fn values_survive_close_and_reopen_with_and_without_wal() {
    for wal in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let items: Vec<(u64, usize)> = (0..40).map(|i| (i, 1000 + 7919 * i as usize)).collect();
        let b = RocksDbSsdBackend::open(config(dir.path(), 256 << 20, wal)).unwrap();
        for o in put(&b, &items).await {
            assert!(matches!(o, PutOutcome::Stored), "wal {wal}: {o:?}");
        }
        b.remove(&[key(3)]).await.unwrap();
        b.close().await.unwrap();

        let b = RocksDbSsdBackend::open(config(dir.path(), 256 << 20, wal)).unwrap();
        let lens = b
            .value_lens(&items.iter().map(|&(i, _)| key(i)).collect::<Vec<_>>())
            .await
            .unwrap();
        for (&(i, len), got) in items.iter().zip(&lens) {
            let want = if i == 3 { None } else { Some(len) };
            assert_eq!(*got, want, "wal {wal}: length of key {i} after reopen");
        }
        for (&(i, len), got) in items.iter().zip(get(&b, &items).await) {
            match got {
                Ok(bytes) => assert!(bytes == value(i, len), "wal {wal}: key {i} differs"),
                Err(GetOutcome::Miss) if i == 3 => {}
                Err(o) => panic!("wal {wal}: key {i}: {o:?}"),
            }
        }
        // A re-put after reopen is recognised.
        assert!(matches!(put(&b, &items[..1]).await[0], PutOutcome::Exists));
        b.close().await.unwrap();
    }
}

fn record_key(i: u64) -> Vec<u8> {
    let mut k = vec![b'v'];
    k.extend_from_slice(key(i).to_key_string().as_bytes());
    k
}

/// A byte flipped in a stored value behind the backend's back (written
/// through RocksDB, so RocksDB's own checksums are fine) is caught by the
/// xxh3 check: a Corrupted outcome, counted in metrics, the key dropped.
#[tokio::test]
async fn flipped_byte_written_behind_the_backend_is_corrupted_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let len = 64 << 10;
    let b = RocksDbSsdBackend::open(config(dir.path(), 64 << 20, true)).unwrap();
    put(&b, &[(1, len), (2, len)]).await;
    b.close().await.unwrap();
    drop(b);

    {
        let db = rocksdb::DB::open_default(dir.path()).unwrap();
        let mut rec = db
            .get(record_key(1))
            .unwrap()
            .expect("the record is stored");
        let at = rec.len() - len + 1234;
        rec[at] ^= 0x10;
        db.put(record_key(1), rec).unwrap();
    }

    let config = Config::from_extra_config(serde_json::json!({
        "backend": "rocksdb-ssd",
        "rocksdb_ssd": { "path": dir.path(), "capacity": "64MiB" },
    }))
    .unwrap();
    let pool = kvpool_core::open(&config).await.unwrap();
    let got = get(pool.as_ref(), &[(1, len), (2, len)]).await;
    match &got[0] {
        Err(GetOutcome::Failed(e)) => {
            assert_eq!(e.kind(), ErrorKind::Corrupted, "{e}");
            assert!(e.to_string().contains("xxh3 checksum mismatch"), "{e}");
        }
        other => panic!("a flipped byte must not read back: {other:?}"),
    }
    assert!(got[1].as_ref().is_ok_and(|v| *v == value(2, len)));
    assert_eq!(pool.exists(&[key(1), key(2)]).await.unwrap(), [false, true]);
    let metrics = kvpool_core::metrics::global().encode();
    assert!(
        metrics.lines().any(|l| l.starts_with("kvpool_errors_total")
            && l.contains("backend=\"rocksdb-ssd\"")
            && l.contains("kind=\"corrupted\"")
            && l.ends_with(" 1")),
        "{metrics}"
    );
    pool.close().await.unwrap();
    drop(pool);

    // Dropped for good: it is gone after a reopen too.
    let b = RocksDbSsdBackend::open(self::config(dir.path(), 64 << 20, true)).unwrap();
    assert_eq!(b.value_lens(&[key(1)]).await.unwrap(), [None]);
    b.close().await.unwrap();
}

/// Bit rot in a blob file (RocksDB's own file, changed on disk) is caught
/// too, by RocksDB's blob checksum or by ours, and never read back.
#[tokio::test]
async fn flipped_byte_in_a_blob_file_on_disk_is_corrupted() {
    let dir = tempfile::tempdir().unwrap();
    let len = 256 << 10;
    // Without WAL, close flushes, so the value is in a blob file.
    let b = RocksDbSsdBackend::open(config(dir.path(), 64 << 20, false)).unwrap();
    put(&b, &[(7, len)]).await;
    b.close().await.unwrap();
    drop(b);

    let needle = &value(7, len)[..64];
    let mut flipped = 0;
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "blob") {
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                bytes[at + 100_000] ^= 0x01;
                std::fs::write(&path, bytes).unwrap();
                flipped += 1;
            }
        }
    }
    assert_eq!(flipped, 1, "the value is in exactly one blob file");

    let b = RocksDbSsdBackend::open(config(dir.path(), 64 << 20, false)).unwrap();
    match get(&b, &[(7, len)]).await.remove(0) {
        Err(GetOutcome::Failed(e)) => assert_eq!(e.kind(), ErrorKind::Corrupted, "{e}"),
        other => panic!("bit rot must not read back: {:?}", other.map(|v| v.len())),
    }
    assert_eq!(b.corrupted_values(), 1);
    assert_eq!(b.exists(&[key(7)]).await.unwrap(), [false]);
    b.close().await.unwrap();
}

/// Writing four times the capacity keeps the directory itself under
/// capacity, not only the sum of the values.
#[tokio::test]
async fn bytes_on_disk_stay_under_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 32 << 20;
    let len = 256 << 10;
    let b = RocksDbSsdBackend::open(config(dir.path(), capacity, true)).unwrap();
    let mut peak = 0;
    for batch in 0..64u64 {
        let items: Vec<_> = (0..8).map(|j| (batch * 8 + j, len)).collect();
        for o in put(&b, &items).await {
            assert!(matches!(o, PutOutcome::Stored), "batch {batch}: {o:?}");
        }
        // Measured at rest: a compaction holds its inputs until it ends.
        b.wait_for_background_work(std::time::Duration::from_secs(30));
        peak = peak.max(b.disk_bytes());
        if b.disk_bytes() > capacity {
            for e in std::fs::read_dir(dir.path()).unwrap() {
                let e = e.unwrap();
                use std::os::unix::fs::MetadataExt;
                let m = e.metadata().unwrap();
                eprintln!(
                    "{:?} len {} alloc {}",
                    e.file_name(),
                    m.len(),
                    m.blocks() * 512
                );
            }
        }
        assert!(
            b.disk_bytes() <= capacity,
            "batch {batch}: {} on disk over a capacity of {capacity}",
            b.disk_bytes()
        );
        assert!(b.used_bytes() <= capacity);
    }
    // The newest batch is whole and correct.
    let newest: Vec<_> = (504..512).map(|i| (i, len)).collect();
    for (&(i, len), got) in newest.iter().zip(get(&b, &newest).await) {
        assert!(got.is_ok_and(|v| v == value(i, len)), "key {i}");
    }
    assert!(
        peak > capacity / 2,
        "the test filled the disk ({peak} bytes)"
    );
    b.close().await.unwrap();
}

/// Foreign bytes in the directory leave no room: puts fail with NoSpace
/// (temporary) instead of growing past capacity, and succeed once the room
/// is back.
#[tokio::test]
async fn a_full_directory_gives_no_space_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let capacity: u64 = 32 << 20;
    let b = RocksDbSsdBackend::open(config(dir.path(), capacity, true)).unwrap();
    let filler = dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; (capacity - (1 << 20)) as usize]).unwrap();
    // The backend re-measures its directory at most every 200 ms.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let out = put(&b, &[(1, 2 << 20), (2, 2 << 20)]).await;
    for o in &out {
        match o {
            PutOutcome::Failed(e) => {
                assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
                assert!(e.is_temporary(), "{e}");
            }
            other => panic!("expected NoSpace, got {other:?}"),
        }
    }
    assert_eq!(b.exists(&[key(1), key(2)]).await.unwrap(), [false, false]);
    std::fs::remove_file(&filler).unwrap();
    for o in put(&b, &[(1, 2 << 20), (2, 2 << 20)]).await {
        assert!(matches!(o, PutOutcome::Stored), "{o:?}");
    }

    // A value larger than the capacity can never fit: permanent.
    let big = put(&b, &[(3, (b.value_capacity_bytes() / 2) as usize + 1)]).await;
    match &big[0] {
        PutOutcome::Failed(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
            assert!(e.to_string().contains("max_value_size"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    b.close().await.unwrap();
}

#[tokio::test]
async fn bad_input_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();

    // A path that is a file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = RocksDbSsdBackend::open(config(&file, 64 << 20, true)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("is not a directory"), "{err}");
    assert!(err.to_string().contains("a-file"), "{err}");

    // A path under a file cannot be created.
    let err = RocksDbSsdBackend::open(config(&file.join("db"), 64 << 20, true)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("rocksdb_ssd.path"), "{err}");

    // Capacity zero, through the config path users take.
    let open = |capacity: serde_json::Value| {
        let path = dir.path().join("db");
        async move {
            let config = Config::from_extra_config(serde_json::json!({
                "backend": "rocksdb-ssd",
                "rocksdb_ssd": { "path": path, "capacity": capacity },
            }))?;
            kvpool_core::open(&config).await
        }
    };
    let err = open(serde_json::json!(0)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("rocksdb_ssd.capacity"), "{err}");

    // A malformed size names the key and the value.
    let err = open(serde_json::json!("12XB")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("rocksdb_ssd.capacity") && msg.contains("12XB"),
        "{msg}"
    );

    // No path at all.
    let config = Config::from_extra_config(serde_json::json!({"backend": "rocksdb-ssd"})).unwrap();
    let err = kvpool_core::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    assert!(err.to_string().contains("rocksdb_ssd.path"), "{err}");

    // An unknown key is named.
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "rocksdb-ssd",
        "rocksdb_ssd": { "path": dir.path(), "capacty": "1GiB" },
    }));
    let err = match config {
        Ok(c) => kvpool_core::open(&c).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(err.to_string().contains("capacty"), "{err}");

    // Two backends on one directory: the second is told why.
    let first = RocksDbSsdBackend::open(config_at(dir.path())).unwrap();
    let err = RocksDbSsdBackend::open(config_at(dir.path())).unwrap_err();
    assert!(err.to_string().contains("another process"), "{err}");
    first.close().await.unwrap();
    // Closed, the directory is free again.
    RocksDbSsdBackend::open(config_at(dir.path()))
        .unwrap()
        .close()
        .await
        .unwrap();
}

fn config_at(path: &Path) -> RocksDbSsdConfig {
    config(&path.join("shared"), 64 << 20, true)
}
