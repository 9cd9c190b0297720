//! Connections: standalone servers over TCP or a unix socket on kvpool's own RESP client
//! (`resp`), TLS servers and clusters on the `redis` crate; pipelines retried with backoff,
//! and redis errors turned into kvpool's.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::{join_all, try_join_all};
use kvpool_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ClientTlsConfig, ConnectionAddr, IntoConnectionInfo, Pipeline, RedisError,
    ServerErrorKind, TlsCertificates, Value,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::{RedisConfig, Target};
use crate::resp::{self, Frame, Parsed};

/// One reply, borrowed from the connection's read buffer or the `redis` crate's value.
pub(crate) enum Val<'a> {
    /// No value: a missing key, a `SET NX` of a present key.
    Nil,
    /// A status reply such as `OK`.
    Simple(&'a [u8]),
    Int(i64),
    Bulk(&'a [u8]),
    /// A reply of a kind none of kvpool's commands gives (the `redis` crate's paths only;
    /// kvpool's own client refuses such replies as a protocol error).
    Other(String),
}

/// For error messages about replies of the wrong kind: short, whatever the reply's size.
impl std::fmt::Debug for Val<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(64)]).into_owned();
        match self {
            Val::Nil => write!(f, "nil"),
            Val::Simple(s) => write!(f, "status {:?}", shown(s)),
            Val::Int(n) => write!(f, "integer {n}"),
            Val::Bulk(b) => write!(
                f,
                "a bulk string of {} bytes starting {:?}",
                b.len(),
                shown(b)
            ),
            Val::Other(what) => write!(f, "{}", what.chars().take(200).collect::<String>()),
        }
    }
}

/// The answer to one command: a value, or the error the server (or the link) gave for it.
pub(crate) type Reply<'a> = std::result::Result<Val<'a>, RedisError>;

/// Makes command `i` of a pipeline; called again for commands that are retried.
pub(crate) type Encode<'e> = dyn Fn(usize, &mut Out<'_>) + Sync + 'e;

/// Receives the reply to command `i` of a pipeline, once, in any order.
pub(crate) type Sink<'s> = dyn FnMut(usize, Reply<'_>) + Send + 's;

/// Where a command is encoded.
pub(crate) enum Out<'a> {
    /// RESP bytes appended to a connection's write buffer.
    Resp(&'a mut Vec<u8>),
    /// A command of the `redis` crate.
    Cmd(&'a mut redis::Cmd),
}

impl Out<'_> {
    /// Starts a command of `args` arguments, the name included.
    pub(crate) fn command(&mut self, args: usize) {
        if let Out::Resp(buf) = self {
            resp::command(buf, args);
        }
    }

    pub(crate) fn arg(&mut self, a: &[u8]) {
        match self {
            Out::Resp(buf) => resp::arg(buf, a),
            Out::Cmd(c) => {
                c.arg(a);
            }
        }
    }

    /// One argument of `len` bytes gathered from `parts`: a value goes straight from the
    /// caller's slices into the buffer, with no intermediate `Vec`.
    pub(crate) fn arg_parts<'p>(&mut self, len: usize, parts: impl Iterator<Item = &'p [u8]>) {
        match self {
            Out::Resp(buf) => resp::arg_parts(buf, len, parts),
            Out::Cmd(c) => {
                use redis::RedisWrite;
                use std::io::Write;
                c.reserve_space_for_args([len]);
                let mut w = c.writer_for_next_arg();
                for p in parts {
                    w.write_all(p).expect("writing to a Vec");
                }
            }
        }
    }
}

/// The longest wait between two retries, however many came before.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Read and write buffers start this large: a pipeline of 16 blocks of 4 KiB, and its
/// replies, fit in one system call each.
const BUF_INITIAL: usize = 128 << 10;

/// Buffers that grew past this for a large value are given back after the pipeline, so
/// an idle connection does not hold hundreds of MiB.
const BUF_KEEP: usize = 4 << 20;

/// Where kvpool's own client connects, and how it logs in.
struct FastTarget {
    addr: FastAddr,
    username: Option<String>,
    password: Option<String>,
    db: i64,
    connect_timeout: Duration,
}

enum FastAddr {
    Tcp(String, u16),
    Unix(PathBuf),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection of kvpool's own client, used by one pipeline at a time: the pipeline
/// is written whole, then its replies are read in order, each handed to the caller
/// borrowed from the read buffer.
struct FastConn {
    io: Box<dyn Io>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// `rbuf[start..end]` holds bytes read and not yet parsed.
    start: usize,
    end: usize,
}

impl FastConn {
    /// Connects and logs in (AUTH, SELECT), all within the connect timeout.
    async fn connect(t: &FastTarget) -> std::result::Result<FastConn, RedisError> {
        let connecting = async {
            let io: Box<dyn Io> = match &t.addr {
                FastAddr::Tcp(host, port) => {
                    let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    // Pipelines are written whole; Nagle would only hold back their tail.
                    s.set_nodelay(true)?;
                    Box::new(s)
                }
                FastAddr::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            };
            let mut conn = FastConn {
                io,
                wbuf: Vec::with_capacity(BUF_INITIAL),
                rbuf: vec![0; BUF_INITIAL],
                start: 0,
                end: 0,
            };
            let mut commands = 0;
            if let Some(password) = &t.password {
                let mut out = Out::Resp(&mut conn.wbuf);
                match &t.username {
                    Some(user) => {
                        out.command(3);
                        out.arg(b"AUTH");
                        out.arg(user.as_bytes());
                    }
                    None => {
                        out.command(2);
                        out.arg(b"AUTH");
                    }
                }
                out.arg(password.as_bytes());
                commands += 1;
            }
            if t.db != 0 {
                let mut out = Out::Resp(&mut conn.wbuf);
                out.command(2);
                out.arg(b"SELECT");
                out.arg(t.db.to_string().as_bytes());
                commands += 1;
            }
            let mut failed = None;
            if commands > 0 {
                conn.exchange(commands, &mut |_, reply| {
                    if let Err(e) = reply {
                        failed.get_or_insert(e);
                    }
                })
                .await?;
            }
            match failed {
                Some(e) => Err(e),
                None => Ok(conn),
            }
        };
        tokio::time::timeout(t.connect_timeout, connecting)
            .await
            .map_err(|_| {
                RedisError::from(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting took longer than redis.connect_timeout_ms",
                ))
            })?
    }

    /// Sends the `n` commands in the write buffer and hands each reply to `sink`, in order.
    /// `Err` leaves the connection in an unknown state: the caller drops it.
    async fn exchange(
        &mut self,
        n: usize,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<(), RedisError> {
        self.io.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        if self.wbuf.capacity() > BUF_KEEP {
            self.wbuf = Vec::with_capacity(BUF_INITIAL);
        }
        for k in 0..n {
            loop {
                let need = match resp::parse(&self.rbuf[self.start..self.end]) {
                    Ok(Parsed::Frame(frame, used)) => {
                        sink(k, reply(frame));
                        self.start += used;
                        break;
                    }
                    Ok(Parsed::Incomplete(need)) => need,
                    Err(why) => return Err(protocol_error(why)),
                };
                self.fill(need).await?;
            }
        }
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
            if self.rbuf.len() > BUF_KEEP {
                self.rbuf = vec![0; BUF_INITIAL];
            }
        }
        Ok(())
    }

    /// Reads until at least `need` bytes are buffered from `start`, growing the buffer
    /// if a reply is larger than it.
    async fn fill(&mut self, need: usize) -> io::Result<()> {
        while self.end - self.start < need {
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            } else if self.rbuf.len() - self.start < need || self.end == self.rbuf.len() {
                self.rbuf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            }
            if self.rbuf.len() < need {
                self.rbuf.resize(need.max(BUF_INITIAL), 0);
            }
            let read = self.io.read(&mut self.rbuf[self.end..]).await?;
            if read == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "redis closed the connection",
                ));
            }
            self.end += read;
        }
        Ok(())
    }
}

/// The reply a frame stands for; an error line becomes the `redis` crate's error, so
/// that both clients' errors are classified by one function.
fn reply(frame: Frame<'_>) -> Reply<'_> {
    match frame {
        Frame::Nil => Ok(Val::Nil),
        Frame::Simple(s) => Ok(Val::Simple(s)),
        Frame::Int(n) => Ok(Val::Int(n)),
        Frame::Bulk(b) => Ok(Val::Bulk(b)),
        Frame::Error(line) => Err(match redis::parse_redis_value(line) {
            Ok(Value::ServerError(e)) => RedisError::from(e),
            _ => redis::make_extension_error(
                "ERR".to_string(),
                Some(String::from_utf8_lossy(line).trim_end().to_string()),
            ),
        }),
    }
}

fn protocol_error(why: String) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "malformed reply from the server",
        why,
    ))
}

/// A reply of the `redis` crate as a [`Val`].
fn val(v: &Value) -> Reply<'_> {
    Ok(match v {
        Value::Nil => Val::Nil,
        Value::Okay => Val::Simple(b"OK"),
        Value::SimpleString(s) => Val::Simple(s.as_bytes()),
        Value::Int(n) => Val::Int(*n),
        Value::BulkString(b) => Val::Bulk(b),
        Value::ServerError(e) => return Err(RedisError::from(e.clone())),
        other => Val::Other(format!("{other:?}")),
    })
}

#[derive(Clone)]
enum Conn {
    /// Reconnects by itself after the link drops; requests made meanwhile wait for the
    /// new connection (bounded by the connect timeout) or fail. Used for TLS.
    Single(ConnectionManager),
    /// Routes each key to its slot's master, follows MOVED/ASK, refreshes the topology.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends every command of `pipe` and returns one reply per command, in order. `Err`
    /// when the pipeline as a whole failed (the link dropped, a timeout).
    async fn send(
        &mut self,
        pipe: &Pipeline,
    ) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
        match self {
            Conn::Single(c) => {
                let values = c.req_packed_commands(pipe, 0, pipe.len()).await?;
                Ok(values.into_iter().map(Ok).collect())
            }
            Conn::Cluster(c) => {
                // A cluster pipeline must stay within one hash slot and a batch's keys are
                // spread over all of them. Sent concurrently, the commands still share one
                // multiplexed connection per node, which pipelines them on the wire.
                let sends = pipe.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { c.req_packed_command(cmd).await }
                });
                Ok(join_all(sends).await)
            }
        }
    }
}

/// The connections of kvpool's own client. Each slot is one connection, `None` until
/// (re)connected; a pipeline uses a slot alone. `free` has one permit per slot, so a
/// pipeline that holds a permit always finds a free slot, and pipelines waiting for one
/// are served in order as soon as any slot frees, not when a particular one does.
struct FastSlots {
    slots: Vec<tokio::sync::Mutex<Option<FastConn>>>,
    free: tokio::sync::Semaphore,
}

enum Conns {
    /// kvpool's own client: plain TCP or a unix socket to one server.
    Fast(FastTarget, FastSlots),
    /// The `redis` crate: TLS, or a cluster.
    Crate(Vec<Conn>),
}

/// Connections to one server or cluster.
pub(crate) struct Pool {
    conns: Conns,
    next: AtomicUsize,
    endpoint: String,
    retries: u32,
    backoff: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (client, connections) = match &self.conns {
            Conns::Fast(_, fast) => ("kvpool", fast.slots.len()),
            Conns::Crate(conns) => ("redis crate", conns.len()),
        };
        f.debug_struct("Pool")
            .field("endpoint", &self.endpoint)
            .field("client", &client)
            .field("connections", &connections)
            .finish()
    }
}

impl Pool {
    /// Opens `cfg.pool_size` connections; fails if the server cannot be reached or refuses
    /// the credentials, so a misconfiguration shows at open, not at the first put.
    pub(crate) async fn connect(cfg: &RedisConfig) -> Result<Pool> {
        let endpoint = cfg.endpoint();
        let certs = tls_certificates(cfg)?;
        if cfg.uses_tls() {
            // rustls needs a process-wide crypto provider; another crate may have
            // installed one already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let connect_timeout = cfg.connect_timeout();
        let request_timeout = cfg.request_timeout();
        let fail = |e: RedisError| classify(&e, &endpoint).with_operation("open").set_source(e);
        let connecting = async {
            match cfg.target() {
                Target::Single(url) => {
                    let mut info = url.into_connection_info().map_err(fail)?;
                    let mut settings = info.redis_settings().clone();
                    if let Some(user) = &cfg.username {
                        settings = settings.set_username(user);
                    }
                    if let Some(password) = &cfg.password {
                        settings = settings.set_password(password);
                    }
                    let addr = match info.addr() {
                        ConnectionAddr::Tcp(host, port) => Some(FastAddr::Tcp(host.clone(), *port)),
                        ConnectionAddr::Unix(path) => Some(FastAddr::Unix(path.clone())),
                        _ => None,
                    };
                    if let Some(addr) = addr {
                        let target = FastTarget {
                            addr,
                            username: settings.username().map(str::to_string),
                            password: settings.password().map(str::to_string),
                            db: settings.db(),
                            connect_timeout,
                        };
                        let conns =
                            try_join_all((0..cfg.pool_size).map(|_| FastConn::connect(&target)))
                                .await
                                .map_err(fail)?;
                        let slots = FastSlots {
                            free: tokio::sync::Semaphore::new(conns.len()),
                            slots: conns
                                .into_iter()
                                .map(|c| tokio::sync::Mutex::new(Some(c)))
                                .collect(),
                        };
                        return Ok(Conns::Fast(target, slots));
                    }
                    info = info.set_redis_settings(settings);
                    let client = match certs {
                        Some(certs) => Client::build_with_tls(info, certs),
                        None => Client::open(info),
                    }
                    .map_err(fail)?;
                    // Reconnection is retried here, with the backoff and deadline of the
                    // request that needs it, not by the manager behind our back.
                    let manager_config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(connect_timeout))
                        .set_response_timeout(Some(request_timeout))
                        .set_number_of_retries(0);
                    let conns = try_join_all((0..cfg.pool_size).map(|_| {
                        ConnectionManager::new_with_config(client.clone(), manager_config.clone())
                    }))
                    .await
                    .map_err(fail)?;
                    Ok(Conns::Crate(conns.into_iter().map(Conn::Single).collect()))
                }
                Target::Cluster(nodes) => {
                    let mut builder = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(connect_timeout)
                        .response_timeout(request_timeout)
                        .retries(cfg.retries);
                    if let Some(user) = &cfg.username {
                        builder = builder.username(user);
                    }
                    if let Some(password) = &cfg.password {
                        builder = builder.password(password);
                    }
                    if let Some(certs) = certs {
                        builder = builder.certs(certs);
                    }
                    let client = builder.build().map_err(fail)?;
                    let conns =
                        try_join_all((0..cfg.pool_size).map(|_| client.get_async_connection()))
                            .await
                            .map_err(fail)?;
                    Ok(Conns::Crate(conns.into_iter().map(Conn::Cluster).collect()))
                }
            }
        };
        let pool = |conns| Pool {
            conns,
            next: AtomicUsize::new(0),
            endpoint: endpoint.clone(),
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
            request_timeout,
        };
        // Each connection attempt is bounded by the connect timeout; the handshake
        // commands that follow it (AUTH, CLUSTER SLOTS) by the request timeout.
        let checked = async {
            let pool = pool(connecting.await?);
            // Servers with `requirepass` accept a connection without AUTH and refuse the
            // first command; one PING per connection turns that into an error at open.
            let connections = match &pool.conns {
                Conns::Fast(_, fast) => fast.slots.len(),
                Conns::Crate(conns) => conns.len(),
            };
            let ping: &Encode<'_> = &|_, out| {
                out.command(1);
                out.arg(b"PING");
            };
            for _ in 0..connections {
                let mut failed = None;
                pool.send(&[0], ping, &mut |_, reply| {
                    if let Err(e) = reply {
                        failed.get_or_insert(e);
                    }
                })
                .await
                .map_err(fail)?;
                if let Some(e) = failed {
                    return Err(fail(e));
                }
            }
            Ok(pool)
        };
        tokio::time::timeout(connect_timeout + request_timeout, checked)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "could not connect to redis at {endpoint} within redis.connect_timeout_ms \
                         + redis.request_timeout_ms"
                    ),
                )
                .with_operation("open")
            })?
    }

    /// Where the pool connects, password masked.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Sends the commands `pending` (indices for `encode`) as one pipeline and hands each
    /// reply to `sink` with its position in `pending`, in order. `Err` when the pipeline
    /// as a whole failed; the replies handed over before that stand.
    async fn send(
        &self,
        pending: &[usize],
        encode: &Encode<'_>,
        sink: &mut Sink<'_>,
    ) -> std::result::Result<(), RedisError> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        match &self.conns {
            Conns::Fast(target, fast) => {
                let slots = &fast.slots;
                let n = slots.len();
                // The semaphore is never closed; were it, waiting on one slot still works.
                let _permit = fast.free.acquire().await.ok();
                // The first free connection from a rotating start: with a permit in hand
                // there is one.
                let mut guard = match (0..n).find_map(|i| slots[(start + i) % n].try_lock().ok()) {
                    Some(g) => g,
                    None => slots[start % n].lock().await,
                };
                // Taken out while in use: if this future is dropped midway (a timeout),
                // the half-used connection goes with it and the slot reconnects.
                let mut conn = match guard.take() {
                    Some(c) => c,
                    None => FastConn::connect(target).await?,
                };
                for &i in pending {
                    encode(i, &mut Out::Resp(&mut conn.wbuf));
                }
                conn.exchange(pending.len(), sink).await?;
                *guard = Some(conn);
                Ok(())
            }
            Conns::Crate(conns) => {
                let mut pipe = redis::pipe();
                for &i in pending {
                    let mut c = redis::Cmd::new();
                    encode(i, &mut Out::Cmd(&mut c));
                    pipe.add_command(c);
                }
                let replies = conns[start % conns.len()].clone().send(&pipe).await?;
                if replies.len() != pending.len() {
                    return Err(protocol_error(format!(
                        "{} replies to {} commands",
                        replies.len(),
                        pending.len()
                    )));
                }
                for (k, r) in replies.iter().enumerate() {
                    sink(k, r.as_ref().map_err(Clone::clone).and_then(val));
                }
                Ok(())
            }
        }
    }

    /// Runs commands `0..n` (made by `encode`) as one pipeline and hands each reply to
    /// `on_reply`, once per command, in no particular order.
    ///
    /// Commands that failed for a reason that may pass (see [`transient`]) are sent again
    /// after a growing pause, up to `redis.retries` times and never past
    /// `redis.request_timeout_ms`: alone if only they failed, with every command not yet
    /// answered if the link dropped. Every command here is idempotent (a repeated
    /// `SETNX` answers "exists"), so a retry after a reply was lost is harmless. If the
    /// reason persists the whole call fails: the server is down, not one key.
    pub(crate) async fn run(
        &self,
        op: &'static str,
        n: usize,
        encode: &Encode<'_>,
        on_reply: &mut Sink<'_>,
    ) -> Result<()> {
        let deadline = Instant::now() + self.request_timeout;
        let mut pending: Vec<usize> = (0..n).collect();
        let mut attempt = 0u32;
        while !pending.is_empty() {
            let mut again = Vec::new();
            let mut cause = None;
            let mut answered = 0;
            let sent = {
                let mut sink = |k: usize, reply: Reply<'_>| {
                    answered = k + 1;
                    match reply {
                        Err(e) if transient(&e) => {
                            again.push(pending[k]);
                            cause = Some(e);
                        }
                        reply => on_reply(pending[k], reply),
                    }
                };
                tokio::time::timeout_at(deadline, self.send(&pending, encode, &mut sink))
                    .await
                    .map_err(|_| self.timeout(op))?
            };
            match sent {
                Ok(()) => {}
                Err(e) if transient(&e) => {
                    again.extend_from_slice(&pending[answered..]);
                    cause = Some(e);
                }
                Err(e) => return Err(self.error(op, e)),
            }
            let Some(cause) = cause else { break };
            let pause = self
                .backoff
                .saturating_mul(1u32 << attempt.min(16))
                .min(MAX_BACKOFF);
            if attempt >= self.retries || Instant::now() + pause >= deadline {
                return Err(self.error(op, cause).with_context("attempts", attempt + 1));
            }
            tracing::debug!(op, attempt, ?pause, endpoint = %self.endpoint, "retrying redis pipeline");
            tokio::time::sleep(pause).await;
            attempt += 1;
            pending = again;
        }
        Ok(())
    }

    /// `e` as kvpool's error, with the operation and the endpoint.
    pub(crate) fn error(&self, op: &'static str, e: RedisError) -> Error {
        classify(&e, &self.endpoint)
            .with_operation(op)
            .set_source(e)
    }

    fn timeout(&self, op: &'static str) -> Error {
        Error::new(
            ErrorKind::Timeout,
            format!(
                "redis at {} did not answer within redis.request_timeout_ms = {} ms",
                self.endpoint,
                self.request_timeout.as_millis()
            ),
        )
        .with_operation(op)
    }
}

/// Whether a retry of the same command may succeed: the link dropped or was refused (the
/// server restarts), or the server or cluster is busy with something that ends by itself.
pub(crate) fn transient(e: &RedisError) -> bool {
    if tls_error(e).is_some() {
        return false;
    }
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::ClusterConnectionNotFound
                | redis::ErrorKind::Server(
                    ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::BusyLoading
                )
        )
}

/// The rustls error somewhere in `e`'s chain of sources.
fn tls_error(e: &RedisError) -> Option<&rustls::Error> {
    std::error::Error::source(e).and_then(find_tls)
}

fn find_tls<'a>(s: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = s.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    // redis keeps I/O errors behind an `Arc`, whose `source` skips the error itself, and
    // an `io::Error`'s `source` skips the error it wraps: look inside both.
    if let Some(inner) = s.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>() {
        return find_tls(inner.as_ref());
    }
    if let Some(inner) = s
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::get_ref)
    {
        return find_tls(inner);
    }
    s.source().and_then(find_tls)
}

/// kvpool's error for a redis error: each cause a user can act on gets its own kind and
/// a message that says what to do. The source is attached by the caller.
pub(crate) fn classify(e: &RedisError, endpoint: &str) -> Error {
    let code = e.code().unwrap_or("");
    let detail = e.detail().unwrap_or("");
    let auth_rejected = e.kind() == redis::ErrorKind::AuthenticationFailed
        || code == "WRONGPASS"
        || detail.contains("invalid password")
        || detail.contains("invalid username-password");
    if auth_rejected {
        Error::config_invalid(format!(
            "redis at {endpoint} rejected the credentials; check redis.username and \
             redis.password (or the user info in the URL)"
        ))
        .with_context("key", "redis.password")
    } else if code == "NOAUTH" {
        Error::config_invalid(format!(
            "redis at {endpoint} requires a password (NOAUTH); set redis.password"
        ))
        .with_context("key", "redis.password")
    } else if code == "NOPERM" || e.kind() == redis::ErrorKind::Server(ServerErrorKind::NoPerm) {
        Error::config_invalid(format!(
            "the redis user may not run a command kvpool needs (NOPERM); grant it \
             +get +set +setnx +exists +strlen +getrange +unlink on the keys under redis.key_prefix \
             at {endpoint}"
        ))
        .with_context("key", "redis.username")
    } else if let Some(tls) = tls_error(e) {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "TLS with redis at {endpoint} failed ({tls}); check redis.tls_ca_file (the CA \
                 that signed the server's certificate), that the certificate names the host \
                 in the URL, and redis.tls_cert_file/tls_key_file if the server checks clients"
            ),
        )
        .set_permanent()
    } else if code == "OOM" {
        Error::new(
            ErrorKind::NoSpace,
            format!(
                "redis at {endpoint} is at its maxmemory and its maxmemory-policy refuses \
                 writes (OOM); a cache should evict: set maxmemory-policy allkeys-lru \
                 (or volatile-lru with redis.ttl_ms), or raise maxmemory"
            ),
        )
    } else if code == "WRONGTYPE" {
        Error::new(
            ErrorKind::Corrupted,
            "the key holds a redis value that is not a string; it was not written by kvpool",
        )
    } else if e.kind() == redis::ErrorKind::Server(ServerErrorKind::ClusterDown) {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "the redis cluster at {endpoint} is down (CLUSTERDOWN): some hash slots have no \
                 reachable master; check it with `redis-cli --cluster check`"
            ),
        )
    } else if matches!(
        e.kind(),
        redis::ErrorKind::Server(ServerErrorKind::MasterDown | ServerErrorKind::TryAgain)
    ) || e.kind() == redis::ErrorKind::ClusterConnectionNotFound
    {
        Error::new(
            ErrorKind::Unavailable,
            format!("the redis cluster at {endpoint} is failing over or resharding ({code})"),
        )
    } else if e.kind() == redis::ErrorKind::Server(ServerErrorKind::BusyLoading) {
        Error::new(
            ErrorKind::Unavailable,
            format!("redis at {endpoint} is loading its dataset into memory (LOADING)"),
        )
    } else if e.kind() == redis::ErrorKind::Server(ServerErrorKind::ReadOnly) {
        Error::new(
            ErrorKind::Unavailable,
            format!("redis at {endpoint} is a read-only replica; point redis.url at the master"),
        )
        .set_permanent()
    } else if e.is_connection_refusal() {
        Error::new(
            ErrorKind::Unavailable,
            format!(
                "cannot connect to redis at {endpoint}: connection refused; is redis-server \
                 running and listening there?"
            ),
        )
    } else if e.is_timeout() {
        Error::new(
            ErrorKind::Timeout,
            format!("redis at {endpoint} did not answer in time"),
        )
    } else if e.is_io_error() || e.is_connection_dropped() {
        Error::new(
            ErrorKind::Unavailable,
            format!("lost the connection to redis at {endpoint}"),
        )
    } else if e.kind() == redis::ErrorKind::Parse {
        Error::new(
            ErrorKind::Unexpected,
            format!(
                "redis at {endpoint} sent a malformed reply ({detail}); is a redis server \
                 listening there?"
            ),
        )
        .set_permanent()
    } else if e.kind() == redis::ErrorKind::InvalidClientConfig {
        Error::config_invalid(format!(
            "the redis client rejected the settings for {endpoint}"
        ))
    } else {
        Error::new(
            ErrorKind::Unexpected,
            format!("redis at {endpoint} answered with an error it should not have"),
        )
    }
}

/// The certificates `rediss://` connections use, read from the configured files.
fn tls_certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>> {
    if !cfg.uses_tls() || (cfg.tls_ca_file.is_none() && cfg.tls_cert_file.is_none()) {
        // Without files, rediss:// trusts the system's roots.
        return Ok(None);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            Error::config_invalid(format!("{key} {}: {e}", path.display())).set_source(e)
        })
    };
    let root_cert = cfg
        .tls_ca_file
        .as_deref()
        .map(|p| read("redis.tls_ca_file", p))
        .transpose()?;
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &'static str) -> RedisError {
        redis::make_extension_error(code.to_string(), Some(detail.to_string()))
    }

    fn kind_of(e: &RedisError) -> (ErrorKind, bool, String) {
        let err = classify(e, "redis://h:1");
        (err.kind(), err.is_temporary(), err.to_string())
    }

    #[test]
    fn each_cause_gets_a_distinct_actionable_error() {
        let (kind, temporary, msg) = kind_of(&server("OOM", "command not allowed"));
        assert_eq!(kind, ErrorKind::NoSpace);
        assert!(temporary);
        assert!(msg.contains("maxmemory-policy"), "{msg}");

        let (kind, temporary, msg) =
            kind_of(&server("WRONGPASS", "invalid username-password pair"));
        assert_eq!(kind, ErrorKind::ConfigInvalid);
        assert!(!temporary);
        assert!(msg.contains("redis.password"), "{msg}");

        let (kind, _, msg) = kind_of(&server("NOAUTH", "Authentication required."));
        assert_eq!(kind, ErrorKind::ConfigInvalid);
        assert!(msg.contains("requires a password"), "{msg}");

        let (kind, _, _) = kind_of(&server("WRONGTYPE", "Operation against a key"));
        assert_eq!(kind, ErrorKind::Corrupted);

        let down = RedisError::from((
            redis::ErrorKind::Server(ServerErrorKind::ClusterDown),
            "The cluster is down",
        ));
        let (kind, temporary, msg) = kind_of(&down);
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(temporary);
        assert!(msg.contains("CLUSTERDOWN"), "{msg}");
        assert!(transient(&down));

        let refused = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let (kind, temporary, msg) = kind_of(&refused);
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(temporary);
        assert!(msg.contains("connection refused"), "{msg}");
        assert!(transient(&refused));

        let reset = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let (kind, _, msg) = kind_of(&reset);
        assert_eq!(kind, ErrorKind::Unavailable);
        assert!(msg.contains("lost the connection"), "{msg}");

        assert!(!transient(&server("OOM", "x")));
        assert!(!transient(&server("WRONGPASS", "x")));
    }
}
