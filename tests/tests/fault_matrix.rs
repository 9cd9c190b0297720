//! The fault matrix (`kvpool_conformance::faults`) over every backend: real servers on
//! loopback (redis-server, mooncake_master, moto), RocksDB and local files on a small
//! tmpfs, timeouts of about a second so a stall shows within the test's patience.
//!
//! Prints the table at the end; `KVPOOL_FAULT_MATRIX_OUT=path` also writes it to a file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kvpool_backend_mooncake::{MooncakeBackend, MooncakeConfig};
use kvpool_backend_object::{ObjectBackend, ObjectConfig, HEADER_LEN};
use kvpool_backend_redis::{RedisBackend, RedisConfig};
use kvpool_backend_rocksdb_ssd::{RocksDbSsdBackend, RocksDbSsdConfig};
use kvpool_backend_tiered::{TieredBackend, TieredConfig};
use kvpool_conformance::faults::{self, Env, Fault, FaultSubject, ServerControl, Setup};
use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_conformance::fixtures::moto::{self, MotoServer};
use kvpool_conformance::fixtures::redis::RedisServer;
use kvpool_core::size::ByteSize;
use kvpool_core::{BlockKey, KvBackend};
// The tiered backend opens its tiers by name through the registry: link them.
use kvpool_backend_memory as _;

/// The backends' request timeouts in this suite.
const TIMEOUT: Duration = Duration::from_millis(1_000);

const SERVERLESS: &str = "in-process: no server to kill or stop (a killed process takes its \
                          callers with it)";

fn na(why: impl Into<String>) -> Setup {
    Setup::NotApplicable(why.into())
}

fn unique(what: &str) -> String {
    format!("{what}-{:016x}", rand::random::<u64>())
}

fn main() -> std::process::ExitCode {
    faults::run_matrix(vec![
        FaultSubject::new("memory", TIMEOUT, |f| async move {
            na(match f {
                Fault::Corrupt => {
                    "values live in this process's heap: nothing at rest to flip from outside"
                }
                Fault::DiskFull => "no disk",
                _ => SERVERLESS,
            })
        }),
        FaultSubject::new("redis", TIMEOUT, |f| async move {
            match f {
                Fault::DiskFull => na("redis holds values in memory (persistence off); \
                                       maxmemory is tested in backends/redis/tests/servers.rs"),
                _ => redis_env().await,
            }
        }),
        FaultSubject::new("mooncake", TIMEOUT, |f| async move {
            match f {
                Fault::DiskFull => na("values live in RAM segments (SSD offload is off)"),
                _ => mooncake_env().await,
            }
        }),
        FaultSubject::new("rocksdb-ssd", TIMEOUT, |f| async move {
            match f {
                Fault::Corrupt => rocksdb_corrupt_env(),
                Fault::DiskFull => rocksdb_disk_full_env(),
                _ => na(format!(
                    "{SERVERLESS}; a writer SIGKILLed 20 times is backends/rocksdb-ssd/tests/crash.rs"
                )),
            }
        }),
        FaultSubject::new("object (s3, moto)", TIMEOUT, |f| async move {
            match f {
                Fault::DiskFull => na("moto keeps objects in memory"),
                _ => s3_env().await,
            }
        }),
        FaultSubject::new("object (file://)", TIMEOUT, |f| async move {
            match f {
                Fault::Corrupt => object_file_env(None).await,
                Fault::DiskFull => match Tmpfs::mount(8 << 20) {
                    Ok(fs) => object_file_env(Some(fs)).await,
                    Err(e) => na(e),
                },
                _ => na(SERVERLESS),
            }
        }),
        FaultSubject::new("tiered (memory → redis)", TIMEOUT, |f| async move {
            match f {
                Fault::DiskFull => na("neither tier has a disk"),
                _ => tiered_env().await,
            }
        }),
    ])
}

// ---- redis ----

fn redis_config(server: &RedisServer, prefix: &str) -> RedisConfig {
    RedisConfig {
        url: Some(server.url()),
        key_prefix: prefix.into(),
        request_timeout_ms: TIMEOUT.as_millis() as u64,
        connect_timeout_ms: 300,
        retries: 2,
        ..RedisConfig::default()
    }
}

/// Flips one bit in the middle of each value, past the checksummed header, with
/// GETBIT/SETBIT: the value stays the same length, only its bytes change.
fn redis_flip(port: u16, redis_keys: &[String]) -> Result<(), String> {
    for k in redis_keys {
        let bit = (HEADER_LEN + 1_000) * 8 + 3;
        let old = redis_inline(port, &format!("GETBIT {k} {bit}"))?;
        let new = if old.trim() == ":1" { 0 } else { 1 };
        let set = redis_inline(port, &format!("SETBIT {k} {bit} {new}"))?;
        if !set.starts_with(':') {
            return Err(format!("SETBIT {k}: {set}"));
        }
    }
    Ok(())
}

fn redis_inline(port: u16, command: &str) -> Result<String, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect to redis: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "{command}\r\n").map_err(|e| e.to_string())?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

async fn redis_env() -> Setup {
    let server = RedisServer::plain();
    let prefix = format!("{}:", unique("faults"));
    let backend = match RedisBackend::connect(redis_config(&server, &prefix)).await {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to connect: {e}")),
    };
    let port = server.port();
    let mut env = Env::new(backend);
    env.corrupt = Some(Box::new(move |backend, keys| {
        let names: Vec<_> = keys
            .iter()
            .map(|k| format!("{prefix}{}", k.to_key_string()))
            .collect();
        Box::pin(async move { redis_flip(port, &names).map(|()| backend) })
    }));
    env.server = Some(Box::new(server));
    Setup::Run(env)
}

// ---- tiered: memory over redis ----

async fn tiered_open(url: &str, prefix: &str) -> kvpool_core::Result<Arc<dyn KvBackend>> {
    let cfg = TieredConfig {
        tiers: vec![
            serde_json::json!({"backend": "memory", "memory": {"capacity": "64MiB"}}),
            serde_json::json!({"backend": "redis", "redis": {
                "url": url, "key_prefix": prefix,
                "request_timeout_ms": TIMEOUT.as_millis() as u64,
                "connect_timeout_ms": 300, "retries": 2,
            }}),
        ],
        write_back_queue: 1024,
        promote: true,
        promote_max_inflight: ByteSize(64 << 20),
        retry_backoff_ms: 100,
        max_backoff_ms: 1_000,
    };
    Ok(Arc::new(TieredBackend::open(cfg).await?))
}

async fn tiered_env() -> Setup {
    let server = RedisServer::plain();
    let prefix = format!("{}:", unique("tiered"));
    let url = server.url();
    let backend = match tiered_open(&url, &prefix).await {
        Ok(b) => b,
        Err(e) => return na(format!("FAILED to open: {e}")),
    };
    let port = server.port();
    let mut env = Env::new(backend);
    // The memory tier would serve the intact copy; a new process (an empty memory tier)
    // reads the damaged one from redis.
    env.corrupt = Some(Box::new(move |backend, keys| {
        let names: Vec<_> = keys
            .iter()
            .map(|k| format!("{prefix}{}", k.to_key_string()))
            .collect();
        let (url, prefix) = (url.clone(), prefix.clone());
        Box::pin(async move {
            // Close flushes the write-back queue: every value is in redis after it.
            backend.close().await.map_err(|e| e.to_string())?;
            drop(backend);
            redis_flip(port, &names)?;
            tiered_open(&url, &prefix).await.map_err(|e| e.to_string())
        })
    }));
    env.server = Some(Box::new(server));
    Setup::Run(env)
}

// ---- mooncake ----

/// A master, a segment owner and a pure client in this process; the client is the
/// backend under test, so every value crosses the data plane.
async fn mooncake_env() -> Setup {
    let master = MooncakeMaster::start();
    let config = |segment: u64| MooncakeConfig {
        master_server_address: master.address(),
        global_segment_size: ByteSize(segment),
        local_hostname: "127.0.0.1".into(),
        rpc_timeout_ms: Some(TIMEOUT.as_millis() as u64),
        connect_timeout_ms: Some(300),
        transfer_timeout_ms: Some(TIMEOUT.as_millis() as u64),
        no_space_retry_ms: 300,
        // Off by default (values are raw for the official client); without it a flipped
        // byte in a segment reads back as it is.
        checksum: true,
        ..MooncakeConfig::default()
    };
    let owner = match MooncakeBackend::open(config(64 << 20)).await {
        Ok(b) => b,
        Err(e) => return na(format!("FAILED to open the owner: {e}")),
    };
    let client = match MooncakeBackend::open(config(0)).await {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to open the client: {e}")),
    };
    let metrics_port = master.metrics_port();
    let mut env = Env::new(client);
    env.corrupt = Some(Box::new(move |backend, keys| {
        Box::pin(async move { mooncake_flip(metrics_port, &keys).map(|()| backend) })
    }));
    env.server = Some(Box::new(master));
    env.keep.push(Box::new(owner));
    Setup::Run(env)
}

/// Asks the master's HTTP service where each value's replica lives and flips a byte
/// there. The segment belongs to the owner in this process, so the replica's buffer
/// address is an address of ours; it is written through /proc/self/mem, which fails
/// cleanly instead of faulting if the address were not mapped.
fn mooncake_flip(metrics_port: u16, keys: &[BlockKey]) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem")
        .map_err(|e| format!("/proc/self/mem: {e}"))?;
    for k in keys {
        let body = http_get(
            metrics_port,
            &format!("/query_key?key={}", k.to_key_string()),
        )?;
        let address = buffer_address(&body)
            .ok_or_else(|| format!("no buffer address in the master's answer: {body}"))?;
        let at = address + 1_000;
        let mut byte = [0u8];
        mem.read_exact_at(&mut byte, at)
            .map_err(|e| format!("read our segment at {at:#x}: {e}"))?;
        byte[0] ^= 0x20;
        mem.write_all_at(&byte, at)
            .map_err(|e| format!("write our segment at {at:#x}: {e}"))?;
    }
    Ok(())
}

/// The first `buffer_address` in the master's JSON (a number, or a hex string).
fn buffer_address(body: &str) -> Option<u64> {
    let at = body.find("buffer_address")?;
    let rest = body[at + "buffer_address".len()..].trim_start_matches(['"', ':', ' ', '_']);
    let rest = rest.trim_start_matches('"');
    if let Some(hex) = rest.strip_prefix("0x") {
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        return u64::from_str_radix(&hex[..end], 16).ok();
    }
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn http_get(port: u16, path: &str) -> Result<String, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    Ok(reply
        .split_once("\r\n\r\n")
        .map_or(reply.clone(), |(_, b)| b.to_string()))
}

// ---- rocksdb-ssd ----

fn rocksdb_config(path: &Path) -> RocksDbSsdConfig {
    RocksDbSsdConfig {
        path: path.to_path_buf(),
        capacity: ByteSize(1 << 30),
        ..RocksDbSsdConfig::default()
    }
}

fn rocksdb_corrupt_env() -> Setup {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => return na(format!("FAILED: a temporary directory: {e}")),
    };
    let path = dir.path().to_path_buf();
    let backend = match RocksDbSsdBackend::open(rocksdb_config(&path)) {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to open: {e}")),
    };
    let mut env = Env::new(backend);
    // Through RocksDB itself, so its own block checksums stay valid and only kvpool's
    // value checksum can tell.
    env.corrupt = Some(Box::new(move |backend, keys| {
        let path = path.clone();
        Box::pin(async move {
            backend.close().await.map_err(|e| e.to_string())?;
            drop(backend);
            {
                let db = rocksdb::DB::open_default(&path).map_err(|e| e.to_string())?;
                for k in &keys {
                    let mut record_key = vec![b'v'];
                    record_key.extend_from_slice(k.to_key_string().as_bytes());
                    let mut rec = db
                        .get(&record_key)
                        .map_err(|e| e.to_string())?
                        .ok_or("a record is missing")?;
                    let at = rec.len() - 1_000;
                    rec[at] ^= 0x04;
                    db.put(&record_key, rec).map_err(|e| e.to_string())?;
                }
            }
            let b = RocksDbSsdBackend::open(rocksdb_config(&path)).map_err(|e| e.to_string())?;
            Ok(Arc::new(b) as Arc<dyn KvBackend>)
        })
    }));
    env.keep.push(Box::new(dir));
    Setup::Run(env)
}

/// A tmpfs of a few MiB with a filler file in it: the backend's filesystem fills long
/// before the backend's own capacity (1 GiB) would, as when a disk is shared or smaller
/// than configured. Freeing space removes the filler.
fn rocksdb_disk_full_env() -> Setup {
    let fs = match Tmpfs::mount(24 << 20) {
        Ok(fs) => fs,
        Err(e) => return na(e),
    };
    let db = fs.path().join("db");
    // 64 MiB: more than the filesystem, and small enough that RocksDB's memtables
    // (capacity / 32) leave room to work in it.
    let cfg = RocksDbSsdConfig {
        capacity: ByteSize(64 << 20),
        ..rocksdb_config(&db)
    };
    let backend = match RocksDbSsdBackend::open(cfg) {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to open on the tmpfs: {e}")),
    };
    let mut env = Env::new(backend);
    env.free_disk = Some(fs.filler_remover());
    env.keep.push(Box::new(fs));
    Setup::Run(env)
}

/// A tmpfs mounted on a fresh directory, unmounted on drop; holds a filler file of a
/// third of its size. Mounting needs CAP_SYS_ADMIN; without it the cell says so.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    fn mount(size: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("kvpool-faults-tmpfs-")
            .tempdir_in("/var/tmp")
            .map_err(|e| format!("FAILED: a directory: {e}"))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount(8) to make a small filesystem: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let fs = Tmpfs { dir: Some(dir) };
        std::fs::write(fs.filler(), vec![0x5a; (size / 3) as usize])
            .map_err(|e| format!("FAILED: the filler file: {e}"))?;
        Ok(fs)
    }

    fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .map_or(Path::new("/nonexistent"), |d| d.path())
    }

    fn filler(&self) -> PathBuf {
        self.path().join("filler")
    }

    fn filler_remover(&self) -> faults::FreeDiskFn {
        let filler = self.filler();
        Box::new(move || std::fs::remove_file(&filler).map_err(|e| e.to_string()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Lazy: a file still open elsewhere must not keep the mount (and the test) alive.
            let _ = Command::new("umount").arg("-l").arg(dir.path()).status();
            drop(dir);
        }
    }
}

// ---- object ----

fn s3_config(moto: &MotoServer, bucket: &str) -> ObjectConfig {
    ObjectConfig {
        url: Some(format!("s3://{bucket}/pool")),
        endpoint: Some(moto.endpoint()),
        allow_http: true,
        access_key_id: Some(moto::ACCESS_KEY_ID.into()),
        secret_access_key: Some(moto::SECRET_ACCESS_KEY.into()),
        request_timeout_ms: TIMEOUT.as_millis() as u64,
        connect_timeout_ms: 300,
        retries: 2,
        ..ObjectConfig::default()
    }
}

/// moto keeps buckets in memory, so a restarted moto has none; a real store's bucket
/// outlives a server crash, so the bucket is made again.
struct MotoWithBucket {
    moto: MotoServer,
    bucket: String,
}

impl ServerControl for MotoWithBucket {
    fn kill(&mut self) {
        self.moto.kill();
    }
    fn restart(&mut self) {
        self.moto.restart();
        self.moto.create_bucket(&self.bucket);
    }
    fn pid(&self) -> Option<u32> {
        self.moto.pid()
    }
}

async fn s3_env() -> Setup {
    let moto = MotoServer::start();
    let bucket = unique("faults");
    moto.create_bucket(&bucket);
    let backend = match ObjectBackend::open(s3_config(&moto, &bucket)).await {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to open: {e}")),
    };
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id(moto::ACCESS_KEY_ID)
        .with_secret_access_key(moto::SECRET_ACCESS_KEY)
        .build();
    let raw = match raw {
        Ok(r) => Arc::new(r),
        Err(e) => return na(format!("FAILED: a raw S3 client: {e}")),
    };
    let mut env = Env::new(backend);
    env.corrupt = Some(Box::new(move |backend, keys| {
        let raw = raw.clone();
        Box::pin(async move {
            use object_store::{ObjectStoreExt, PutPayload};
            for k in keys {
                let name = object_store::path::Path::from("pool").join(k.to_key_string());
                let got = raw.get(&name).await.map_err(|e| e.to_string())?;
                let mut bytes = got.bytes().await.map_err(|e| e.to_string())?.to_vec();
                let at = HEADER_LEN + 1_000;
                bytes[at] ^= 0x40;
                raw.put(&name, PutPayload::from(bytes))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(backend)
        })
    }));
    env.server = Some(Box::new(MotoWithBucket { moto, bucket }));
    Setup::Run(env)
}

/// A `file://` store in a temporary directory, or on `fs` (a small tmpfs) when given.
async fn object_file_env(fs: Option<Tmpfs>) -> Setup {
    let (dir, keep): (PathBuf, Box<dyn std::any::Any + Send>) = match fs {
        Some(fs) => (fs.path().join("objects"), Box::new(fs)),
        None => match tempfile::tempdir() {
            Ok(d) => (d.path().to_path_buf(), Box::new(d)),
            Err(e) => return na(format!("FAILED: a temporary directory: {e}")),
        },
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return na(format!("FAILED: {}: {e}", dir.display()));
    }
    let cfg = ObjectConfig {
        url: Some(format!("file://{}", dir.display())),
        request_timeout_ms: TIMEOUT.as_millis() as u64,
        ..ObjectConfig::default()
    };
    let backend = match ObjectBackend::open(cfg).await {
        Ok(b) => Arc::new(b) as Arc<dyn KvBackend>,
        Err(e) => return na(format!("FAILED to open: {e}")),
    };
    let mut env = Env::new(backend);
    let files = dir.clone();
    env.corrupt = Some(Box::new(move |backend, keys| {
        let files = files.clone();
        Box::pin(async move {
            for k in keys {
                let hash = k.hash().to_hex();
                let path = walk(&files)
                    .into_iter()
                    .find(|p| p.to_string_lossy().ends_with(&hash))
                    .ok_or_else(|| format!("no file for {hash} under {}", files.display()))?;
                let mut bytes = std::fs::read(&path).map_err(|e| format!("{path:?}: {e}"))?;
                bytes[HEADER_LEN + 1_000] ^= 0x01;
                std::fs::write(&path, bytes).map_err(|e| e.to_string())?;
            }
            Ok(backend)
        })
    }));
    if let Some(fs) = keep.downcast_ref::<Tmpfs>() {
        env.free_disk = Some(fs.filler_remover());
    }
    env.keep.push(keep);
    Setup::Run(env)
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}
