//! The `redis` crate's client, for what kvpool's own does not speak: TLS and clusters.

use futures_util::future::join_all;
use kvpool_core::{Error, Result};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{ClientTlsConfig, Pipeline, RedisError, TlsCertificates, Value};

use super::command::{Reply, Val};
use crate::config::RedisConfig;

/// A reply of the `redis` crate as a [`Val`].
pub(super) fn val(v: &Value) -> Reply<'_> {
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

/// One connection of the `redis` crate; cheap to clone, clones share it.
#[derive(Clone)]
pub(super) enum Conn {
    /// Reconnects by itself after the link drops; requests made meanwhile wait for the
    /// new connection (bounded by the connect timeout) or fail. Used for TLS.
    Single(ConnectionManager),
    /// Routes each key to its slot's master, follows MOVED/ASK, refreshes the topology.
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends every command of `pipe` and returns one reply per command, in order. `Err`
    /// when the pipeline as a whole failed (the link dropped, a timeout).
    pub(super) async fn send(
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

/// The certificates `rediss://` connections use, read from the configured files.
pub(super) fn tls_certificates(cfg: &RedisConfig) -> Result<Option<TlsCertificates>> {
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
