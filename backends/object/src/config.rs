use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use kvpool_core::{Error, Result};
use object_store::path::Path;
use serde::Deserialize;
use url::Url;

/// The `[object]` section.
///
/// `Debug` never shows `access_key_id`, `secret_access_key`, `session_token`, the values
/// of `options`, nor a password embedded in `url` or `endpoint`: configs end up in logs
/// and bug reports.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ObjectConfig {
    /// Where values live: `s3://bucket/prefix`, `gs://bucket/prefix`,
    /// `az://container/prefix`, `file:///absolute/dir`, or `memory://` (in-process, for
    /// tests). Required.
    pub url: Option<String>,
    /// An S3-compatible server's base URL (MinIO, Ceph, moto, R2), instead of AWS.
    pub endpoint: Option<String>,
    /// The S3 region (default: `AWS_REGION`, else `us-east-1`).
    pub region: Option<String>,
    /// S3 access key id (default: `AWS_ACCESS_KEY_ID`).
    pub access_key_id: Option<String>,
    /// S3 secret access key (default: `AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: Option<String>,
    /// S3 session token of temporary credentials (default: `AWS_SESSION_TOKEN`).
    pub session_token: Option<String>,
    /// Allow plain `http://` endpoints (a local MinIO or moto); off, only HTTPS is used.
    pub allow_http: bool,
    /// Prepended to every object's name below the URL's prefix; may contain `/`.
    pub key_prefix: String,
    /// How `put` keeps the first value of a key (see [`PutMode`]).
    pub put_mode: PutMode,
    /// How long one request may take, retries included; past it the key fails with
    /// `Timeout` rather than hang.
    pub request_timeout_ms: u64,
    /// How long establishing one connection may take.
    pub connect_timeout_ms: u64,
    /// Retries of a request that failed for a reason that may pass (connection refused,
    /// 5xx, throttling), with exponential backoff from 50 ms.
    pub retries: u32,
    /// Requests in flight at once across all calls on this backend: bounds connections
    /// and the memory of values being sent or received.
    pub max_concurrent_requests: usize,
    /// Further `object_store` settings by their names (`aws_virtual_hosted_style_request`,
    /// `google_service_account_path`, `azure_storage_account_name`, ...), for what the keys
    /// above do not cover. Values are never printed.
    pub options: BTreeMap<String, String>,
}

/// How `put` keeps the value already stored under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PutMode {
    /// Find out at open: write a probe object twice with a create-only condition; if the
    /// store refuses the second write, use `create`, otherwise `head_then_put`.
    Auto,
    /// Conditional create (`If-None-Match: *` on S3, generation 0 on GCS, `O_EXCL` link on
    /// local files): atomic, one request.
    Create,
    /// Ask whether the key exists, then write unconditionally: two requests, and two
    /// writers racing on one key may both write (keys name their content, so both write
    /// the same bytes). For S3-compatible servers that ignore `If-None-Match`.
    HeadThenPut,
}

impl Default for ObjectConfig {
    fn default() -> Self {
        ObjectConfig {
            url: None,
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            allow_http: false,
            key_prefix: String::new(),
            put_mode: PutMode::Auto,
            request_timeout_ms: 30_000,
            connect_timeout_ms: 5_000,
            retries: 3,
            max_concurrent_requests: 32,
            options: BTreeMap::new(),
        }
    }
}

/// Which store a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreKind {
    S3,
    Gcs,
    Azure,
    /// The directory (absolute) holding the objects.
    File(PathBuf),
    Memory,
}

/// A validated `url`: the store and the prefix every object name starts with.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub kind: StoreKind,
    pub url: Url,
    pub prefix: Path,
}

const URL_FORMS: &str = "s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, \
                         file:///absolute/dir or memory://";

fn bad(key: &str, msg: impl fmt::Display) -> Error {
    Error::config_invalid(format!("{key} {msg}")).with_context("section", "object")
}

impl ObjectConfig {
    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Where the data lives, with any password in it masked: for descriptions and errors.
    pub fn location(&self) -> String {
        let url = self.url.as_deref().map_or_else(String::new, redact_url);
        match &self.endpoint {
            Some(e) => format!("{url} at {}", redact_url(e)),
            None => url,
        }
    }

    /// Checks every field and parses `url`; errors name the key.
    pub(crate) fn target(&self) -> Result<Target> {
        let raw = self
            .url
            .as_deref()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| bad("object.url", format!("is required: {URL_FORMS}")))?;
        let shown = redact_url(raw);
        let url = Url::parse(raw).map_err(|e| {
            bad(
                "object.url",
                format!("{shown:?} is not a URL ({e}): {URL_FORMS}"),
            )
        })?;
        let kind = match url.scheme() {
            "s3" | "s3a" => StoreKind::S3,
            "gs" => StoreKind::Gcs,
            "az" | "azure" | "abfs" | "abfss" | "adl" => StoreKind::Azure,
            "file" => {
                // The URL standard reads `file:dir` as `file:///dir`; a user who wrote it
                // most likely meant a relative directory, which object stores have not.
                if !raw.starts_with("file://") {
                    return Err(bad(
                        "object.url",
                        format!("{shown:?} is not file:///absolute/dir (three slashes)"),
                    ));
                }
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(bad(
                        "object.url",
                        format!(
                            "{shown:?} names a host; a local directory is file:///absolute/dir \
                             (three slashes)"
                        ),
                    ));
                }
                let dir = url.to_file_path().map_err(|()| {
                    bad(
                        "object.url",
                        format!("{shown:?} is not an absolute directory: file:///absolute/dir"),
                    )
                })?;
                StoreKind::File(dir)
            }
            "memory" => StoreKind::Memory,
            other => {
                return Err(bad(
                    "object.url",
                    format!("{shown:?} has scheme {other:?}; use {URL_FORMS}"),
                ))
            }
        };
        let cloud = matches!(kind, StoreKind::S3 | StoreKind::Gcs | StoreKind::Azure);
        if cloud && url.host_str().is_none_or(str::is_empty) {
            return Err(bad(
                "object.url",
                format!("{shown:?} names no bucket or container: {URL_FORMS}"),
            ));
        }
        let prefix = match kind {
            // The whole path is the directory, passed to the store as its root.
            StoreKind::File(_) => Path::default(),
            _ => Path::from_url_path(url.path()).map_err(|e| {
                bad(
                    "object.url",
                    format!("{shown:?} has an invalid prefix: {e}"),
                )
            })?,
        };

        let s3_only = [
            ("object.endpoint", self.endpoint.is_some()),
            ("object.region", self.region.is_some()),
            ("object.access_key_id", self.access_key_id.is_some()),
            ("object.secret_access_key", self.secret_access_key.is_some()),
            ("object.session_token", self.session_token.is_some()),
        ];
        if kind != StoreKind::S3 {
            if let Some((key, _)) = s3_only.iter().find(|(_, set)| *set) {
                return Err(bad(
                    key,
                    format!(
                        "applies to s3:// stores only; {shown:?} is not one (GCS and Azure \
                         take credentials from their environment variables or object.options)"
                    ),
                ));
            }
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(bad(
                "object.access_key_id",
                "and object.secret_access_key go together: give both, or neither to use \
                 AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or instance credentials",
            ));
        }
        if self.session_token.is_some() && self.access_key_id.is_none() {
            return Err(bad(
                "object.session_token",
                "is set without object.access_key_id and object.secret_access_key; a session \
                 token belongs to temporary credentials",
            ));
        }
        if let Some(endpoint) = &self.endpoint {
            let shown = redact_url(endpoint);
            let parsed = Url::parse(endpoint).map_err(|e| {
                bad(
                    "object.endpoint",
                    format!("{shown:?} is not a URL ({e}); give http(s)://host:port"),
                )
            })?;
            match parsed.scheme() {
                "https" => {}
                "http" if self.allow_http => {}
                "http" => {
                    return Err(bad(
                        "object.endpoint",
                        format!(
                            "{shown:?} is plain http but object.allow_http is false; set it to \
                             true for a local server, or use https"
                        ),
                    ))
                }
                other => {
                    return Err(bad(
                        "object.endpoint",
                        format!("{shown:?} has scheme {other:?}; give http(s)://host:port"),
                    ))
                }
            }
        }
        if self.key_prefix.len() > 512 {
            return Err(bad(
                "object.key_prefix",
                format!(
                    "is {} bytes; keep it under 512 (it is part of every object's name)",
                    self.key_prefix.len()
                ),
            ));
        }
        if self.key_prefix.starts_with('/')
            || self.key_prefix.split('/').any(|s| s == "." || s == "..")
        {
            return Err(bad(
                "object.key_prefix",
                format!(
                    "{:?} must be relative to the URL's prefix: no leading '/', no '.' or '..'",
                    self.key_prefix
                ),
            ));
        }
        for (key, ms) in [
            ("object.request_timeout_ms", self.request_timeout_ms),
            ("object.connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if ms == 0 {
                return Err(bad(key, "must be at least 1 (milliseconds)"));
            }
        }
        if self.retries > 20 {
            return Err(bad(
                "object.retries",
                format!("must be at most 20, got {}", self.retries),
            ));
        }
        if self.max_concurrent_requests == 0 || self.max_concurrent_requests > 4096 {
            return Err(bad(
                "object.max_concurrent_requests",
                format!(
                    "must be between 1 and 4096, got {}",
                    self.max_concurrent_requests
                ),
            ));
        }
        if !cloud && !self.options.is_empty() {
            return Err(bad(
                "object.options",
                format!("applies to s3://, gs:// and az:// stores only; {shown:?} is not one"),
            ));
        }
        Ok(Target { kind, url, prefix })
    }
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
    let user = match rest[..at].find(':') {
        Some(colon) => format!("{}:***", &rest[..colon]),
        // abfs://container@account... names a container, not a secret.
        None => rest[..at].to_string(),
    };
    format!("{}{}{}", &url[..scheme_end], user, &rest[at..])
}

impl fmt::Debug for ObjectConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: &Option<String>| v.as_ref().map(|_| "***");
        f.debug_struct("ObjectConfig")
            .field("url", &self.url.as_deref().map(redact_url))
            .field("endpoint", &self.endpoint.as_deref().map(redact_url))
            .field("region", &self.region)
            .field("access_key_id", &hidden(&self.access_key_id))
            .field("secret_access_key", &hidden(&self.secret_access_key))
            .field("session_token", &hidden(&self.session_token))
            .field("allow_http", &self.allow_http)
            .field("key_prefix", &self.key_prefix)
            .field("put_mode", &self.put_mode)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("retries", &self.retries)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field(
                "options",
                &self
                    .options
                    .keys()
                    .map(|k| (k.as_str(), "***"))
                    .collect::<BTreeMap<_, _>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvpool_core::{Config, ErrorKind};

    fn section(value: serde_json::Value) -> Result<(ObjectConfig, Target)> {
        let config = Config::from_extra_config(serde_json::json!({
            "backend": "object",
            "object": value,
        }))?;
        let cfg: ObjectConfig = config.section("object")?;
        let target = cfg.target()?;
        Ok((cfg, target))
    }

    fn invalid(value: serde_json::Value, names: &str) {
        let err = section(value.clone()).expect_err(&value.to_string());
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
        assert!(err.to_string().contains(names), "{names} not in: {err}");
    }

    #[test]
    fn urls_name_the_store_and_the_prefix() {
        let (_, t) = section(serde_json::json!({"url": "s3://bucket/a/b"})).unwrap();
        assert_eq!(t.kind, StoreKind::S3);
        assert_eq!(t.prefix.as_ref(), "a/b");
        let (_, t) = section(serde_json::json!({"url": "gs://bucket"})).unwrap();
        assert_eq!((t.kind, t.prefix.as_ref()), (StoreKind::Gcs, ""));
        let (_, t) = section(serde_json::json!({"url": "az://container/p"})).unwrap();
        assert_eq!(t.kind, StoreKind::Azure);
        let (_, t) = section(serde_json::json!({"url": "file:///var/kv%20pool"})).unwrap();
        assert_eq!(t.kind, StoreKind::File(PathBuf::from("/var/kv pool")));
        let (_, t) = section(serde_json::json!({"url": "memory://"})).unwrap();
        assert_eq!(t.kind, StoreKind::Memory);
    }

    #[test]
    fn keys_are_read_from_strings_as_environment_variables_give_them() {
        let (cfg, _) = section(serde_json::json!({
            "url": "s3://b",
            "endpoint": "http://127.0.0.1:9000",
            "allow_http": "true",
            "request_timeout_ms": "1500",
            "max_concurrent_requests": "8",
            "put_mode": "head_then_put",
            "access_key_id": "AKIA",
            "secret_access_key": "s3cret",
            "options": {"aws_virtual_hosted_style_request": "false"},
        }))
        .unwrap();
        assert!(cfg.allow_http);
        assert_eq!(cfg.request_timeout(), Duration::from_millis(1500));
        assert_eq!(cfg.max_concurrent_requests, 8);
        assert_eq!(cfg.put_mode, PutMode::HeadThenPut);
    }

    #[test]
    fn bad_values_name_their_key() {
        invalid(serde_json::json!({}), "object.url is required");
        invalid(serde_json::json!({"url": "not a url"}), "object.url");
        invalid(serde_json::json!({"url": "ftp://h/x"}), "scheme \"ftp\"");
        invalid(serde_json::json!({"url": "s3:///prefix"}), "no bucket");
        invalid(
            serde_json::json!({"url": "file://host/dir"}),
            "names a host",
        );
        invalid(serde_json::json!({"url": "file:relative"}), "three slashes");
        invalid(
            serde_json::json!({"url": "s3://b", "access_key_id": "a"}),
            "go together",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "session_token": "t"}),
            "object.session_token",
        );
        invalid(
            serde_json::json!({"url": "gs://b", "access_key_id": "a", "secret_access_key": "s"}),
            "object.access_key_id applies to s3://",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "endpoint": "http://127.0.0.1:9000"}),
            "object.allow_http",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "endpoint": "127.0.0.1:9000"}),
            "object.endpoint",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "key_prefix": "/abs"}),
            "object.key_prefix",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "key_prefix": "a/../b"}),
            "object.key_prefix",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "request_timeout_ms": 0}),
            "object.request_timeout_ms",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "max_concurrent_requests": 0}),
            "object.max_concurrent_requests",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "retries": 99}),
            "object.retries",
        );
        invalid(
            serde_json::json!({"url": "file:///tmp/x", "options": {"a": "b"}}),
            "object.options",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "put_mode": "sometimes"}),
            "object.put_mode",
        );
        invalid(
            serde_json::json!({"url": "s3://b", "secret": "x"}),
            "object.secret",
        );
    }

    #[test]
    fn debug_and_location_never_show_credentials() {
        let cfg = ObjectConfig {
            url: Some("s3://bucket/p".into()),
            endpoint: Some("https://user:pw0rd@minio:9000".into()),
            access_key_id: Some("AKIAEXAMPLEID".into()),
            secret_access_key: Some("wJalrXUtnFEMI".into()),
            session_token: Some("FwoGZXIvYXdzE".into()),
            options: BTreeMap::from([("azure_storage_account_key".into(), "c2VjcmV0".into())]),
            ..ObjectConfig::default()
        };
        let shown = format!("{cfg:?} {}", cfg.location());
        for secret in [
            "AKIAEXAMPLEID",
            "wJalrXUtnFEMI",
            "FwoGZXIvYXdzE",
            "c2VjcmV0",
            "pw0rd",
        ] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains("https://user:***@minio:9000"), "{shown}");
        assert!(shown.contains("azure_storage_account_key"), "{shown}");
        assert_eq!(
            redact_url("abfs://container@account.dfs.core.windows.net/p"),
            "abfs://container@account.dfs.core.windows.net/p"
        );
    }
}
