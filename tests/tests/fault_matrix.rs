//! The fault matrix (`kvpool_conformance::faults`) over every backend: real servers on
//! loopback (redis-server, mooncake_master, moto), RocksDB and local files on a small
//! tmpfs, timeouts of about a second so a stall shows within the test's patience.
//!
//! Prints the table at the end; `KVPOOL_FAULT_MATRIX_OUT=path` also writes it to a file.

use std::fmt::Display;
use std::future::Future;
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

/// A cell's setup: run against `env`, or, where it could not be made, say why.
fn setup(env: Result<Env, String>) -> Setup {
    match env {
        Ok(env) => Setup::Run(env),
        Err(why) => na(why),
    }
}

/// For `map_err` in a setup: the error as `{what}: {e}`.
fn failed<E: Display>(what: impl Display) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// The backend `open` gave, shared, or `{what}: {e}`.
fn opened(
    open: kvpool_core::Result<impl KvBackend>,
    what: &str,
) -> Result<Arc<dyn KvBackend>, String> {
    Ok(Arc::new(open.map_err(failed(what))?))
}

/// A backend behind a server: every fault but a full disk (`no_disk` says why not) runs
/// against a fresh `env()`.
fn served<F, Fut>(name: &'static str, no_disk: &'static str, env: F) -> FaultSubject
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Env, String>> + Send + 'static,
{
    FaultSubject::new(name, TIMEOUT, move |f| {
        // Not started unless awaited.
        let env = env();
        async move {
            match f {
                Fault::DiskFull => na(no_disk),
                _ => setup(env.await),
            }
        }
    })
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
        served(
            "redis",
            "redis holds values in memory (persistence off); maxmemory is tested in \
             backends/redis/tests/servers.rs",
            redis_env,
        ),
        served(
            "mooncake",
            "values live in RAM segments (SSD offload is off)",
            mooncake_env,
        ),
        FaultSubject::new("rocksdb-ssd", TIMEOUT, |f| async move {
            match f {
                Fault::Corrupt => setup(rocksdb_corrupt_env()),
                Fault::DiskFull => setup(rocksdb_disk_full_env()),
                _ => na(format!(
                    "{SERVERLESS}; a writer SIGKILLed 20 times is backends/rocksdb-ssd/tests/crash.rs"
                )),
            }
        }),
        served("object (s3, moto)", "moto keeps objects in memory", s3_env),
        FaultSubject::new("object (file://)", TIMEOUT, |f| async move {
            match f {
                Fault::Corrupt => setup(object_file_env(None).await),
                Fault::DiskFull => match Tmpfs::mount(8 << 20) {
                    Ok(fs) => setup(object_file_env(Some(fs)).await),
                    Err(e) => na(e),
                },
                _ => na(SERVERLESS),
            }
        }),
        served(
            "tiered (memory → redis)",
            "neither tier has a disk",
            tiered_env,
        ),
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

/// The redis keys of `keys` under `prefix`.
fn redis_names(prefix: &str, keys: &[BlockKey]) -> Vec<String> {
    keys.iter()
        .map(|k| format!("{prefix}{}", k.to_key_string()))
        .collect()
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

async fn redis_env() -> Result<Env, String> {
    let server = RedisServer::plain();
    let prefix = format!("{}:", unique("faults"));
    let backend = opened(
        RedisBackend::connect(redis_config(&server, &prefix)).await,
        "FAILED to connect",
    )?;
    let port = server.port();
    Ok(Env::new(backend)
        .with_corrupt(move |backend, keys| {
            let names = redis_names(&prefix, &keys);
            async move { redis_flip(port, &names).map(|()| backend) }
        })
        .with_server(server))
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

async fn tiered_env() -> Result<Env, String> {
    let server = RedisServer::plain();
    let prefix = format!("{}:", unique("tiered"));
    let url = server.url();
    let backend = tiered_open(&url, &prefix)
        .await
        .map_err(failed("FAILED to open"))?;
    let port = server.port();
    // The memory tier would serve the intact copy; a new process (an empty memory tier)
    // reads the damaged one from redis.
    Ok(Env::new(backend)
        .with_corrupt(move |backend, keys| {
            let names = redis_names(&prefix, &keys);
            let (url, prefix) = (url.clone(), prefix.clone());
            async move {
                // Close flushes the write-back queue: every value is in redis after it.
                backend.close().await.map_err(|e| e.to_string())?;
                drop(backend);
                redis_flip(port, &names)?;
                tiered_open(&url, &prefix).await.map_err(|e| e.to_string())
            }
        })
        .with_server(server))
}

// ---- mooncake ----

/// A master, a segment owner and a pure client in this process; the client is the
/// backend under test, so every value crosses the data plane.
async fn mooncake_env() -> Result<Env, String> {
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
    let owner = MooncakeBackend::open(config(64 << 20))
        .await
        .map_err(failed("FAILED to open the owner"))?;
    let client = opened(
        MooncakeBackend::open(config(0)).await,
        "FAILED to open the client",
    )?;
    let metrics_port = master.metrics_port();
    Ok(Env::new(client)
        .with_corrupt(move |backend, keys| async move {
            mooncake_flip(metrics_port, &keys).map(|()| backend)
        })
        .with_server(master)
        .keeping(owner))
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

fn rocksdb_corrupt_env() -> Result<Env, String> {
    let dir = tempfile::tempdir().map_err(failed("FAILED: a temporary directory"))?;
    let path = dir.path().to_path_buf();
    let backend = opened(
        RocksDbSsdBackend::open(rocksdb_config(&path)),
        "FAILED to open",
    )?;
    // Through RocksDB itself, so its own block checksums stay valid and only kvpool's
    // value checksum can tell.
    let env = Env::new(backend).with_corrupt(move |backend, keys| {
        let path = path.clone();
        async move {
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
        }
    });
    Ok(env.keeping(dir))
}

/// A tmpfs of a few MiB with a filler file in it: the backend's filesystem fills long
/// before the backend's own capacity (1 GiB) would, as when a disk is shared or smaller
/// than configured. Freeing space removes the filler.
fn rocksdb_disk_full_env() -> Result<Env, String> {
    let fs = Tmpfs::mount(24 << 20)?;
    let db = fs.path().join("db");
    // 64 MiB: more than the filesystem, and small enough that RocksDB's memtables
    // (capacity / 32) leave room to work in it.
    let cfg = RocksDbSsdConfig {
        capacity: ByteSize(64 << 20),
        ..rocksdb_config(&db)
    };
    let backend = opened(RocksDbSsdBackend::open(cfg), "FAILED to open on the tmpfs")?;
    let mut env = Env::new(backend);
    env.free_disk = Some(fs.filler_remover());
    Ok(env.keeping(fs))
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

async fn s3_env() -> Result<Env, String> {
    let moto = MotoServer::start();
    let bucket = unique("faults");
    moto.create_bucket(&bucket);
    let backend = opened(
        ObjectBackend::open(s3_config(&moto, &bucket)).await,
        "FAILED to open",
    )?;
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(moto.endpoint())
        .with_bucket_name(&bucket)
        .with_region("us-east-1")
        .with_allow_http(true)
        .with_access_key_id(moto::ACCESS_KEY_ID)
        .with_secret_access_key(moto::SECRET_ACCESS_KEY)
        .build()
        .map_err(failed("FAILED: a raw S3 client"))?;
    let raw = Arc::new(raw);
    let env = Env::new(backend).with_corrupt(move |backend, keys| {
        let raw = raw.clone();
        async move {
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
        }
    });
    Ok(env.with_server(MotoWithBucket { moto, bucket }))
}

/// A `file://` store in a temporary directory, or on `fs` (a small tmpfs) when given.
async fn object_file_env(fs: Option<Tmpfs>) -> Result<Env, String> {
    let (dir, keep): (PathBuf, Box<dyn std::any::Any + Send>) = match fs {
        Some(fs) => (fs.path().join("objects"), Box::new(fs)),
        None => {
            let d = tempfile::tempdir().map_err(failed("FAILED: a temporary directory"))?;
            (d.path().to_path_buf(), Box::new(d))
        }
    };
    std::fs::create_dir_all(&dir).map_err(failed(format!("FAILED: {}", dir.display())))?;
    let cfg = ObjectConfig {
        url: Some(format!("file://{}", dir.display())),
        request_timeout_ms: TIMEOUT.as_millis() as u64,
        ..ObjectConfig::default()
    };
    let backend = opened(ObjectBackend::open(cfg).await, "FAILED to open")?;
    let files = dir.clone();
    let mut env = Env::new(backend).with_corrupt(move |backend, keys| {
        let files = files.clone();
        async move {
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
        }
    });
    if let Some(fs) = keep.downcast_ref::<Tmpfs>() {
        env.free_disk = Some(fs.filler_remover());
    }
    env.keep.push(keep);
    Ok(env)
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
