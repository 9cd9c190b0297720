//! Tests that need a second process.
//!
//! - `sigkill_twenty_rounds`: a child writes continuously (WAL on and off in
//!   turn, with removes) and is killed with SIGKILL at a random
//!   moment, 20 times. After each kill the database must open without
//!   repair, every key that reads back must be byte-correct (the writer's
//!   content is a function of the key), nothing may read back as corrupted,
//!   and with the WAL on every batch the writer saw acknowledged must be there.
//! - `read_only_directory_is_a_clear_error`: as root, permission bits do not
//!   stop writes, so the open runs in a child that drops to `nobody`.
//!
//! The binary is its own child: `KVPOOL_ROCKSDB_CHILD` selects the role.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvpool_backend_rocksdb_ssd::{RocksDbSsdBackend, RocksDbSsdConfig};
use kvpool_core::size::ByteSize;
use kvpool_core::{
    BlockHash, BlockKey, GetOutcome, IoVec, IoVecMut, KvBackend, MemRegion, Namespace, PutOutcome,
};
use libtest_mimic::{Arguments, Failed, Trial};

const ROUNDS: u64 = 20;
/// Keys of round `r` are `r * STRIDE ..`: every round writes new keys.
const STRIDE: u64 = 1 << 32;
const BATCH: u64 = 4;
/// Room for every round's writes: an eviction may legitimately take the
/// newest values (the policy decides), which would hide a lost write.
/// Eviction under load is tested in `durability.rs` and the conformance suite.
const CAPACITY: u64 = 2 << 30;

fn key(i: u64) -> BlockKey {
    let ns = Arc::new(Namespace::single_rank("crash-model").unwrap());
    let mut h = [0xc3u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    BlockKey::new(ns, BlockHash(h))
}

/// 16 KiB to ~200 KiB, not a multiple of anything in particular.
fn len_of(i: u64) -> usize {
    (16 << 10) + (i % 11) as usize * 17_011 + (i % 3) as usize
}

fn value(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len_of(i))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(path: &Path, wal: bool) -> RocksDbSsdConfig {
    RocksDbSsdConfig {
        path: path.to_path_buf(),
        capacity: ByteSize(CAPACITY),
        wal,
        ..RocksDbSsdConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// The writer: batches of new keys forever, printing `ack N` once batch N
/// (keys `N*BATCH ..`) is stored; every 7th batch also removes an older key.
fn writer(dir: &Path, round: u64, wal: bool) -> ExitCode {
    // The writer never stops by itself: it must die with the test.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no
    // memory effects.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        println!("prctl failed: {}", std::io::Error::last_os_error());
        return ExitCode::FAILURE;
    }
    let rt = runtime();
    rt.block_on(async {
        let b = match RocksDbSsdBackend::open(config(dir, wal)) {
            Ok(b) => b,
            Err(e) => {
                println!("open failed: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("ready");
        let base = round * STRIDE;
        for n in 0u64.. {
            let items = (0..BATCH)
                .map(|j| {
                    let i = base + n * BATCH + j;
                    (key(i), IoVec::whole(&MemRegion::from_vec(value(i))))
                })
                .collect();
            match b.put(items).await {
                Ok(out) if out.iter().all(|o| matches!(o, PutOutcome::Stored)) => {
                    println!("ack {n}");
                }
                Ok(out) => println!("put outcome {out:?}"),
                Err(e) => println!("put failed: {e}"),
            }
            if n % 7 == 6 {
                let _ = b.remove(&[key(base + (n - 3) * BATCH)]).await;
            }
        }
        ExitCode::SUCCESS
    })
}

/// Which keys each round wrote: `(round, batches acknowledged or maybe written)`.
struct Written {
    rounds: Vec<(u64, u64)>,
}

fn verify(dir: &Path, written: &Written, last_acked: Option<(u64, u64)>) -> Result<u64, Failed> {
    let rt = runtime();
    rt.block_on(async {
        let started = Instant::now();
        let b = RocksDbSsdBackend::open(config(dir, true))
            .map_err(|e| format!("reopen after SIGKILL failed: {e}"))?;
        let opened_in = started.elapsed();
        let mut hits = 0;
        for &(round, batches) in &written.rounds {
            let keys: Vec<u64> = (0..batches * BATCH).map(|k| round * STRIDE + k).collect();
            for chunk in keys.chunks(64) {
                let lens = b
                    .value_lens(&chunk.iter().map(|&i| key(i)).collect::<Vec<_>>())
                    .await
                    .map_err(|e| e.to_string())?;
                let present: Vec<(u64, usize)> = chunk
                    .iter()
                    .zip(lens)
                    .filter_map(|(&i, l)| l.map(|l| (i, l)))
                    .collect();
                for &(i, l) in &present {
                    if l != len_of(i) {
                        return Err(format!("key {i}: length {l}, wrote {}", len_of(i)).into());
                    }
                }
                let regions: Vec<_> = present.iter().map(|&(_, l)| MemRegion::alloc(l)).collect();
                let batch = present
                    .iter()
                    .zip(&regions)
                    .map(|(&(i, _), r)| (key(i), IoVecMut::whole(r)))
                    .collect();
                let out = b.get_into(batch).await.map_err(|e| e.to_string())?;
                for ((o, r), &(i, _)) in out.iter().zip(&regions).zip(&present) {
                    match o {
                        GetOutcome::Hit => {
                            if r.read(0, r.len()).unwrap() != value(i) {
                                return Err(format!("key {i} read back wrong bytes").into());
                            }
                            hits += 1;
                        }
                        GetOutcome::Miss => {}
                        GetOutcome::Failed(e) => {
                            return Err(format!("key {i} after SIGKILL: {e}").into())
                        }
                    }
                }
            }
        }
        if let Some((round, n)) = last_acked {
            let keys: Vec<_> = (0..BATCH)
                .map(|j| key(round * STRIDE + n * BATCH + j))
                .collect();
            let present = b.exists(&keys).await.map_err(|e| e.to_string())?;
            if present.iter().any(|p| !p) {
                return Err(format!(
                    "round {round}: batch {n} was acknowledged with the WAL on but is gone: {present:?}"
                )
                .into());
            }
        }
        // Measured at rest: a compaction holds its inputs until it ends.
        b.wait_for_background_work(Duration::from_secs(30));
        if b.disk_bytes() > CAPACITY {
            return Err(format!(
                "{} bytes on disk over {CAPACITY}: {}",
                b.disk_bytes(),
                listing(dir)
            )
            .into());
        }
        b.close().await.map_err(|e| e.to_string())?;
        if opened_in > Duration::from_secs(30) {
            return Err(format!("reopen took {opened_in:?}").into());
        }
        Ok(hits)
    })
}

/// `name:bytes` of every file, for failure messages.
fn listing(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let m = e.metadata().ok()?;
                Some(format!(
                    "{}:{}",
                    e.file_name().to_string_lossy(),
                    m.blocks() * 512
                ))
            })
            .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.join(" ")
}

fn sigkill_twenty_rounds() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut written = Written { rounds: Vec::new() };
    // A fixed seed: a failing round can be replayed.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    for round in 0..ROUNDS {
        let wal = round % 4 != 3;
        let mut child = Command::new(&exe)
            .env("KVPOOL_ROCKSDB_CHILD", "writer")
            .env("KVPOOL_ROCKSDB_DIR", dir.path())
            .env("KVPOOL_ROCKSDB_ROUND", round.to_string())
            .env("KVPOOL_ROCKSDB_WAL", wal.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| format!("round {round}: the writer never got ready"))?;
        if first != "ready" {
            let _ = child.kill();
            return Err(format!("round {round}: writer said {first:?}").into());
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(30 + rng % 400));
        child.kill().map_err(|e| e.to_string())?; // SIGKILL
        let status = child.wait().map_err(|e| e.to_string())?;
        let _ = reader.join();
        let mut acked = None;
        for line in rx.try_iter() {
            if let Some(n) = line.strip_prefix("ack ") {
                acked = n.parse::<u64>().ok();
            } else {
                return Err(format!("round {round}: writer said {line:?}").into());
            }
        }
        // Batches past the last acknowledged one may have been written.
        let batches = acked.map_or(0, |n| n + 1) + 2;
        written.rounds.push((round, batches));
        let must_have = if wal { acked.map(|n| (round, n)) } else { None };
        let hits = verify(dir.path(), &written, must_have)
            .map_err(|e| format!("round {round} (wal {wal}): {}", e.message().unwrap_or("")))?;
        eprintln!(
            "round {round:2}: wal {wal:5}, killed ({status}) after batch {acked:?}, {hits} keys read back intact"
        );
    }
    Ok(())
}

fn read_only_child(dir: &Path) -> ExitCode {
    match RocksDbSsdBackend::open(config(&dir.join("db"), true)) {
        Ok(_) => println!("opened"),
        Err(e) => println!("{}|{e}", e.kind()),
    }
    ExitCode::SUCCESS
}

fn read_only_directory_is_a_clear_error() -> Result<(), Failed> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555))
        .map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.env("KVPOOL_ROCKSDB_CHILD", "read-only")
        .env("KVPOOL_ROCKSDB_DIR", &ro);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Root writes through permission bits: open as `nobody`.
        cmd.uid(65534).gid(65534);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let text = text.trim();
    let Some((kind, message)) = text.split_once('|') else {
        return Err(format!(
            "expected an error, the child said {text:?} (stderr {:?})",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    };
    if kind != "config_invalid"
        || !message.contains("rocksdb_ssd.path")
        || !message.contains("Permission denied")
    {
        return Err(format!("unclear error: {text}").into());
    }
    Ok(())
}

fn main() -> ExitCode {
    let dir = std::env::var_os("KVPOOL_ROCKSDB_DIR");
    match (std::env::var("KVPOOL_ROCKSDB_CHILD").as_deref(), dir) {
        (Ok("writer"), Some(dir)) => {
            let round = std::env::var("KVPOOL_ROCKSDB_ROUND")
                .ok()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            let wal = std::env::var("KVPOOL_ROCKSDB_WAL").as_deref() != Ok("false");
            return writer(Path::new(&dir), round, wal);
        }
        (Ok("read-only"), Some(dir)) => return read_only_child(Path::new(&dir)),
        _ => {}
    }
    let args = Arguments::from_args();
    let trials = vec![
        Trial::test("sigkill_twenty_rounds", sigkill_twenty_rounds),
        Trial::test(
            "read_only_directory_is_a_clear_error",
            read_only_directory_is_a_clear_error,
        ),
    ];
    libtest_mimic::run(&args, trials).exit_code()
}
