//! The vLLM connector keys: the flat top level of the configuration, exactly as vLLM passes
//! them in `kv_connector_extra_config`.

use serde::{Deserialize, Serialize};

use super::flex;
use crate::error::{Error, Result};
use crate::key::KeyFormat;
use crate::size::ByteSize;

/// The fields of [`ConnectorConfig`], in declaration order.
pub(super) const CONNECTOR_KEYS: &[&str] = &[
    "lookup_rpc_port",
    "load_async",
    "use_layerwise",
    "consumer_is_to_put",
    "consumer_is_to_load",
    "save_decode_cache",
    "discard_partial_chunks",
    "prefill_pp_size",
    "prefill_pp_layer_partition",
    "lookup_timeout_ms",
    "metrics_port",
    "metrics_host",
    "reset_clears_shared_pool",
    "device_staging_bytes",
    "stage_host_kv",
    "key_format",
    "layerwise_prefetch_layers",
    "layerwise_max_transfer_blocks",
    "layerwise_max_transfer_bytes",
];

/// Ascend Store keys for features kvpool does not implement. A config written for Ascend Store
/// must still load, so these are accepted with a warning rather than rejected as unknown.
pub(super) const ASCEND_STORE_ONLY_KEYS: &[&str] = &[
    "prefill_tp_size",
    "decode_tp_size",
    "h2d_stagger_us",
    "layerwise_num_shared_buffers",
    "layerwise_independent_layers",
    "register_buffer",
];

/// The keys Ascend Store's connector reads from `kv_connector_extra_config`, with its defaults.
///
/// Deserializing is lenient the way the deployment guides need: integers may be numeric strings
/// (`"lookup_rpc_port": "0"`) and booleans may be `"true"`/`"false"` (also `yes`/`no`, `on`/`off`,
/// `1`/`0`, any case), because Python configs and environment variables carry strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConnectorConfig {
    /// Names the local lookup socket (`lookup_rpc_port_{port}_dp_rank{rank}`); not a TCP port,
    /// but it must differ between instances on one host. Deprecated alias: `mooncake_rpc_port`.
    #[serde(deserialize_with = "flex::u32")]
    pub lookup_rpc_port: u32,
    /// Load in the background and report completions through `get_finished`.
    #[serde(deserialize_with = "flex::bool")]
    pub load_async: bool,
    /// Save and load layer by layer.
    #[serde(deserialize_with = "flex::bool")]
    pub use_layerwise: bool,
    /// A decode (consumer) node also saves.
    #[serde(deserialize_with = "flex::bool")]
    pub consumer_is_to_put: bool,
    /// A decode (consumer) node also looks up and loads.
    #[serde(deserialize_with = "flex::bool")]
    pub consumer_is_to_load: bool,
    /// Also save blocks produced during decode.
    #[serde(deserialize_with = "flex::bool")]
    pub save_decode_cache: bool,
    /// Round token counts down to whole blocks.
    #[serde(deserialize_with = "flex::bool")]
    pub discard_partial_chunks: bool,
    /// Pipeline-parallel size of the prefill node a decode node saves for.
    #[serde(deserialize_with = "flex::u32")]
    pub prefill_pp_size: u32,
    /// Layers per prefill pipeline stage, comma-separated (`"30,31"`); `None` splits evenly.
    /// A TOML array of integers is accepted too.
    #[serde(deserialize_with = "flex::partition")]
    pub prefill_pp_layer_partition: Option<String>,
    /// How long the scheduler waits for the lookup service before it treats a request as a
    /// miss. Ascend Store waits forever, so one dead worker hangs the whole engine.
    #[serde(deserialize_with = "flex::u32")]
    pub lookup_timeout_ms: u32,
    /// Serve Prometheus metrics over HTTP on this port (plus the worker's rank); 0 = off.
    #[serde(deserialize_with = "flex::u32")]
    pub metrics_port: u32,
    /// The address `metrics_port` listens on: loopback by default, so metrics are not exposed
    /// to the network unless asked (`"0.0.0.0"`, or one interface's address).
    pub metrics_host: std::net::IpAddr,
    /// What vLLM's prefix-cache reset (`reset_cache`) clears: by default only what belongs to
    /// this instance alone (a memory or rocksdb-ssd store, a tiered backend's local tiers);
    /// with this set, a shared pool too (Mooncake, redis, object storage: every instance's
    /// blocks), as vLLM's own Mooncake connector does.
    #[serde(deserialize_with = "flex::bool")]
    pub reset_clears_shared_pool: bool,
    /// Pinned host memory each worker sets aside to move KV between accelerator memory and
    /// the backend (`"256MB"`, or bytes). Bounds the copies in flight: a step that needs more
    /// waits for earlier copies to land.
    pub device_staging_bytes: ByteSize,
    /// Move host (CPU) KV through the staging memory too, as device KV always is. Off by
    /// default (backends then read and write the cache directly); tests use it to exercise the
    /// device path on machines without an accelerator.
    #[serde(deserialize_with = "flex::bool")]
    pub stage_host_kv: bool,
    /// How keys are spelled: `"current"` (Ascend Store v0.20.2 and later, with
    /// `@group:…@cache_role:kv@cache_family:…`) or `"v0.18"`. The two never alias.
    pub key_format: KeyFormat,
    /// Layerwise: layers whose loads run ahead of the forward (at least 1: the layer the
    /// forward waits for next).
    #[serde(deserialize_with = "flex::u32")]
    pub layerwise_prefetch_layers: u32,
    /// Layerwise: the most blocks in flight per layer transfer batch (0: no limit).
    #[serde(deserialize_with = "flex::u32")]
    pub layerwise_max_transfer_blocks: u32,
    /// Layerwise: the most bytes of layer loads in flight at once (0: only the prefetch depth
    /// bounds them). Bounds the prefetch depth: never fewer than the one layer waited for.
    pub layerwise_max_transfer_bytes: ByteSize,
}

impl Default for ConnectorConfig {
    fn default() -> Self {
        ConnectorConfig {
            lookup_rpc_port: 0,
            load_async: false,
            use_layerwise: false,
            consumer_is_to_put: false,
            consumer_is_to_load: false,
            save_decode_cache: false,
            discard_partial_chunks: true,
            prefill_pp_size: 1,
            prefill_pp_layer_partition: None,
            lookup_timeout_ms: 2000,
            metrics_port: 0,
            metrics_host: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            reset_clears_shared_pool: false,
            device_staging_bytes: ByteSize(256 << 20),
            stage_host_kv: false,
            key_format: KeyFormat::Current,
            layerwise_prefetch_layers: 1,
            layerwise_max_transfer_blocks: 0,
            layerwise_max_transfer_bytes: ByteSize(0),
        }
    }
}

impl ConnectorConfig {
    /// `prefill_pp_layer_partition` parsed: one positive layer count per prefill stage.
    ///
    /// # Errors
    /// `ConfigInvalid` when it is not comma-separated positive integers, or when their number
    /// differs from `prefill_pp_size`.
    pub fn layer_partition(&self) -> Result<Option<Vec<u32>>> {
        self.parse_partition().map_err(|why| {
            Error::config_invalid(format!(
                "invalid value for `prefill_pp_layer_partition`: {why}"
            ))
        })
    }

    pub(super) fn parse_partition(&self) -> std::result::Result<Option<Vec<u32>>, String> {
        let Some(text) = &self.prefill_pp_layer_partition else {
            return Ok(None);
        };
        let parts: Option<Vec<u32>> = text
            .split(',')
            .map(|p| p.trim().parse::<u32>().ok().filter(|&n| n > 0))
            .collect();
        let parts = parts.ok_or_else(|| {
            format!(
                "{text:?} is not a comma-separated list of positive layer counts like \"30,31\""
            )
        })?;
        if parts.len() != self.prefill_pp_size as usize {
            return Err(format!(
                "{text:?} has {} stages but `prefill_pp_size` is {}",
                parts.len(),
                self.prefill_pp_size
            ));
        }
        Ok(Some(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn connector_keys_list_matches_the_struct() {
        let json = serde_json::to_value(ConnectorConfig::default()).unwrap();
        let fields: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut expected = CONNECTOR_KEYS.to_vec();
        expected.sort_unstable();
        assert_eq!(fields, expected);
    }

    #[test]
    fn connector_config_deserializes_leniently_on_its_own() {
        let c: ConnectorConfig =
            serde_json::from_value(json!({"lookup_rpc_port": "0", "load_async": "True"})).unwrap();
        assert_eq!(c.lookup_rpc_port, 0);
        assert!(c.load_async);
        assert!(c.discard_partial_chunks);
        assert!(serde_json::from_value::<ConnectorConfig>(json!({"lookup_rpc_port": -1})).is_err());
        assert!(
            serde_json::from_value::<ConnectorConfig>(json!({"lookup_rpc_port": 1.5})).is_err()
        );
    }

    #[test]
    fn every_key_ascend_store_v0_23_reads_loads() {
        // The reference's §5.3 list, with its example values.
        let c = crate::config::Config::from_extra_config(json!({
            "backend": "memory",
            "lookup_rpc_port": "0",
            "load_async": "true",
            "use_layerwise": false,
            "consumer_is_to_put": false,
            "consumer_is_to_load": false,
            "discard_partial_chunks": true,
            "prefill_pp_size": 2,
            "prefill_pp_layer_partition": "30,31",
            "save_decode_cache": false,
            "layerwise_prefetch_layers": 1,
            "layerwise_max_transfer_blocks": 0,
            "layerwise_max_transfer_bytes": 0,
            "h2d_stagger_us": 0,
            "key_format": "v0.18",
        }))
        .unwrap();
        assert!(c.connector.load_async);
        assert_eq!(c.connector.key_format, KeyFormat::V018);
        assert_eq!(c.connector.layer_partition().unwrap(), Some(vec![30, 31]));
        let err = crate::config::Config::from_extra_config(json!({"key_format": "v0.19"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("key_format"), "{err}");
    }

    #[test]
    fn metrics_listen_on_loopback_unless_widened() {
        let load = |extra: serde_json::Value| crate::config::Config::from_extra_config(extra);
        let c = load(json!({"metrics_port": 9100})).unwrap();
        assert!(c.connector.metrics_host.is_loopback());
        let c = load(json!({"metrics_port": 9100, "metrics_host": "0.0.0.0"})).unwrap();
        assert_eq!(c.connector.metrics_host.to_string(), "0.0.0.0");
        let c = load(json!({"metrics_host": "::1"})).unwrap();
        assert!(c.connector.metrics_host.is_loopback());
        let err = load(json!({"metrics_host": "metrics.local"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics_host"), "{err}");
    }
}
