//! Redis failures: which are worth a retry, and kvpool's error for each.

use kvpool_core::{Error, ErrorKind};
use redis::{RedisError, ServerErrorKind};

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
