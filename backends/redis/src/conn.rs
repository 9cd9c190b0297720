//! Connections: a pool of standalone connection managers or cluster clients, pipelines
//! retried with backoff, and redis errors turned into kvpool's.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::{join_all, try_join_all};
use kvpool_core::{Error, ErrorKind, Result};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ClientTlsConfig, IntoConnectionInfo, Pipeline, RedisError, ServerErrorKind,
    TlsCertificates, Value,
};
use tokio::time::Instant;

use crate::config::{RedisConfig, Target};

/// The answer to one command: a value, or the error the server (or the link) gave for it.
pub(crate) type Reply = std::result::Result<Value, RedisError>;

/// The longest wait between two retries, however many came before.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

#[derive(Clone)]
enum Conn {
    /// Reconnects by itself after the link drops; requests made meanwhile wait for the
    /// new connection (bounded by the connect timeout) or fail.
    Single(ConnectionManager),
    /// Routes each key to its slot's master, follows MOVED/ASK, refreshes the topology.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends every command of `pipe` and returns one reply per command, in order. `Err`
    /// when the pipeline as a whole failed (the link dropped, a timeout).
    async fn send(&mut self, pipe: &Pipeline) -> redis::RedisResult<Vec<Reply>> {
        let unpack = |v: Value| match v {
            Value::ServerError(e) => Err(RedisError::from(e)),
            v => Ok(v),
        };
        match self {
            Conn::Single(c) => {
                let values = c.req_packed_commands(pipe, 0, pipe.len()).await?;
                Ok(values.into_iter().map(unpack).collect())
            }
            Conn::Cluster(c) => {
                // A cluster pipeline must stay within one hash slot and a batch's keys are
                // spread over all of them. Sent concurrently, the commands still share one
                // multiplexed connection per node, which pipelines them on the wire.
                let sends = pipe.cmd_iter().map(|cmd| {
                    let mut c = c.clone();
                    async move { c.req_packed_command(cmd).await.and_then(unpack) }
                });
                Ok(join_all(sends).await)
            }
        }
    }
}

/// Connections to one server or cluster, used round-robin.
pub(crate) struct Pool {
    conns: Vec<Conn>,
    next: AtomicUsize,
    endpoint: String,
    retries: u32,
    backoff: Duration,
    request_timeout: Duration,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("endpoint", &self.endpoint)
            .field("connections", &self.conns.len())
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
                    Ok(conns.into_iter().map(Conn::Single).collect::<Vec<_>>())
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
                    Ok(conns.into_iter().map(Conn::Cluster).collect())
                }
            }
        };
        // Each connection attempt is bounded by the connect timeout; the handshake
        // commands that follow it (AUTH, CLUSTER SLOTS) by the request timeout.
        let checked = async {
            let conns = connecting.await?;
            // Servers with `requirepass` accept a connection without AUTH and refuse the
            // first command; one PING per connection turns that into an error at open.
            let ping = {
                let mut p = redis::pipe();
                p.cmd("PING");
                p
            };
            for conn in &conns {
                let replies = conn.clone().send(&ping).await.map_err(fail)?;
                if let Some(Err(e)) = replies.into_iter().next() {
                    return Err(fail(e));
                }
            }
            Ok(conns)
        };
        let conns = tokio::time::timeout(connect_timeout + request_timeout, checked)
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
            })??;
        Ok(Pool {
            conns,
            next: AtomicUsize::new(0),
            endpoint,
            retries: cfg.retries,
            backoff: Duration::from_millis(cfg.retry_backoff_ms),
            request_timeout,
        })
    }

    /// Where the pool connects, password masked.
    pub(crate) fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn pick(&self) -> Conn {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].clone()
    }

    /// Runs `pipe` (one command per key) and returns one reply per command, in order.
    ///
    /// Commands that failed for a reason that may pass (see [`transient`]) are sent again,
    /// alone, after a growing pause, up to `redis.retries` times and never past
    /// `redis.request_timeout_ms`. Every command here is idempotent (a repeated `SET NX`
    /// answers "exists"), so a retry after a reply was lost is harmless. If the reason
    /// persists the whole call fails: the server is down, not one key.
    pub(crate) async fn run(&self, op: &'static str, pipe: Pipeline) -> Result<Vec<Reply>> {
        let deadline = Instant::now() + self.request_timeout;
        let mut replies: Vec<Option<Reply>> = (0..pipe.len()).map(|_| None).collect();
        // Which command of the original pipeline each command of `current` is.
        let mut pending: Vec<usize> = (0..pipe.len()).collect();
        let mut current = pipe;
        let mut attempt = 0u32;
        loop {
            let sent = tokio::time::timeout_at(deadline, self.pick().send(&current))
                .await
                .map_err(|_| self.timeout(op))?;
            let mut again = Vec::new();
            let mut cause = None;
            match sent {
                Ok(answers) if answers.len() == pending.len() => {
                    for (pos, answer) in answers.into_iter().enumerate() {
                        match answer {
                            Err(e) if transient(&e) => {
                                again.push(pos);
                                cause = Some(e);
                            }
                            answer => replies[pending[pos]] = Some(answer),
                        }
                    }
                }
                Ok(answers) => {
                    return Err(Error::new(
                        ErrorKind::Unexpected,
                        format!(
                            "redis answered {} replies to {} commands",
                            answers.len(),
                            pending.len()
                        ),
                    )
                    .with_operation(op)
                    .with_context("endpoint", &self.endpoint))
                }
                Err(e) if transient(&e) => {
                    again = (0..pending.len()).collect();
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
            if again.len() < pending.len() {
                let cmds: Vec<_> = current.cmd_iter().collect();
                let mut retry = redis::pipe();
                for &pos in &again {
                    retry.add_command(cmds[pos].clone());
                }
                pending = again.iter().map(|&pos| pending[pos]).collect();
                current = retry;
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.expect("every command has a reply once the loop ends"))
            .collect())
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
             +get +set +exists +strlen +getrange +unlink on the keys under redis.key_prefix \
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
