//! Connections: standalone servers over TCP or a unix socket on kvpool's own RESP client
//! (`resp`), TLS servers and clusters on the `redis` crate; pipelines retried with backoff,
//! and redis errors turned into kvpool's.
//!
//! - [`command`]: how callers encode commands and receive replies, whichever client runs them;
//! - [`fast`]: kvpool's own client (plain TCP, unix socket);
//! - [`crate_client`]: the `redis` crate's (TLS, cluster);
//! - [`errors`]: which failures are retried, and what each means to a user.

mod command;
mod crate_client;
mod errors;
mod fast;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;
use kvpool_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::{Client, ConnectionAddr, IntoConnectionInfo, RedisError};
use tokio::time::Instant;

pub(crate) use command::{Encode, Out, Reply, Sink, Val};
pub(crate) use errors::{classify, transient};

use crate::config::{RedisConfig, Target};
use crate_client::{tls_certificates, val, Conn};
use fast::{protocol_error, FastAddr, FastConn, FastTarget};

/// The longest wait between two retries, however many came before.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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
