//! The lookup service: the scheduler asks worker rank 0 how much of a prompt the pool holds.
//!
//! The scheduler process has no backend of its own (with Mooncake, the client lives in the
//! worker), so it sends the request's block hashes over a local socket and worker rank 0 checks
//! every rank's keys with one batch `exists`. The socket is
//! `$VLLM_RPC_BASE_PATH/kvpool_lookup_rpc_port_{port}_dp_rank{dp}` (the system temporary
//! directory when unset), like Ascend Store's path with a `kvpool_` prefix so the two never
//! collide on one host.
//!
//! Unlike Ascend Store, the client has a timeout: a dead or stuck worker makes lookups misses
//! (logged), it does not hang the scheduler. Frames are bounded both ways.
//!
//! Request: `b"KVPL"`, version `1`, `u32` token count, `u32` block count `n`, `n` × 32-byte
//! hashes (integers little-endian). Reply: `b"KVPL"`, status `0` and a `u32` hit token count,
//! or status `1`, a `u32` length and a UTF-8 error message. A reset of the pool (vLLM's
//! `reset_cache`) is the same head with version `2` and both counts 0; its reply's value is 1
//! when something was cleared, 0 when nothing was in scope.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::key::BlockHash;

const MAGIC: &[u8; 4] = b"KVPL";
const VERSION: u8 = 1;
const VERSION_RESET: u8 = 2;
/// At most this many blocks per lookup (8 MiB of hashes): millions of tokens at any block size.
pub const MAX_BLOCKS: usize = 1 << 18;
const MAX_ERROR_LEN: usize = 4096;

/// The socket path for `lookup_rpc_port` and data-parallel rank `dp_rank` under `base`
/// (`VLLM_RPC_BASE_PATH`; `None` = the system temporary directory).
pub fn socket_path(base: Option<&Path>, port: u32, dp_rank: u32) -> PathBuf {
    let base = base
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("kvpool_lookup_rpc_port_{port}_dp_rank{dp_rank}"))
}

/// The path from the environment, as vLLM computes its own RPC paths.
pub fn socket_path_from_env(port: u32, dp_rank: u32) -> PathBuf {
    let base = std::env::var_os("VLLM_RPC_BASE_PATH").map(PathBuf::from);
    socket_path(base.as_deref(), port, dp_rank)
}

/// What the service answers with.
#[async_trait]
pub trait LookupHandler: Send + Sync + 'static {
    /// How many of the first `token_len` tokens the pool holds on every rank, given the
    /// hashes of the blocks that cover them.
    async fn lookup(&self, token_len: usize, hashes: &[BlockHash]) -> Result<usize>;

    /// Clears the pool as vLLM's `reset_cache` asks; whether anything was in scope.
    async fn reset(&self) -> Result<bool> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "this lookup service cannot reset the pool",
        ))
    }
}

/// The serving side, owned by worker rank 0. Dropping it stops the service and removes the
/// socket file.
#[derive(Debug)]
pub struct LookupServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl LookupServer {
    /// Binds `path` and serves `handler` on the current Tokio runtime.
    ///
    /// # Errors
    /// `ConfigInvalid` when another live instance on this host serves the same path (pick a
    /// different `lookup_rpc_port`); `Unavailable` when the socket cannot be bound.
    pub fn bind(path: &Path, handler: Arc<dyn LookupHandler>) -> Result<LookupServer> {
        if path.exists() {
            if StdUnixStream::connect(path).is_ok() {
                return Err(Error::config_invalid(format!(
                    "the lookup socket {} is served by another running instance; every vLLM \
                     instance on a host needs its own `lookup_rpc_port`",
                    path.display()
                )));
            }
            // A leftover from a process that died: nobody listens on it.
            let _ = std::fs::remove_file(path);
        }
        let std_listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!("cannot bind the lookup socket {}", path.display()),
            )
            .set_source(e)
        })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|e| Error::new(ErrorKind::Unexpected, "lookup socket").set_source(e))?;
        let listener = UnixListener::from_std(std_listener).map_err(|e| {
            Error::new(ErrorKind::Unexpected, "lookup socket needs a Tokio runtime").set_source(e)
        })?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, handler).await {
                        tracing::debug!(error = %e, "lookup connection closed");
                    }
                });
            }
        });
        Ok(LookupServer {
            path: path.to_path_buf(),
            task,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for LookupServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn serve_connection(mut stream: UnixStream, handler: Arc<dyn LookupHandler>) -> Result<()> {
    let io = |e: std::io::Error| Error::new(ErrorKind::Unavailable, "lookup socket").set_source(e);
    loop {
        let mut head = [0u8; 13];
        match stream.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(io(e)),
        }
        let reply = match parse_head(&head) {
            Err(e) => {
                // A bad frame leaves the stream unsynchronised: answer and hang up.
                let _ = stream.write_all(&error_reply(&e.to_string())).await;
                return Err(e);
            }
            Ok(Request::Reset) => match handler.reset().await {
                Ok(cleared) => ok_reply(usize::from(cleared)),
                Err(e) => error_reply(&e.to_string()),
            },
            Ok(Request::Lookup(token_len, n)) => {
                let mut raw = vec![0u8; n * 32];
                stream.read_exact(&mut raw).await.map_err(io)?;
                let hashes: Vec<BlockHash> = raw
                    .chunks_exact(32)
                    .map(|c| BlockHash(c.try_into().expect("32-byte chunk")))
                    .collect();
                match handler.lookup(token_len, &hashes).await {
                    Ok(hit) => ok_reply(hit),
                    Err(e) => error_reply(&e.to_string()),
                }
            }
        };
        stream.write_all(&reply).await.map_err(io)?;
    }
}

enum Request {
    /// Token count and block count.
    Lookup(usize, usize),
    Reset,
}

fn parse_head(head: &[u8; 13]) -> Result<Request> {
    if &head[..4] != MAGIC || !(head[4] == VERSION || head[4] == VERSION_RESET) {
        return Err(Error::invalid_argument(
            "lookup request: not a kvpool lookup frame (bad magic or version)",
        ));
    }
    let token_len = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
    let n = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
    if head[4] == VERSION_RESET {
        return if token_len == 0 && n == 0 {
            Ok(Request::Reset)
        } else {
            Err(Error::invalid_argument(
                "lookup request: a reset frame carries no tokens or blocks",
            ))
        };
    }
    if n > MAX_BLOCKS {
        return Err(Error::invalid_argument(format!(
            "lookup request: {n} blocks, more than the limit of {MAX_BLOCKS}"
        )));
    }
    Ok(Request::Lookup(token_len, n))
}

fn ok_reply(hit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    out.extend_from_slice(MAGIC);
    out.push(0);
    out.extend_from_slice(&u32::try_from(hit).unwrap_or(u32::MAX).to_le_bytes());
    out
}

fn error_reply(msg: &str) -> Vec<u8> {
    let mut end = msg.len().min(MAX_ERROR_LEN);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &msg[..end];
    let mut out = Vec::with_capacity(9 + msg.len());
    out.extend_from_slice(MAGIC);
    out.push(1);
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg.as_bytes());
    out
}

/// The scheduler's side: blocking, one request at a time, with a timeout on every call.
#[derive(Debug)]
pub struct LookupClient {
    path: PathBuf,
    timeout: Duration,
    stream: Option<StdUnixStream>,
}

impl LookupClient {
    /// A client of the service at `path`; it connects on first use and after any error.
    pub fn new(path: PathBuf, timeout: Duration) -> LookupClient {
        LookupClient {
            path,
            timeout,
            stream: None,
        }
    }

    /// Asks how many of the first `token_len` tokens are held on every rank.
    ///
    /// # Errors
    /// `Unavailable` when nothing serves the socket, `Timeout` when the answer takes longer
    /// than the timeout, `InvalidArgument` for too many blocks or a malformed reply, and the
    /// server's error when its lookup failed. After an error the connection is dropped, so a
    /// late answer is never taken for the next request's.
    pub fn lookup(&mut self, token_len: usize, hashes: &[BlockHash]) -> Result<usize> {
        if hashes.len() > MAX_BLOCKS {
            return Err(Error::invalid_argument(format!(
                "lookup of {} blocks exceeds the limit of {MAX_BLOCKS}",
                hashes.len()
            )));
        }
        let mut frame = Vec::with_capacity(13 + hashes.len() * 32);
        frame.extend_from_slice(MAGIC);
        frame.push(VERSION);
        frame.extend_from_slice(&u32::try_from(token_len).unwrap_or(u32::MAX).to_le_bytes());
        frame.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
        for h in hashes {
            frame.extend_from_slice(h.as_bytes());
        }
        self.call(&frame)
    }

    /// Asks worker rank 0 to clear the pool (vLLM's `reset_cache`); whether anything was in
    /// scope.
    ///
    /// # Errors
    /// As [`lookup`](Self::lookup); the worker's error when its backend could not be cleared.
    pub fn reset(&mut self) -> Result<bool> {
        let mut frame = Vec::with_capacity(13);
        frame.extend_from_slice(MAGIC);
        frame.push(VERSION_RESET);
        frame.extend_from_slice(&[0u8; 8]);
        self.call(&frame).map(|cleared| cleared != 0)
    }

    fn call(&mut self, frame: &[u8]) -> Result<usize> {
        let result = self.try_call(frame);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn try_call(&mut self, frame: &[u8]) -> Result<usize> {
        let io = |what: &str, e: std::io::Error| {
            let kind = match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ErrorKind::Timeout,
                _ => ErrorKind::Unavailable,
            };
            Error::new(kind, format!("lookup service: {what}"))
                .with_context("socket", self.path.display())
                .set_source(e)
                .set_temporary()
        };
        if self.stream.is_none() {
            let stream = StdUnixStream::connect(&self.path).map_err(|e| io("connect", e))?;
            stream
                .set_read_timeout(Some(self.timeout))
                .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                .map_err(|e| io("set timeout", e))?;
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(frame).map_err(|e| io("send", e))?;
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).map_err(|e| io("receive", e))?;
        if &head[..4] != MAGIC {
            return Err(Error::invalid_argument(
                "lookup service: the reply is not a kvpool lookup frame",
            ));
        }
        let value = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes"));
        match head[4] {
            0 => Ok(value as usize),
            1 if value as usize <= MAX_ERROR_LEN => {
                let mut msg = vec![0u8; value as usize];
                stream.read_exact(&mut msg).map_err(|e| io("receive", e))?;
                Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "lookup failed on the worker: {}",
                        String::from_utf8_lossy(&msg)
                    ),
                ))
            }
            _ => Err(Error::invalid_argument(
                "lookup service: malformed reply status or length",
            )),
        }
    }
}

/// Entry points for the fuzz targets in `fuzz/`: the socket's decoders run on untrusted bytes
/// exactly as in service, over socket pairs. Not an API; every call must return without
/// panicking.
#[doc(hidden)]
pub mod fuzzing {
    use std::sync::Mutex;

    use super::*;

    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("a current-thread runtime");
    }

    /// What the handler was asked: `Some` for a lookup, `None` for a reset.
    type Asked = Option<(usize, Vec<BlockHash>)>;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Asked>>);

    #[async_trait]
    impl LookupHandler for Recorder {
        async fn lookup(&self, token_len: usize, hashes: &[BlockHash]) -> Result<usize> {
            let mut seen = self.0.lock().expect("not poisoned");
            seen.push(Some((token_len, hashes.to_vec())));
            Ok(hashes.len())
        }

        async fn reset(&self) -> Result<bool> {
            self.0.lock().expect("not poisoned").push(None);
            Ok(true)
        }
    }

    /// Serves `data` as one connection's requests (v1 lookups and v2 resets), then checks
    /// that the client encodes every request the handler saw back into the bytes it was
    /// decoded from.
    pub fn decode_requests(data: &[u8]) {
        let handler = Arc::new(Recorder::default());
        RT.with(|rt| {
            rt.block_on(async {
                let (mut ours, theirs) = UnixStream::pair().expect("a socket pair");
                let (mut rx, mut tx) = ours.split();
                let send = async {
                    // The server hangs up on a bad frame; what it did not read is moot.
                    let _ = tx.write_all(data).await;
                    let _ = tx.shutdown().await;
                };
                let drain = async {
                    let mut sink = Vec::new();
                    let _ = rx.read_to_end(&mut sink).await;
                };
                let serve = serve_connection(theirs, handler.clone());
                let _ = tokio::join!(send, drain, serve);
            })
        });
        let seen = std::mem::take(&mut *handler.0.lock().expect("not poisoned"));
        let mut at = 0;
        for request in seen {
            let frame = client_frame(request);
            assert_eq!(
                data.get(at..at + frame.len()),
                Some(&frame[..]),
                "request {at}.. decoded into what the client encodes differently"
            );
            at += frame.len();
        }
    }

    /// The bytes `LookupClient` sends for `request`, captured from a socket pair.
    fn client_frame(request: Asked) -> Vec<u8> {
        let (ours, mut theirs) = StdUnixStream::pair().expect("a socket pair");
        theirs
            .write_all(&ok_reply(0))
            .expect("a reply fits the socket buffer");
        let mut client = LookupClient {
            path: PathBuf::new(),
            timeout: Duration::from_secs(5),
            stream: Some(ours),
        };
        match request {
            Some((token_len, hashes)) => client.lookup(token_len, &hashes).map(drop),
            None => client.reset().map(drop),
        }
        .expect("the client reads the prepared reply");
        drop(client);
        let mut frame = Vec::new();
        theirs
            .read_to_end(&mut frame)
            .expect("the client's end is closed");
        frame
    }

    /// Feeds `data` to the client as the worker's replies, one lookup or reset after another
    /// until a reply fails to decode or the bytes run out.
    pub fn decode_replies(data: &[u8]) {
        let (ours, mut theirs) = StdUnixStream::pair().expect("a socket pair");
        // Larger inputs would block on the socket buffer; libFuzzer's are smaller.
        if theirs.write_all(&data[..data.len().min(64 << 10)]).is_err()
            || theirs.shutdown(std::net::Shutdown::Write).is_err()
        {
            return;
        }
        let mut client = LookupClient {
            path: PathBuf::new(),
            timeout: Duration::from_secs(5),
            stream: Some(ours),
        };
        let hash = [BlockHash([7; 32])];
        let mut reset = false;
        // An error drops the stream; the next call would connect to the (empty) path.
        while client.stream.is_some() {
            let _ = if reset {
                client.reset().map(usize::from)
            } else {
                client.lookup(64, &hash)
            };
            reset = !reset;
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn hostile_and_valid_inputs_return() {
            let mut valid = b"KVPL\x01\x10\0\0\0\x01\0\0\0".to_vec();
            valid.extend_from_slice(&[9; 32]);
            valid.extend_from_slice(b"KVPL\x02\0\0\0\0\0\0\0\0");
            for data in [
                &[][..],
                &valid[..],
                &valid[..20],
                b"KVPL\x01\xff\xff\xff\xff\xff\xff\xff\xff",
                b"KVPL\x00\x05\0\0\0KVPL\x01\x03\0\0\0abc",
                b"KVPL\x01\x00\x20\0\0",
            ] {
                super::decode_requests(data);
                super::decode_replies(data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct CountPresent(usize);

    #[async_trait]
    impl LookupHandler for CountPresent {
        async fn lookup(&self, token_len: usize, hashes: &[BlockHash]) -> Result<usize> {
            if hashes.iter().any(|h| h.0[0] == 0xEE) {
                return Err(Error::new(ErrorKind::Unavailable, "backend down"));
            }
            Ok(token_len.min(hashes.len() * self.0))
        }
    }

    struct Stuck;

    #[async_trait]
    impl LookupHandler for Stuck {
        async fn lookup(&self, _: usize, _: &[BlockHash]) -> Result<usize> {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(1)
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn answers_errors_and_bad_frames() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(Some(dir.path()), 7, 1);
        assert!(path.ends_with("kvpool_lookup_rpc_port_7_dp_rank1"));
        let _server = rt
            .block_on(async { LookupServer::bind(&path, Arc::new(CountPresent(16))) })
            .unwrap();
        let mut client = LookupClient::new(path.clone(), Duration::from_secs(5));
        let h = BlockHash([1; 32]);
        assert_eq!(client.lookup(40, &[h, h, h]).unwrap(), 40);
        assert_eq!(client.lookup(64, &[h, h]).unwrap(), 32);
        let err = client.lookup(16, &[BlockHash([0xEE; 32])]).unwrap_err();
        assert!(err.to_string().contains("backend down"), "{err}");
        // The client reconnects after an error.
        assert_eq!(client.lookup(16, &[h]).unwrap(), 16);

        // A second instance on the same path is refused while the first lives.
        let err = rt
            .block_on(async { LookupServer::bind(&path, Arc::new(CountPresent(1))) })
            .unwrap_err();
        assert!(err.to_string().contains("lookup_rpc_port"), "{err}");

        // A hostile frame gets an error reply, not a huge allocation.
        let mut raw = StdUnixStream::connect(&path).unwrap();
        let mut frame = MAGIC.to_vec();
        frame.push(VERSION);
        frame.extend_from_slice(&16u32.to_le_bytes());
        frame.extend_from_slice(&u32::MAX.to_le_bytes());
        raw.write_all(&frame).unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[4], 1);
        assert!(String::from_utf8_lossy(&reply[9..]).contains("limit"));
    }

    struct Resettable;

    #[async_trait]
    impl LookupHandler for Resettable {
        async fn lookup(&self, _: usize, _: &[BlockHash]) -> Result<usize> {
            Ok(0)
        }
        async fn reset(&self) -> Result<bool> {
            Ok(true)
        }
    }

    #[test]
    fn resets_travel_the_same_socket() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(Some(dir.path()), 8, 0);
        let server = rt
            .block_on(async { LookupServer::bind(&path, Arc::new(Resettable)) })
            .unwrap();
        let mut client = LookupClient::new(path.clone(), Duration::from_secs(5));
        assert!(client.reset().unwrap());
        assert_eq!(client.lookup(16, &[BlockHash([1; 32])]).unwrap(), 0);
        drop(server);

        // A handler that cannot reset says so; a reset frame with a payload is refused.
        let _server = rt
            .block_on(async { LookupServer::bind(&path, Arc::new(CountPresent(16))) })
            .unwrap();
        let mut client = LookupClient::new(path.clone(), Duration::from_secs(5));
        let err = client.reset().unwrap_err();
        assert!(err.to_string().contains("cannot reset"), "{err}");
        let mut raw = StdUnixStream::connect(&path).unwrap();
        let mut frame = MAGIC.to_vec();
        frame.push(VERSION_RESET);
        frame.extend_from_slice(&1u32.to_le_bytes());
        frame.extend_from_slice(&0u32.to_le_bytes());
        raw.write_all(&frame).unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[4], 1);
        assert!(String::from_utf8_lossy(&reply[9..]).contains("reset frame"));
    }

    #[test]
    fn a_stuck_or_missing_worker_costs_at_most_the_timeout() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(Some(dir.path()), 0, 0);
        let mut client = LookupClient::new(path.clone(), Duration::from_millis(200));
        let err = client.lookup(16, &[BlockHash([1; 32])]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

        let server = rt
            .block_on(async { LookupServer::bind(&path, Arc::new(Stuck)) })
            .unwrap();
        let started = std::time::Instant::now();
        let err = client.lookup(16, &[BlockHash([1; 32])]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(server);
        assert!(!path.exists(), "the socket file is removed with the server");
    }
}
