use std::time::Duration;

use kvpool_core::size::ByteSize;
use kvpool_core::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// The `mooncake` section: Mooncake's own `mooncake.json` keys, as the
/// Ascend Store guide writes them, plus a few of kvpool's.
///
/// This crate's config section merges `$MOONCAKE_CONFIG_PATH` into it and
/// applies `MOONCAKE_MASTER` / `MOONCAKE_GLOBAL_SEGMENT_SIZE` over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MooncakeConfig {
    /// `host:port` of `mooncake_master`'s RPC service, or, for masters in HA
    /// mode, `etcd://host:port[;host:port...]`: the etcd endpoints the leader
    /// is looked up in (at open, and again whenever the master stops answering).
    pub master_server_address: String,
    /// Only `"P2PHANDSHAKE"` is supported: segment descriptors are exchanged
    /// peer to peer, with no etcd or HTTP metadata server.
    pub metadata_server: String,
    /// `"tcp"`. `"ascend"` (the guide's value on NPUs) is refused with a hint.
    pub protocol: String,
    /// RDMA/NPU device; unused by the tcp transport and accepted for compatibility.
    pub device_name: String,
    /// The address peers reach this process at. Empty: `VLLM_HOST_IP`, else
    /// the local address of the route to the master.
    pub local_hostname: String,
    /// Bytes this process contributes to the pool. `0` makes it a pure
    /// client that stores into other processes' segments.
    pub global_segment_size: ByteSize,
    /// The official client's staging buffer; accepted for compatibility,
    /// unused because kvpool transfers straight from the caller's memory.
    pub local_buffer_size: ByteSize,
    /// Ask the master to allocate in a segment on this host.
    pub alloc_in_same_node: bool,
    /// Mooncake's tenant; `"default"` unless the cluster uses tenants.
    pub tenant_id: String,
    /// Replicas per object.
    pub replica_num: u64,
    /// Master RPC timeout; `MC_RPC_TIMEOUT_MS` overrides it (default 30 s,
    /// coro_rpc's).
    pub rpc_timeout_ms: Option<u64>,
    /// Connection set-up bound (master, handshake, data);
    /// `ASCEND_CONNECT_TIMEOUT` overrides it (default 10 s).
    pub connect_timeout_ms: Option<u64>,
    /// Per-transfer bound; `ASCEND_TRANSFER_TIMEOUT` overrides it (default 10 s).
    pub transfer_timeout_ms: Option<u64>,
    /// How long a put retries while the master answers NO_AVAILABLE_HANDLE
    /// (eviction is asynchronous), before reporting NoSpace.
    pub no_space_retry_ms: u64,
    /// Connections to the master.
    pub rpc_connections: usize,
    /// TCP congestion control for data connections; loopback runs about 2.5x
    /// faster with `cubic` than with `bbr`. Empty keeps the system default.
    pub tcp_congestion: String,
    /// Store a CRC-64 with each put, as the official client does under
    /// `MOONCAKE_STORE_CHECKSUM=1` (which also turns this on). Reads verify a
    /// stored checksum whatever this says.
    pub checksum: bool,
    /// vLLM 0.33's topology switch: `"embedded"` (this process contributes
    /// `global_segment_size`, or is a pure client with 0) or `"standalone-store"` (an
    /// external `mooncake_client` owns the pool; `global_segment_size` must then be 0).
    pub mode: String,
    /// vLLM 0.33's name for the official client's local SSD tier. kvpool's client has none
    /// (the `tiered` backend over `rocksdb-ssd` is kvpool's SSD tier): accepted, warned when on.
    pub enable_offload: bool,
    /// The official client's name for the same SSD tier; as `enable_offload`.
    pub enable_ssd_offload: bool,
    /// Where the official client's SSD tier writes; accepted, unused.
    pub ssd_offload_path: String,
    /// The official client's HTTP server; kvpool serves its metrics with the connector's
    /// `metrics_port` instead: accepted, warned when on.
    pub enable_client_http_server: bool,
    /// That server's port; accepted, unused.
    pub client_http_port: u16,
}

impl Default for MooncakeConfig {
    fn default() -> Self {
        MooncakeConfig {
            master_server_address: "127.0.0.1:50051".into(),
            metadata_server: "P2PHANDSHAKE".into(),
            protocol: "tcp".into(),
            device_name: String::new(),
            local_hostname: String::new(),
            global_segment_size: ByteSize(0),
            local_buffer_size: ByteSize(0),
            alloc_in_same_node: false,
            tenant_id: "default".into(),
            replica_num: 1,
            rpc_timeout_ms: None,
            connect_timeout_ms: None,
            transfer_timeout_ms: None,
            no_space_retry_ms: 5_000,
            rpc_connections: 8,
            tcp_congestion: "cubic".into(),
            checksum: false,
            mode: "embedded".into(),
            enable_offload: false,
            enable_ssd_offload: false,
            ssd_offload_path: String::new(),
            enable_client_http_server: false,
            client_http_port: 9300,
        }
    }
}

/// `"protocol": "ascend"`: says whether CANN is there and why it is refused either way.
fn ascend_unsupported() -> Error {
    let cann = match ascendcl_sys::AscendCl::load() {
        Ok(acl) => format!(
            "CANN was found ({}), but kvpool has no Ascend device-to-device transport",
            acl.path()
        ),
        Err(e) => e.to_string(),
    };
    Error::new(
        ErrorKind::Unsupported,
        format!(
            "mooncake.protocol \"ascend\" (NPU-direct transfer) is not supported by kvpool's \
             pure-Rust client: {cann}. Set \"protocol\": \"tcp\" in mooncake.json; it works \
             with the same mooncake_master"
        ),
    )
}

/// Timeouts after the environment is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timeouts {
    pub rpc: Duration,
    pub connect: Duration,
    pub transfer: Duration,
}

const DEFAULT_RPC_MS: u64 = 30_000;
const DEFAULT_ASCEND_MS: u64 = 10_000;

impl MooncakeConfig {
    /// Checks every field; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config_invalid(msg).with_context("section", "mooncake"));
        if !self.metadata_server.eq_ignore_ascii_case("P2PHANDSHAKE") {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "mooncake.metadata_server {:?} is not supported; kvpool exchanges segment \
                     descriptors peer to peer: set \"metadata_server\": \"P2PHANDSHAKE\"",
                    self.metadata_server
                ),
            ));
        }
        match self.protocol.to_ascii_lowercase().as_str() {
            "tcp" => {}
            "ascend" => return Err(ascend_unsupported()),
            other => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("mooncake.protocol {other:?} is not supported; kvpool speaks \"tcp\""),
                ))
            }
        }
        crate::ha::parse_master_address(&self.master_server_address)?;
        if self.replica_num == 0 {
            return bad("mooncake.replica_num must be at least 1".into());
        }
        if self.rpc_connections == 0 || self.rpc_connections > 256 {
            return bad(format!(
                "mooncake.rpc_connections must be between 1 and 256, got {}",
                self.rpc_connections
            ));
        }
        if self.tenant_id.is_empty() {
            return bad("mooncake.tenant_id must not be empty (Mooncake's is \"default\")".into());
        }
        match self.mode.as_str() {
            "embedded" => {}
            "standalone-store" if self.global_segment_size.0 == 0 => {}
            "standalone-store" => {
                return bad(format!(
                    "mooncake.mode \"standalone-store\" means an external mooncake_client owns \
                     the pool, but mooncake.global_segment_size is {} bytes; set it to 0 (or \
                     use \"mode\": \"embedded\")",
                    self.global_segment_size.0
                ))
            }
            other => {
                return bad(format!(
                    "mooncake.mode {other:?} is not one vLLM's Mooncake connector knows: \
                     \"embedded\" or \"standalone-store\""
                ))
            }
        }
        if self.enable_offload || self.enable_ssd_offload {
            tracing::warn!(
                "mooncake.enable_offload / enable_ssd_offload: kvpool's Mooncake client has no \
                 local SSD tier and ignores it; the `tiered` backend over `rocksdb-ssd` is \
                 kvpool's SSD tier"
            );
        }
        if self.enable_client_http_server {
            tracing::warn!(
                "mooncake.enable_client_http_server is ignored: kvpool serves its metrics on \
                 the connector's `metrics_port`"
            );
        }
        Ok(())
    }

    /// The timeouts, with the environment the Ascend Store guide sets
    /// (`ASCEND_CONNECT_TIMEOUT`, `ASCEND_TRANSFER_TIMEOUT`, milliseconds) and
    /// Mooncake's `MC_RPC_TIMEOUT_MS` taking precedence over the file.
    pub(crate) fn timeouts(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Timeouts> {
        let pick = |var: &str, key: Option<u64>, default: u64| -> Result<Duration> {
            let ms = match env(var).filter(|v| !v.trim().is_empty()) {
                Some(v) => v.trim().parse::<u64>().map_err(|_| {
                    Error::config_invalid(format!(
                        "environment variable {var}={v:?} must be a number of milliseconds"
                    ))
                })?,
                None => key.unwrap_or(default),
            };
            if ms == 0 {
                return Err(Error::config_invalid(format!(
                    "{var} / its mooncake key must be at least 1 ms"
                )));
            }
            Ok(Duration::from_millis(ms))
        };
        Ok(Timeouts {
            rpc: pick("MC_RPC_TIMEOUT_MS", self.rpc_timeout_ms, DEFAULT_RPC_MS)?,
            connect: pick(
                "ASCEND_CONNECT_TIMEOUT",
                self.connect_timeout_ms,
                DEFAULT_ASCEND_MS,
            )?,
            transfer: pick(
                "ASCEND_TRANSFER_TIMEOUT",
                self.transfer_timeout_ms,
                DEFAULT_ASCEND_MS,
            )?,
        })
    }
}

/// `ASCEND_BUFFER_POOL` (`"count:MiB"`, e.g. `4:8`): the NPU staging buffers
/// of Mooncake's Ascend transport. The tcp transport needs none; the value is
/// checked for shape so a typo is still reported.
pub(crate) fn check_ascend_buffer_pool(value: Option<String>) -> Result<()> {
    let Some(v) = value.filter(|v| !v.trim().is_empty()) else {
        return Ok(());
    };
    let ok = v
        .split_once(':')
        .is_some_and(|(n, mb)| n.trim().parse::<u32>().is_ok() && mb.trim().parse::<u32>().is_ok());
    if ok {
        tracing::debug!(
            ASCEND_BUFFER_POOL = v.as_str(),
            "accepted; the tcp transport stages nothing on the device"
        );
        Ok(())
    } else {
        Err(Error::config_invalid(format!(
            "ASCEND_BUFFER_POOL={v:?} must be \"count:size_in_MB\", like \"4:8\""
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn seed_json_parses_and_ascend_is_refused_with_a_hint() {
        let json = r#"{"metadata_server": "P2PHANDSHAKE","protocol": "ascend","device_name": "",
            "master_server_address": "127.0.0.1:50088","global_segment_size": "1GB"}"#;
        let cfg: MooncakeConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.global_segment_size, ByteSize(1 << 30));
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("\"protocol\": \"tcp\""), "{err}");
        // Here there is no CANN, and the message says so.
        assert!(err.to_string().contains("CANN"), "{err}");
        let tcp = MooncakeConfig {
            protocol: "tcp".into(),
            ..cfg
        };
        tcp.validate().unwrap();
    }

    #[test]
    fn other_metadata_servers_and_protocols_are_unsupported() {
        let c = MooncakeConfig {
            metadata_server: "etcd://10.0.0.1:2379".into(),
            ..MooncakeConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("P2PHANDSHAKE"));
        let c = MooncakeConfig {
            protocol: "rdma".into(),
            ..MooncakeConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::Unsupported);
        let c = MooncakeConfig {
            master_server_address: "nohost".into(),
            ..MooncakeConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().kind(), ErrorKind::ConfigInvalid);
    }

    #[test]
    fn timeouts_default_and_follow_the_environment() {
        let c = MooncakeConfig::default();
        let t = c.timeouts(&env(&[])).unwrap();
        assert_eq!(t.connect, Duration::from_secs(10));
        assert_eq!(t.transfer, Duration::from_secs(10));
        assert_eq!(t.rpc, Duration::from_secs(30));
        let t = c
            .timeouts(&env(&[
                ("ASCEND_CONNECT_TIMEOUT", "500"),
                ("ASCEND_TRANSFER_TIMEOUT", "2500"),
                ("MC_RPC_TIMEOUT_MS", "700"),
            ]))
            .unwrap();
        assert_eq!(t.connect, Duration::from_millis(500));
        assert_eq!(t.transfer, Duration::from_millis(2500));
        assert_eq!(t.rpc, Duration::from_millis(700));
        let e = c
            .timeouts(&env(&[("ASCEND_CONNECT_TIMEOUT", "10s")]))
            .unwrap_err();
        assert!(e.to_string().contains("ASCEND_CONNECT_TIMEOUT"), "{e}");
    }

    #[test]
    fn ascend_buffer_pool_is_accepted_and_checked() {
        check_ascend_buffer_pool(None).unwrap();
        check_ascend_buffer_pool(Some("4:8".into())).unwrap();
        assert!(check_ascend_buffer_pool(Some("lots".into())).is_err());
    }

    #[test]
    fn mooncake_json_of_vllm_and_of_the_official_client_load_unchanged() {
        // vLLM 0.33's MooncakeStoreConnector (MooncakeStoreConfig.from_file reads these).
        let vllm = r#"{"metadata_server": "P2PHANDSHAKE", "master_server_address": "10.0.0.1:50051",
            "protocol": "tcp", "device_name": "", "mode": "standalone-store",
            "global_segment_size": 0, "local_buffer_size": "1GB", "enable_offload": false,
            "tenant_id": "default"}"#;
        let cfg: MooncakeConfig = serde_json::from_str(vllm).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.mode, "standalone-store");
        // The official client (mooncake.mooncake_config.MooncakeConfig.from_file).
        let official = r#"{"local_hostname": "10.0.0.2", "metadata_server": "P2PHANDSHAKE",
            "global_segment_size": "4GB", "local_buffer_size": "512MB", "protocol": "tcp",
            "device_name": "", "master_server_address": "10.0.0.1:50051",
            "enable_ssd_offload": true, "ssd_offload_path": "/mnt/ssd", "tenant_id": "t1",
            "enable_client_http_server": true, "client_http_port": 9300}"#;
        let cfg: MooncakeConfig = serde_json::from_str(official).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.global_segment_size, ByteSize(4 << 30));
        assert_eq!(cfg.tenant_id, "t1");

        let standalone_with_segment = MooncakeConfig {
            mode: "standalone-store".into(),
            global_segment_size: ByteSize(1 << 30),
            ..MooncakeConfig::default()
        };
        let e = standalone_with_segment.validate().unwrap_err().to_string();
        assert!(e.contains("global_segment_size"), "{e}");
        let unknown = MooncakeConfig {
            mode: "standalone".into(),
            ..MooncakeConfig::default()
        };
        let e = unknown.validate().unwrap_err().to_string();
        assert!(e.contains("mooncake.mode \"standalone\""), "{e}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = serde_json::from_str::<MooncakeConfig>(r#"{"protocl": "tcp"}"#).unwrap_err();
        assert!(e.to_string().contains("protocl"), "{e}");
    }
}
