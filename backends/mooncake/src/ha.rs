//! Master HA: `etcd://` master addresses, and following the leader.
//!
//! `mooncake_master --enable_ha` processes elect a leader through etcd; the
//! leader publishes its RPC address under `mooncake-store/<cluster>/master_view`
//! with a lease, and standbys do not listen until they take over. A client
//! configured with `etcd://h1:p1;h2:p2` (the official client's form) reads that
//! key over etcd's v3 JSON gateway at open, and again when the master it talks
//! to stops answering. The view's version is the key's create revision, which
//! grows with every new leader, so a stale read never moves a client back.

use std::time::{Duration, Instant};

use base64::Engine as _;
use kvpool_core::{Error, ErrorKind, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::rpc::RpcPool;

const KEY: &str = "mooncake.master_server_address";
/// Mooncake's `--cluster_id` default; `MC_STORE_CLUSTER_ID` overrides it, as
/// for the official client.
pub(crate) const DEFAULT_CLUSTER_ID: &str = "mooncake_cluster";
/// etcd's answer to a one-key range is a few hundred bytes; anything past
/// this is not etcd, and is refused before it is buffered.
const MAX_REPLY: usize = 64 << 10;
/// How stale a resolved view may be before a failing call asks etcd again:
/// many calls failing together during a failover make one etcd read, not one each.
const RESOLVE_INTERVAL: Duration = Duration::from_millis(200);

/// What `master_server_address` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MasterAddress {
    /// One master, `host:port`.
    Direct(String),
    /// An HA cluster: the etcd endpoints (`host:port`) that elect its leader.
    Etcd(Vec<String>),
}

/// The leader as etcd publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MasterView {
    pub leader: String,
    /// The key's create revision: a new leader creates the key anew.
    pub version: i64,
}

fn bad(msg: String) -> Error {
    Error::config_invalid(msg).with_context("section", "mooncake")
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && !host.contains(['/', ' ', '\t'])
                && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// Parses `master_server_address`: `host:port`, or `etcd://h1:p1;h2:p2` (`,`
/// also separates, and an endpoint may carry `http://`, as etcd's own clients
/// accept). Errors name the key.
pub(crate) fn parse_master_address(raw: &str) -> Result<MasterAddress> {
    let addr = raw.trim();
    let Some((scheme, rest)) = addr.split_once("://") else {
        if is_host_port(addr) {
            return Ok(MasterAddress::Direct(addr.to_owned()));
        }
        return Err(bad(format!(
            "{KEY} {addr:?} must be host:port, like \"10.0.0.1:50051\", or \
             etcd://host:port[;host:port...] for an HA cluster"
        )));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "etcd" => {}
        "redis" | "k8s" => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{KEY} {addr:?}: kvpool follows an HA master's leader through etcd only; \
                     run the masters with --ha_backend_type=etcd and use \
                     etcd://host:port[;host:port...]"
                ),
            ))
        }
        other => {
            return Err(bad(format!(
                "{KEY} {addr:?} has the unknown scheme {other:?}; use host:port, or \
                 etcd://host:port[;host:port...] for an HA cluster"
            )))
        }
    }
    let mut endpoints = Vec::new();
    for part in rest.split([';', ',']) {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let lower = part.to_ascii_lowercase();
        let bare = if lower.starts_with("https://") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "{KEY}: the etcd endpoint {part:?} uses TLS, which kvpool's etcd client does \
                     not speak; give the endpoints' plain http host:port"
                ),
            ));
        } else if lower.starts_with("http://") {
            &part["http://".len()..]
        } else {
            part
        };
        let bare = bare.strip_suffix('/').unwrap_or(bare);
        if !is_host_port(bare) {
            return Err(bad(format!(
                "{KEY} {addr:?}: the etcd endpoint {part:?} must be host:port, like \
                 \"10.0.0.1:2379\""
            )));
        }
        endpoints.push(bare.to_owned());
    }
    if endpoints.is_empty() {
        return Err(bad(format!(
            "{KEY} {addr:?} names no etcd endpoint; write etcd://host:port[;host:port...]"
        )));
    }
    Ok(MasterAddress::Etcd(endpoints))
}

/// The etcd key an HA cluster's leader is published under.
pub(crate) fn master_view_key(cluster_id: &str) -> String {
    let id = cluster_id.trim();
    let id = if id.is_empty() {
        DEFAULT_CLUSTER_ID
    } else {
        id
    };
    format!(
        "mooncake-store/{}/master_view",
        id.strip_suffix('/').unwrap_or(id)
    )
}

/// Why etcd's answer could not be used. Never a panic: the bytes come from the network.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ReplyError {
    #[error("not an HTTP response")]
    NotHttp,
    #[error("HTTP status {status}: {body}")]
    Status { status: u16, body: String },
    #[error("malformed chunked body")]
    Chunked,
    #[error("the body is not JSON: {0}")]
    Json(String),
    #[error("{0}")]
    Field(String),
}

/// Splits an HTTP/1.x response into status and body (Content-Length and
/// chunked bodies both handled; without either, the rest is the body).
pub(crate) fn split_http(reply: &[u8]) -> std::result::Result<(u16, Vec<u8>), ReplyError> {
    let end = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ReplyError::NotHttp)?;
    let head = std::str::from_utf8(&reply[..end]).map_err(|_| ReplyError::NotHttp)?;
    let body = &reply[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(ReplyError::NotHttp);
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(ReplyError::NotHttp)?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| ReplyError::NotHttp)?);
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n).ok_or(ReplyError::NotHttp)?.to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> std::result::Result<Vec<u8>, ReplyError> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or(ReplyError::Chunked)?;
        let size_field = std::str::from_utf8(&rest[..eol]).map_err(|_| ReplyError::Chunked)?;
        let size_hex = size_field.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| ReplyError::Chunked)?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        // `size` comes off the wire: bounded by what was actually received.
        let chunk = rest.get(..size).ok_or(ReplyError::Chunked)?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or(ReplyError::Chunked)?;
    }
}

/// Decodes etcd's JSON answer to a range request for `key`: the leader's
/// address and view version, or `None` when no leader is published.
pub(crate) fn decode_range_reply(
    body: &[u8],
    key: &str,
) -> std::result::Result<Option<MasterView>, ReplyError> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ReplyError::Json(e.to_string()))?;
    let field = |m: String| ReplyError::Field(m);
    let obj = json
        .as_object()
        .ok_or_else(|| field("the reply is not a JSON object".into()))?;
    if let Some(err) = obj.get("error").or_else(|| obj.get("message")) {
        return Err(field(format!("etcd answered with an error: {err}")));
    }
    let kvs = match obj.get("kvs") {
        // etcd's gateway leaves out empty lists: no key, no leader yet.
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::Array(kvs)) => kvs,
        Some(_) => return Err(field("\"kvs\" is not a list".into())),
    };
    let b64 = |name: &str, v: Option<&serde_json::Value>| -> std::result::Result<Vec<u8>, _> {
        let s = v
            .and_then(|v| v.as_str())
            .ok_or_else(|| field(format!("kvs[0].{name} is missing or not a string")))?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| field(format!("kvs[0].{name} is not base64: {e}")))
    };
    let Some(kv) = kvs.first() else {
        return Ok(None);
    };
    if kv.get("key").is_some() && b64("key", kv.get("key"))? != key.as_bytes() {
        return Err(field(format!("etcd answered for another key than {key:?}")));
    }
    let value = b64("value", kv.get("value"))?;
    let leader = String::from_utf8(value)
        .map_err(|_| field("the leader address is not UTF-8".into()))?
        .trim()
        .to_owned();
    if !is_host_port(&leader) {
        return Err(field(format!(
            "the published leader address {leader:?} is not host:port"
        )));
    }
    // The gateway writes 64-bit integers as strings; accept numbers too.
    let version = match kv.get("create_revision") {
        None => 0,
        Some(serde_json::Value::String(s)) => s
            .parse::<i64>()
            .map_err(|_| field(format!("kvs[0].create_revision {s:?} is not an integer")))?,
        Some(v) => v
            .as_i64()
            .ok_or_else(|| field(format!("kvs[0].create_revision {v} is not an integer")))?,
    };
    Ok(Some(MasterView { leader, version }))
}

/// One range request over plain HTTP/1.0, so the reply ends at EOF and is
/// never chunked by etcd; bounded in time and size.
async fn range_request(
    endpoint: &str,
    key: &str,
    timeout: Duration,
) -> std::result::Result<Vec<u8>, String> {
    let body = format!(
        "{{\"key\":\"{}\"}}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let request = format!(
        "POST /v3/kv/range HTTP/1.0\r\nHost: {endpoint}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut stream = TcpStream::connect(endpoint)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send: {e}"))?;
        let mut reply = Vec::with_capacity(1024);
        let mut limited = (&mut stream).take(MAX_REPLY as u64 + 1);
        limited
            .read_to_end(&mut reply)
            .await
            .map_err(|e| format!("the connection broke: {e}"))?;
        if reply.len() > MAX_REPLY {
            return Err(format!("the reply exceeds {MAX_REPLY} bytes"));
        }
        Ok(reply)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

/// Reads the current leader from the first etcd endpoint that answers,
/// trying them from `first` on (the one that answered last time: a dead
/// endpoint then costs a timeout once, not on every failover). Returns the
/// view and the index of the endpoint that gave it.
pub(crate) async fn resolve(
    endpoints: &[String],
    first: usize,
    key: &str,
    timeout: Duration,
) -> Result<(MasterView, usize)> {
    let mut failures = Vec::new();
    let n = endpoints.len();
    for index in (0..n).map(|i| (first + i) % n) {
        let endpoint = &endpoints[index];
        let reply = match range_request(endpoint, key, timeout).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{endpoint}: {e}"));
                continue;
            }
        };
        let decoded = split_http(&reply).and_then(|(status, body)| {
            if status == 200 {
                decode_range_reply(&body, key)
            } else {
                let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                Err(ReplyError::Status { status, body: text })
            }
        });
        match decoded {
            Ok(Some(view)) => return Ok((view, index)),
            Ok(None) => {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "etcd at {endpoint} has no mooncake_master leader under {key:?} (no \
                         master with --enable_ha is serving yet, or its cluster_id differs; \
                         MC_STORE_CLUSTER_ID names the cluster)"
                    ),
                )
                .with_context("backend", "mooncake"))
            }
            Err(e @ ReplyError::Field(_)) | Err(e @ ReplyError::Json(_)) => {
                // A well-formed HTTP answer with the wrong contents is not a
                // reachability problem another endpoint would fix.
                return Err(Error::new(
                    ErrorKind::Unexpected,
                    format!("cannot read the mooncake leader from etcd at {endpoint}: {e}"),
                )
                .with_context("key", key)
                .with_context("backend", "mooncake"));
            }
            Err(e) => failures.push(format!("{endpoint}: {e}")),
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!(
            "no etcd endpoint told the mooncake master's leader: {}",
            failures.join("; ")
        ),
    )
    .with_context("backend", "mooncake"))
}

/// An HA cluster's leader, shared by every connection pool of one backend so
/// that a failover is looked up once.
#[derive(Debug)]
pub(crate) struct Leader {
    endpoints: Vec<String>,
    key: String,
    timeout: Duration,
    /// The last view, and when a lookup last finished.
    view: parking_lot::Mutex<(MasterView, Instant)>,
    /// Held during a lookup; the endpoint that answered last.
    lookup: tokio::sync::Mutex<usize>,
}

impl Leader {
    /// Resolves the leader now; an error when etcd cannot say.
    pub(crate) async fn connect(
        endpoints: Vec<String>,
        cluster_id: &str,
        timeout: Duration,
    ) -> Result<Self> {
        let key = master_view_key(cluster_id);
        let (view, good) = resolve(&endpoints, 0, &key, timeout).await?;
        Ok(Leader {
            endpoints,
            key,
            timeout,
            view: parking_lot::Mutex::new((view, Instant::now())),
            lookup: tokio::sync::Mutex::new(good),
        })
    }

    /// The leader as last resolved.
    pub(crate) fn current(&self) -> MasterView {
        self.view.lock().0.clone()
    }

    /// The leader, read again from etcd unless a lookup finished within
    /// [`RESOLVE_INTERVAL`]. While another call looks it up, the view held is
    /// returned at once: a failing call stays fast, and the next one sees the
    /// result. A view older than the one held is ignored.
    async fn refresh(&self) -> MasterView {
        let Ok(mut good) = self.lookup.try_lock() else {
            return self.current();
        };
        if self.view.lock().1.elapsed() < RESOLVE_INTERVAL {
            return self.current();
        }
        let found = resolve(&self.endpoints, *good, &self.key, self.timeout).await;
        let mut held = self.view.lock();
        match found {
            Ok((view, index)) => {
                *good = index;
                if view.version >= held.0.version {
                    held.0 = view;
                } else {
                    tracing::debug!(?view, held = ?held.0, "etcd sent an older view");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot re-read the mooncake leader"),
        }
        held.1 = Instant::now();
        held.0.clone()
    }

    /// After a call to `failed` could not reach it: points `pool` at the
    /// current leader. True when the pool now points elsewhere, so a retry
    /// may reach a live master.
    pub(crate) async fn follow(&self, pool: &RpcPool, failed: &str) -> bool {
        if pool.addr() != failed {
            return true;
        }
        let view = self.refresh().await;
        if view.leader == failed {
            return false;
        }
        if pool.repoint(failed, &view.leader) {
            tracing::info!(
                from = failed,
                to = view.leader.as_str(),
                version = view.version,
                "mooncake master leader changed; following it"
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses_parse() {
        assert_eq!(
            parse_master_address(" 10.0.0.1:50051 ").unwrap(),
            MasterAddress::Direct("10.0.0.1:50051".into())
        );
        assert_eq!(
            parse_master_address("etcd://10.0.0.1:2379").unwrap(),
            MasterAddress::Etcd(vec!["10.0.0.1:2379".into()])
        );
        assert_eq!(
            parse_master_address("etcd://h1:2379;h2:2379, http://h3:2379/;").unwrap(),
            MasterAddress::Etcd(vec!["h1:2379".into(), "h2:2379".into(), "h3:2379".into()])
        );
        assert_eq!(
            parse_master_address("etcd://[::1]:2379").unwrap(),
            MasterAddress::Etcd(vec!["[::1]:2379".into()])
        );
    }

    #[test]
    fn malformed_master_addresses_name_the_key() {
        for (addr, kind) in [
            ("nohost", ErrorKind::ConfigInvalid),
            (":50051", ErrorKind::ConfigInvalid),
            ("h:0", ErrorKind::ConfigInvalid),
            ("h:70000", ErrorKind::ConfigInvalid),
            ("etcd://", ErrorKind::ConfigInvalid),
            ("etcd://;,", ErrorKind::ConfigInvalid),
            ("etcd://h1", ErrorKind::ConfigInvalid),
            ("etcd://h1:2379;h2", ErrorKind::ConfigInvalid),
            ("etcd://h1:2379/path", ErrorKind::ConfigInvalid),
            ("zk://h1:2181", ErrorKind::ConfigInvalid),
            ("etcd://https://h1:2379", ErrorKind::Unsupported),
            ("redis://h1:6379", ErrorKind::Unsupported),
            ("k8s://ns", ErrorKind::Unsupported),
        ] {
            let e = parse_master_address(addr).unwrap_err();
            assert_eq!(e.kind(), kind, "{addr}: {e}");
            assert!(
                e.to_string().contains("master_server_address"),
                "{addr}: {e}"
            );
        }
    }

    #[test]
    fn the_view_key_follows_the_cluster_id() {
        assert_eq!(
            master_view_key(""),
            "mooncake-store/mooncake_cluster/master_view"
        );
        assert_eq!(master_view_key("c1/"), "mooncake-store/c1/master_view");
    }

    const VIEW_KEY: &str = "mooncake-store/mooncake_cluster/master_view";

    /// Captured from etcd 3.4.23 with two `mooncake_master --enable_ha` running.
    const CAPTURED: &str = r#"{"header":{"cluster_id":"14841639068965178418","member_id":"10276657743932975437","revision":"2","raft_term":"2"},"kvs":[{"key":"bW9vbmNha2Utc3RvcmUvbW9vbmNha2VfY2x1c3Rlci9tYXN0ZXJfdmlldw==","create_revision":"2","mod_revision":"2","version":"1","value":"MTI3LjAuMC4xOjI1OTAy","lease":"7587899381526697734"}],"count":"1"}"#;

    #[test]
    fn etcd_replies_decode() {
        let view = decode_range_reply(CAPTURED.as_bytes(), VIEW_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(
            view,
            MasterView {
                leader: "127.0.0.1:25902".into(),
                version: 2
            }
        );
        // No leader yet: etcd leaves `kvs` out.
        let empty = r#"{"header":{"cluster_id":"1","revision":"3"}}"#;
        assert_eq!(
            decode_range_reply(empty.as_bytes(), VIEW_KEY).unwrap(),
            None
        );
        let numeric = r#"{"kvs":[{"value":"MTI3LjAuMC4xOjI1OTAy","create_revision":7}]}"#;
        assert_eq!(
            decode_range_reply(numeric.as_bytes(), VIEW_KEY)
                .unwrap()
                .unwrap()
                .version,
            7
        );
    }

    #[test]
    fn malformed_etcd_replies_are_errors() {
        for (body, says) in [
            ("", "not JSON"),
            ("[1,2]", "not a JSON object"),
            (r#"{"kvs": 3}"#, "not a list"),
            (r#"{"kvs":[{}]}"#, "value is missing"),
            (r#"{"kvs":[{"value":"!!"}]}"#, "not base64"),
            (r#"{"kvs":[{"value":"/w=="}]}"#, "not UTF-8"),
            (r#"{"kvs":[{"value":"bm9wb3J0"}]}"#, "not host:port"),
            (
                r#"{"kvs":[{"value":"MTI3LjAuMC4xOjI1OTAy","create_revision":"x"}]}"#,
                "not an integer",
            ),
            (
                r#"{"kvs":[{"key":"b3RoZXI=","value":"MTI3LjAuMC4xOjI1OTAy"}]}"#,
                "another key",
            ),
            (
                r#"{"error":"etcdserver: request timed out","code":14}"#,
                "request timed out",
            ),
        ] {
            let e = decode_range_reply(body.as_bytes(), VIEW_KEY).unwrap_err();
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn http_replies_split() {
        let ok = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            CAPTURED.len(),
            CAPTURED
        );
        let (status, body) = split_http(ok.as_bytes()).unwrap();
        assert_eq!((status, body.as_slice()), (200, CAPTURED.as_bytes()));
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{\"a\r\n2;x=y\r\n\":\r\n1\r\n1\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(split_http(chunked.as_bytes()).unwrap().1, b"{\"a\":1}");
        let refused = "HTTP/1.1 404 Not Found\r\n\r\nnope";
        assert_eq!(split_http(refused.as_bytes()).unwrap().0, 404);
        for bad in [
            &b""[..],
            b"garbage",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 abc\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nshort",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffff\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        ] {
            assert!(
                split_http(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn unreachable_etcd_is_unavailable_naming_every_endpoint() {
        // Port 1 on loopback: nothing listens, the connect is refused at once.
        let e = resolve(
            &["127.0.0.1:1".into(), "127.0.0.2:1".into()],
            1,
            VIEW_KEY,
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.is_temporary());
        let text = e.to_string();
        assert!(
            text.contains("127.0.0.1:1") && text.contains("127.0.0.2:1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_server_that_is_not_etcd_is_refused_without_panic() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            // An endless reply: the client stops at its bound.
            let (mut s, _) = listener.accept().await.unwrap();
            let chunk = vec![b'x'; 16 << 10];
            while s.write_all(&chunk).await.is_ok() {}
        });
        let e = resolve(&[addr], 0, VIEW_KEY, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("exceeds"), "{e}");
    }

    /// An etcd stand-in answering every range request with `view`'s leader.
    async fn fake_etcd(view: std::sync::Arc<parking_lot::Mutex<(String, i64)>>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (leader, version) = view.lock().clone();
                tokio::spawn(async move {
                    let mut request = vec![0u8; 4096];
                    let _ = s.read(&mut request).await;
                    let body = format!(
                        r#"{{"kvs":[{{"value":"{}","create_revision":"{version}"}}]}}"#,
                        base64::engine::general_purpose::STANDARD.encode(leader)
                    );
                    let reply = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes()).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_pool_follows_newer_leaders_only() {
        let view = std::sync::Arc::new(parking_lot::Mutex::new(("10.0.0.1:1".to_owned(), 2)));
        let etcd = fake_etcd(view.clone()).await;
        let leader = Leader::connect(vec!["127.0.0.1:1".into(), etcd], "", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(leader.current().leader, "10.0.0.1:1");
        assert_eq!(*leader.lookup.lock().await, 1, "the endpoint that answered");
        let pool = RpcPool::new(
            "10.0.0.1:1".into(),
            1,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        // Same leader: nowhere to go.
        tokio::time::sleep(RESOLVE_INTERVAL).await;
        assert!(!leader.follow(&pool, "10.0.0.1:1").await);

        *view.lock() = ("10.0.0.2:2".into(), 4);
        // Within the interval the held view answers, without asking etcd.
        assert!(!leader.follow(&pool, "10.0.0.1:1").await);
        tokio::time::sleep(RESOLVE_INTERVAL).await;
        let generation = pool.generation();
        assert!(leader.follow(&pool, "10.0.0.1:1").await);
        assert_eq!(pool.addr(), "10.0.0.2:2");
        assert_eq!(pool.generation(), generation + 1);
        // A call that failed on the old address: the pool already moved.
        assert!(leader.follow(&pool, "10.0.0.1:1").await);

        // A stale view (an older create revision) never moves a client back.
        *view.lock() = ("10.0.0.1:1".into(), 3);
        tokio::time::sleep(RESOLVE_INTERVAL).await;
        assert!(!leader.follow(&pool, "10.0.0.2:2").await);
        assert_eq!(pool.addr(), "10.0.0.2:2");
        assert_eq!(leader.current().version, 4);
    }
}
