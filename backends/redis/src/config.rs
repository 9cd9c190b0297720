use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use kvpool_core::size::ByteSize;
use kvpool_core::{Error, Result};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

/// Where a server listens when neither `url` nor `cluster_nodes` is given.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// The `[redis]` section.
///
/// `Debug` never shows `password`, nor a password embedded in a URL: configs
/// end up in logs and bug reports.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// One server: `redis://host:port/db`, `rediss://` for TLS, `unix:///path/redis.sock`.
    /// Unset with `cluster_nodes` empty means [`DEFAULT_URL`].
    pub url: Option<String>,
    /// Seed nodes of a Redis Cluster (`redis://` or `rediss://` URLs); the rest of the
    /// topology is discovered. A list, or one comma-separated string (as environment
    /// variables give it). Exclusive with `url`.
    #[serde(deserialize_with = "string_or_list")]
    pub cluster_nodes: Vec<String>,
    /// ACL user name (redis 6+); overrides one given in the URL.
    pub username: Option<String>,
    /// Password (`requirepass` or the ACL user's); overrides one given in the URL.
    pub password: Option<String>,
    /// Prepended to every key, so one server can hold several pools or other data.
    pub key_prefix: String,
    /// Expire values this many milliseconds after they are written; 0 keeps them until
    /// the server evicts them.
    pub ttl_ms: u64,
    /// Connections per backend (per cluster client in cluster mode). Batches are split into
    /// pipelines that run concurrently over them.
    pub pool_size: usize,
    /// How long establishing one connection (TCP, TLS, AUTH) may take.
    pub connect_timeout_ms: u64,
    /// How long one pipeline may take, retries included; past it the call fails with
    /// `Timeout` rather than hang.
    pub request_timeout_ms: u64,
    /// Retries of a pipeline that failed for a reason that may pass (connection lost or
    /// refused, cluster reconfiguring, server loading).
    pub retries: u32,
    /// The first retry waits this long; each later one twice as long as the one before.
    pub retry_backoff_ms: u64,
    /// Value bytes in flight at once across all calls on this backend; bounds the memory
    /// that encoded commands and undecoded replies take.
    pub max_inflight_bytes: ByteSize,
    /// A pipeline is closed once its values reach this many bytes (a larger value goes alone).
    pub pipeline_bytes: ByteSize,
    /// A pipeline is closed once it holds this many keys.
    pub pipeline_keys: usize,
    /// PEM file of the CA that signed the server's certificate (`rediss://`); default: the
    /// system's trust store.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers with `tls-auth-clients yes`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            cluster_nodes: Vec::new(),
            username: None,
            password: None,
            key_prefix: "kvpool:".to_string(),
            ttl_ms: 0,
            pool_size: 4,
            connect_timeout_ms: 2_000,
            request_timeout_ms: 10_000,
            retries: 3,
            retry_backoff_ms: 50,
            max_inflight_bytes: ByteSize(64 << 20),
            pipeline_bytes: ByteSize(1 << 20),
            pipeline_keys: 256,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// How the backend reaches its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target<'a> {
    Single(&'a str),
    Cluster(&'a [String]),
}

impl RedisConfig {
    pub(crate) fn target(&self) -> Target<'_> {
        if self.cluster_nodes.is_empty() {
            Target::Single(self.url.as_deref().unwrap_or(DEFAULT_URL))
        } else {
            Target::Cluster(&self.cluster_nodes)
        }
    }

    /// Whether connections use TLS.
    pub(crate) fn uses_tls(&self) -> bool {
        match self.target() {
            Target::Single(url) => url.starts_with("rediss://"),
            Target::Cluster(nodes) => nodes.iter().any(|n| n.starts_with("rediss://")),
        }
    }

    /// Where the data lives, with any password in it masked: for descriptions and errors.
    pub fn endpoint(&self) -> String {
        match self.target() {
            Target::Single(url) => redact_url(url),
            Target::Cluster(nodes) => format!(
                "cluster {}",
                nodes
                    .iter()
                    .map(|n| redact_url(n))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks every field; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| {
            Err(Error::config_invalid(format!("{key} {msg}")).with_context("section", "redis"))
        };
        if self.url.is_some() && !self.cluster_nodes.is_empty() {
            return bad(
                "redis.url",
                "and redis.cluster_nodes are exclusive: give one server's url, or the cluster's \
                 seed nodes"
                    .into(),
            );
        }
        match self.target() {
            Target::Single(url) => check_url("redis.url", url, true)?,
            Target::Cluster(nodes) => {
                for (i, node) in nodes.iter().enumerate() {
                    check_url(&format!("redis.cluster_nodes[{i}]"), node, false)?;
                }
                let tls: Vec<bool> = nodes.iter().map(|n| n.starts_with("rediss://")).collect();
                if tls.iter().any(|&t| t != tls[0]) {
                    return bad(
                        "redis.cluster_nodes",
                        "mixes redis:// and rediss:// nodes; a cluster uses TLS on every node or \
                         on none"
                            .into(),
                    );
                }
            }
        }
        if self.username.is_some() && self.password.is_none() {
            return bad(
                "redis.username",
                "is set without redis.password; redis authenticates a user with a password".into(),
            );
        }
        if self.pool_size == 0 || self.pool_size > 256 {
            return bad(
                "redis.pool_size",
                format!("must be between 1 and 256, got {}", self.pool_size),
            );
        }
        for (key, ms) in [
            ("redis.connect_timeout_ms", self.connect_timeout_ms),
            ("redis.request_timeout_ms", self.request_timeout_ms),
        ] {
            if ms == 0 {
                return bad(key, "must be at least 1 (milliseconds)".into());
            }
        }
        if self.retries > 100 {
            return bad(
                "redis.retries",
                format!("must be at most 100, got {}", self.retries),
            );
        }
        if self.max_inflight_bytes.0 < (1 << 20) || self.max_inflight_bytes.0 > u32::MAX as u64 {
            return bad(
                "redis.max_inflight_bytes",
                format!(
                    "must be between 1 MiB and 4 GiB, got {}",
                    self.max_inflight_bytes
                ),
            );
        }
        if self.pipeline_bytes.0 == 0 || self.pipeline_bytes.0 > self.max_inflight_bytes.0 {
            return bad(
                "redis.pipeline_bytes",
                format!(
                    "must be between 1 B and redis.max_inflight_bytes ({}), got {}",
                    self.max_inflight_bytes, self.pipeline_bytes
                ),
            );
        }
        if self.pipeline_keys == 0 {
            return bad("redis.pipeline_keys", "must be at least 1".into());
        }
        if self.key_prefix.len() > 1024 {
            return bad(
                "redis.key_prefix",
                format!(
                    "is {} bytes; keep it under 1 KiB (it is stored with every key)",
                    self.key_prefix.len()
                ),
            );
        }
        let tls_files = [
            ("redis.tls_ca_file", &self.tls_ca_file),
            ("redis.tls_cert_file", &self.tls_cert_file),
            ("redis.tls_key_file", &self.tls_key_file),
        ];
        for (key, file) in tls_files {
            if file.is_some() && !self.uses_tls() {
                return bad(
                    key,
                    "is set but the server URL is not rediss://; use rediss:// to connect with TLS"
                        .into(),
                );
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad(
                "redis.tls_cert_file",
                "and redis.tls_key_file go together: a client certificate needs its key".into(),
            );
        }
        Ok(())
    }
}

fn check_url(key: &str, url: &str, unix_allowed: bool) -> Result<()> {
    let fail = |msg: String| {
        Err(
            Error::config_invalid(format!("{key} {:?} {msg}", redact_url(url)))
                .with_context("section", "redis"),
        )
    };
    let schemes: &[&str] = if unix_allowed {
        &["redis://", "rediss://", "unix://", "redis+unix://"]
    } else {
        &["redis://", "rediss://"]
    };
    if !schemes.iter().any(|s| url.starts_with(s)) {
        return fail(format!("must start with {}", schemes.join(" or ")));
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        // The parser's message never contains the URL, so it cannot leak the password.
        return fail(format!("is not a valid redis URL: {e}"));
    }
    Ok(())
}

/// `url` with the password of its user-info part replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let user_info = &rest[..at];
    let user = match user_info.find(':') {
        Some(colon) => format!("{}:***", &user_info[..colon]),
        // `redis://secret@host` is how some clients write a password with no user.
        None if !user_info.is_empty() => "***".to_string(),
        None => String::new(),
    };
    format!("{}{}{}", &url[..scheme_end], user, &rest[at..])
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|n| redact_url(n))
                    .collect::<Vec<_>>(),
            )
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("key_prefix", &self.key_prefix)
            .field("ttl_ms", &self.ttl_ms)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("retries", &self.retries)
            .field("retry_backoff_ms", &self.retry_backoff_ms)
            .field("max_inflight_bytes", &self.max_inflight_bytes)
            .field("pipeline_bytes", &self.pipeline_bytes)
            .field("pipeline_keys", &self.pipeline_keys)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .finish()
    }
}

/// A list of strings, or one string of comma-separated items.
fn string_or_list<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of URLs or one comma-separated string of URLs")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Vec<String>, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> std::result::Result<Vec<String>, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_core::{Config, ErrorKind};

    fn section(value: serde_json::Value) -> Result<RedisConfig> {
        let config = Config::from_extra_config(serde_json::json!({
            "backend": "redis",
            "redis": value,
        }))?;
        let cfg: RedisConfig = config.section("redis")?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn invalid(value: serde_json::Value, names: &str) {
        let err = section(value.clone()).expect_err(&value.to_string());
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
        assert!(err.to_string().contains(names), "{names} not in: {err}");
    }

    #[test]
    fn defaults_are_valid_and_reach_localhost() {
        let cfg = section(serde_json::json!({})).unwrap();
        assert_eq!(cfg.target(), Target::Single(DEFAULT_URL));
        assert_eq!(cfg.key_prefix, "kvpool:");
        assert!(!cfg.uses_tls());
    }

    #[test]
    fn keys_are_read_with_units_named() {
        let cfg = section(serde_json::json!({
            "url": "rediss://10.0.0.1:6380/2",
            "ttl_ms": "60000",
            "pool_size": 8,
            "max_inflight_bytes": "128MiB",
            "pipeline_bytes": "1MB",
            "tls_ca_file": "/etc/ca.pem",
        }))
        .unwrap();
        assert_eq!(cfg.ttl_ms, 60_000);
        assert_eq!(cfg.max_inflight_bytes, ByteSize(128 << 20));
        assert_eq!(cfg.pipeline_bytes, ByteSize(1 << 20));
        assert!(cfg.uses_tls());
    }

    #[test]
    fn cluster_nodes_accept_a_list_or_a_comma_separated_string() {
        let a = section(serde_json::json!({
            "cluster_nodes": ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]
        }))
        .unwrap();
        let b = section(serde_json::json!({
            "cluster_nodes": "redis://127.0.0.1:7000, redis://127.0.0.1:7001"
        }))
        .unwrap();
        assert_eq!(a.cluster_nodes, b.cluster_nodes);
        assert!(matches!(a.target(), Target::Cluster(n) if n.len() == 2));
    }

    #[test]
    fn bad_values_name_their_key() {
        invalid(serde_json::json!({"url": "http://x"}), "redis.url");
        invalid(
            serde_json::json!({"url": "redis://h:notaport"}),
            "redis.url",
        );
        invalid(
            serde_json::json!({"url": "redis://a", "cluster_nodes": ["redis://b"]}),
            "exclusive",
        );
        invalid(
            serde_json::json!({"cluster_nodes": ["redis://a:1", "unix:///s"]}),
            "redis.cluster_nodes[1]",
        );
        invalid(
            serde_json::json!({"cluster_nodes": ["redis://a:1", "rediss://b:2"]}),
            "mixes",
        );
        invalid(serde_json::json!({"pool_size": 0}), "redis.pool_size");
        invalid(
            serde_json::json!({"request_timeout_ms": 0}),
            "redis.request_timeout_ms",
        );
        invalid(
            serde_json::json!({"max_inflight_bytes": "1KB"}),
            "redis.max_inflight_bytes",
        );
        invalid(
            serde_json::json!({"pipeline_bytes": "1GB"}),
            "redis.pipeline_bytes",
        );
        invalid(serde_json::json!({"username": "u"}), "redis.username");
        invalid(
            serde_json::json!({"tls_ca_file": "/ca.pem"}),
            "redis.tls_ca_file",
        );
        invalid(
            serde_json::json!({"url": "rediss://h:1", "tls_cert_file": "/c.pem"}),
            "redis.tls_cert_file",
        );
        invalid(serde_json::json!({"passwrd": "x"}), "redis.passwrd");
        invalid(serde_json::json!({"ttl_ms": -1}), "redis.ttl_ms");
    }

    #[test]
    fn debug_and_endpoint_never_show_passwords() {
        let cfg = RedisConfig {
            url: Some("redis://alice:s3cret@db:6379/0".into()),
            password: Some("t0psecret".into()),
            username: Some("alice".into()),
            ..RedisConfig::default()
        };
        let shown = format!("{cfg:?} {}", cfg.endpoint());
        assert!(
            !shown.contains("s3cret") && !shown.contains("t0psecret"),
            "{shown}"
        );
        assert!(shown.contains("redis://alice:***@db:6379/0"), "{shown}");
        let cluster = RedisConfig {
            cluster_nodes: vec!["rediss://:pw@n1:7000".into()],
            ..RedisConfig::default()
        };
        let shown = format!("{cluster:?} {}", cluster.endpoint());
        assert!(!shown.contains("pw@"), "{shown}");
    }

    #[test]
    fn redact_url_handles_every_user_info_shape() {
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        assert_eq!(redact_url("redis://u:p@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(redact_url("redis://:p@h"), "redis://:***@h");
        assert_eq!(redact_url("redis://p@h"), "redis://***@h");
        assert_eq!(redact_url("redis://u:p:q@h"), "redis://u:***@h");
        assert_eq!(redact_url("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
        assert_eq!(redact_url("redis://h/0?x=a@b"), "redis://h/0?x=a@b");
        assert_eq!(redact_url("nonsense"), "nonsense");
    }
}
