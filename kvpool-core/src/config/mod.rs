//! Layered configuration.
//!
//! Layers, lowest first; a higher layer overrides a lower one key by key, tables merge:
//!
//! 1. defaults (Ascend Store's: `backend = "mooncake"`, `discard_partial_chunks = true`, ...);
//! 2. a TOML file: [`ConfigSources::file`] (`--config`), else `KVPOOL_CONFIG`;
//! 3. the selected backend's own sources, which its crate contributes through a
//!    [`BackendSection`] as layers of its table: for `mooncake`, Mooncake's `mooncake.json` at
//!    `MOONCAKE_CONFIG_PATH` and `MOONCAKE_MASTER` over it. Only the selected backend's are
//!    read (Ascend Store reads that file only for that backend, and a user switching backends
//!    should not have to unset it);
//! 4. environment variables `KVPOOL_*`, `__` nesting tables (`KVPOOL_MEMORY__CAPACITY=1GB`);
//! 5. vLLM's `kv_connector_extra_config` JSON object, which has the last word because it is what
//!    the user typed on the vLLM command line.
//!
//! The connector keys sit at the top level, flat, exactly as vLLM passes them, so a
//! `kv_connector_extra_config` written for Ascend Store loads unchanged. Backend settings live
//! in tables named after the backend scheme (`memory`, `redis`, `rocksdb_ssd`), read with
//! [`Config::section`] by the backend that owns them. Anything else is an error that names the
//! key and where it came from: a misspelt key silently falling back to a default is the worst
//! way for a cache to misbehave.

mod connector;
mod diagnostics;
mod flex;
mod layers;
mod redact;
mod sections;
#[cfg(test)]
mod testing;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::value::Value;
use figment::{Figment, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use connector::{ASCEND_STORE_ONLY_KEYS, CONNECTOR_KEYS};
use diagnostics::{figment_error, origin_of, unknown_keys_error};
use layers::{defaults_layer, env_layer, extra_layer, toml_layer, DEFAULTS};
use redact::redact;

pub use connector::ConnectorConfig;
pub use layers::{Env, Layer};
pub use sections::{section_schemes, BackendSection, ExtraLayers};

/// How block keys are derived from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HashingMode {
    /// kvpool's deterministic chain over token ids: identical on every node with no shared seed.
    #[default]
    Tokens,
    /// vLLM's own block hashes, as Ascend Store uses them (needs the same `PYTHONHASHSEED`
    /// everywhere).
    Vllm,
}

impl HashingMode {
    /// The name used in configuration: `"tokens"` or `"vllm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HashingMode::Tokens => "tokens",
            HashingMode::Vllm => "vllm",
        }
    }
}

impl fmt::Display for HashingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashingMode {
    type Err = Error;

    /// Case-insensitive, for command-line flags.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tokens" => Ok(HashingMode::Tokens),
            "vllm" => Ok(HashingMode::Vllm),
            _ => Err(Error::config_invalid(format!(
                "unknown hashing mode {s:?}; expected `tokens` or `vllm`"
            ))),
        }
    }
}

/// Where [`Config::load`] reads from, besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// A TOML file that must exist (`--config`); when `None`, `KVPOOL_CONFIG` if set.
    pub file: Option<PathBuf>,
    /// vLLM's `kv_connector_extra_config`, a JSON object; the highest layer.
    pub extra_config: Option<serde_json::Value>,
    /// Whether to read the environment at all: `KVPOOL_*`, `KVPOOL_CONFIG`, and the variables
    /// the selected backend reads its own sources from (see [`BackendSection`]).
    pub use_env: bool,
}

/// The effective configuration: the connector keys, typed, plus the merged layers from which
/// each backend reads its own table.
#[derive(Clone)]
pub struct Config {
    /// The backend scheme to open (`mooncake`, `memory`, `redis`, ...). Default `"mooncake"`,
    /// as in Ascend Store. Checked here only for shape; the registry checks it exists.
    pub backend: String,
    /// How block keys are derived.
    pub hash_mode: HashingMode,
    /// The vLLM connector keys.
    pub connector: ConnectorConfig,
    figment: Figment,
    sections: Vec<String>,
}

impl fmt::Debug for Config {
    // The figment's own Debug dumps every layer's metadata; the effective values say more.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("backend", &self.backend)
            .field("hash_mode", &self.hash_mode)
            .field("connector", &self.connector)
            .field("sections", &self.sections)
            .finish()
    }
}

impl Default for Config {
    /// The defaults alone.
    fn default() -> Self {
        Config::load_with_env(&ConfigSources::default(), &[])
            .expect("the built-in defaults are a valid configuration")
    }
}

impl Config {
    /// Loads every layer (see the [module docs](self)) and validates the result.
    ///
    /// # Errors
    /// `ConfigInvalid`, one line naming the offending key and its source: an unknown key, a
    /// value of the wrong type, a missing or malformed file, conflicting aliases.
    pub fn load(sources: &ConfigSources) -> Result<Config> {
        let env: Vec<(String, String)> = if sources.use_env {
            // A variable that is not UTF-8 cannot be one of ours.
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect()
        } else {
            Vec::new()
        };
        Config::load_with_env(sources, &env)
    }

    /// [`Config::load`] with the environment given as `(name, value)` pairs instead of read
    /// from the process, so tests need not mutate (and race on) the real environment. Ignored,
    /// like the real one, unless `sources.use_env`.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with_env(sources: &ConfigSources, env: &[(String, String)]) -> Result<Config> {
        let sections: Vec<&BackendSection> =
            inventory::iter::<BackendSection>.into_iter().collect();
        Config::load_inner(sources, env, &sections)
    }

    /// The loader, with the backend sections (which name the allowed tables and contribute
    /// layers) passed in so tests do not depend on which backend crates happen to be linked.
    fn load_inner(
        sources: &ConfigSources,
        env: &[(String, String)],
        sections: &[&BackendSection],
    ) -> Result<Config> {
        let env = Env::new(if sources.use_env { env } else { &[] });

        let file = match (&sources.file, env.var("KVPOOL_CONFIG")) {
            (Some(path), _) => Some(toml_layer(path, "")?),
            (None, Some(path)) => Some(toml_layer(Path::new(path), " (from KVPOOL_CONFIG)")?),
            (None, None) => None,
        };
        let upper = [
            env_layer(env),
            sources.extra_config.as_ref().map(extra_layer).transpose()?,
        ];
        let build = |middle: &[Layer]| {
            let mut figment = Figment::from(defaults_layer());
            for layer in file.iter().chain(middle).chain(upper.iter().flatten()) {
                figment = figment.merge(layer.clone());
            }
            figment
        };

        // Whose sources are layers depends on the backend, which the other layers decide.
        let backend = resolve_backend(&build(&[]))?;
        let table = backend.replace('-', "_");
        let mut backend_layers = Vec::new();
        for section in sections.iter().filter(|s| s.scheme == backend) {
            if let Some(extra_layers) = section.extra_layers {
                let layers = extra_layers(&env)?;
                backend_layers.extend(layers.into_iter().map(|layer| layer.under(&table)));
            }
        }
        let figment = build(&backend_layers);
        let tables = sections
            .iter()
            .map(|s| s.scheme.replace('-', "_"))
            .collect();
        Config::validate(figment, backend, tables)
    }

    /// The defaults and `value` (vLLM's `kv_connector_extra_config`), nothing else: no files,
    /// no environment.
    ///
    /// # Errors
    /// As [`Config::load`]; also when `value` is not a JSON object.
    pub fn from_extra_config(value: serde_json::Value) -> Result<Config> {
        let sources = ConfigSources {
            extra_config: Some(value),
            ..ConfigSources::default()
        };
        Config::load_with_env(&sources, &[])
    }

    /// Deserializes the backend table `name` (`-` read as `_`, so `"rocksdb-ssd"` finds
    /// `rocksdb_ssd`). A missing table deserializes from an empty one, so `#[serde(default)]`
    /// fields apply. Numbers and booleans may be given as strings (environment variables are).
    ///
    /// # Errors
    /// `ConfigInvalid` naming the full key (`memory.capacity`) and its source; with
    /// `#[serde(deny_unknown_fields)]`, an unknown field is named the same way (`memory.capcity`).
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T> {
        let key = name.replace('-', "_");
        self.figment
            .focus(&key)
            .extract_lossy::<T>()
            .map_err(|e| figment_error(e, &self.figment, &[key.as_str()]))
    }

    /// The backend tables present, sorted (`["memory", "mooncake"]`).
    pub fn section_names(&self) -> Vec<String> {
        self.sections.clone()
    }

    /// The effective configuration as JSON, for `kvpool check`: the typed top-level keys (the
    /// `mooncake_rpc_port` alias already folded in) and every backend table. String values of
    /// keys that look like secrets (`password`, `*_password`, `secret`, `token`, `*_token`) are
    /// shown as `"***"`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        out.insert("backend".into(), self.backend.clone().into());
        out.insert("hash_mode".into(), self.hash_mode.as_str().into());
        if let Ok(serde_json::Value::Object(connector)) = serde_json::to_value(&self.connector) {
            out.extend(connector);
        }
        for name in &self.sections {
            if let Ok(value) = self.figment.find_value(name) {
                let mut json = serde_json::to_value(&value).unwrap_or(serde_json::Value::Null);
                redact(&mut json);
                out.insert(name.clone(), json);
            }
        }
        serde_json::Value::Object(out)
    }

    /// Checks the merged layers and types the top level. `allowed_sections` are the tables of
    /// the registered backends.
    fn validate(
        figment: Figment,
        backend: String,
        mut allowed_sections: BTreeSet<String>,
    ) -> Result<Config> {
        let data = figment
            .data()
            .map_err(|e| figment_error(e, &figment, &[]))?
            .remove(&Profile::Default)
            .unwrap_or_default();

        // Let an unregistered backend's table through, so that opening it fails with the
        // registry's "unknown backend, registered are ..." rather than an unknown-key error.
        allowed_sections.insert(backend.replace('-', "_"));

        let mut sections = Vec::new();
        let mut unknown = Vec::new();
        for (key, value) in &data {
            let origin = origin_of(&figment, &[key.as_str()]);
            if key == "backend" || key == "hash_mode" || key == "mooncake_rpc_port" {
                continue;
            }
            if CONNECTOR_KEYS.contains(&key.as_str()) {
                continue;
            }
            if ASCEND_STORE_ONLY_KEYS.contains(&key.as_str()) {
                tracing::warn!(
                    key = key.as_str(),
                    source = origin.as_str(),
                    "Ascend Store option `{key}` is not supported by kvpool and is ignored"
                );
                continue;
            }
            if allowed_sections.contains(key) {
                if !matches!(value, Value::Dict(..)) {
                    return Err(Error::config_invalid(format!(
                        "invalid type for `{key}` in {origin}: found {}, expected a table of \
                         {key} backend settings",
                        value.to_actual()
                    )));
                }
                sections.push(key.clone());
                continue;
            }
            unknown.push((key.clone(), origin));
        }
        if !unknown.is_empty() {
            return Err(unknown_keys_error(&unknown, &allowed_sections));
        }

        // figment reads an integer as an enum variant index; `hash_mode = 1` is a mistake.
        if let Some(value) = data
            .get("hash_mode")
            .filter(|v| !matches!(v, Value::String(..)))
        {
            return Err(Error::config_invalid(format!(
                "invalid type for `hash_mode` in {}: found {}, expected `tokens` or `vllm`",
                origin_of(&figment, &["hash_mode"]),
                value.to_actual()
            )));
        }
        #[derive(Deserialize)]
        struct Head {
            hash_mode: HashingMode,
        }
        let head: Head = figment
            .extract_lossy()
            .map_err(|e| figment_error(e, &figment, &[]))?;
        let mut connector: ConnectorConfig = figment
            .extract_lossy()
            .map_err(|e| figment_error(e, &figment, &[]))?;

        if data.contains_key("mooncake_rpc_port") {
            #[derive(Deserialize)]
            struct Alias {
                #[serde(deserialize_with = "flex::u32")]
                mooncake_rpc_port: u32,
            }
            let alias: Alias = figment
                .extract_lossy()
                .map_err(|e| figment_error(e, &figment, &[]))?;
            let alias_origin = origin_of(&figment, &["mooncake_rpc_port"]);
            let lookup_given = figment
                .find_metadata("lookup_rpc_port")
                .is_some_and(|m| m.name != DEFAULTS);
            if lookup_given && connector.lookup_rpc_port != alias.mooncake_rpc_port {
                return Err(Error::config_invalid(format!(
                    "`lookup_rpc_port` = {} in {} and its deprecated alias `mooncake_rpc_port` \
                     = {} in {alias_origin} disagree; keep only `lookup_rpc_port`",
                    connector.lookup_rpc_port,
                    origin_of(&figment, &["lookup_rpc_port"]),
                    alias.mooncake_rpc_port,
                )));
            }
            tracing::warn!(
                source = alias_origin.as_str(),
                "`mooncake_rpc_port` is deprecated; use `lookup_rpc_port`"
            );
            connector.lookup_rpc_port = alias.mooncake_rpc_port;
        }

        if connector.prefill_pp_size == 0 {
            return Err(Error::config_invalid(format!(
                "invalid value for `prefill_pp_size` in {}: it must be at least 1",
                origin_of(&figment, &["prefill_pp_size"])
            )));
        }
        if let Err(why) = connector.parse_partition() {
            return Err(Error::config_invalid(format!(
                "invalid value for `prefill_pp_layer_partition` in {}: {why}",
                origin_of(&figment, &["prefill_pp_layer_partition"])
            )));
        }

        Ok(Config {
            backend,
            hash_mode: head.hash_mode,
            connector,
            figment,
            sections,
        })
    }
}

/// Reads `backend` from a figment and checks it could be a scheme name.
fn resolve_backend(figment: &Figment) -> Result<String> {
    #[derive(Deserialize)]
    struct Backend {
        backend: String,
    }
    let Backend { backend } = figment
        .extract_lossy()
        .map_err(|e| figment_error(e, figment, &[]))?;
    let well_formed = backend.starts_with(|c: char| c.is_ascii_lowercase())
        && backend
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !well_formed {
        let hint = if backend.chars().any(|c| c.is_ascii_uppercase()) {
            format!(" (did you mean `{}`?)", backend.to_ascii_lowercase())
        } else {
            String::new()
        };
        return Err(Error::config_invalid(format!(
            "invalid value for `backend` in {}: {backend:?} is not a backend name (lower-case \
             letters, digits, '-' and '_'){hint}",
            origin_of(figment, &["backend"])
        )));
    }
    Ok(backend)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::testing::{config_err, extra, file_with, with_env, MemorySection, GIB};
    use super::*;
    use crate::error::ErrorKind;
    use crate::size::ByteSize;

    #[test]
    fn defaults_match_ascend_store() {
        let config = Config::from_extra_config(json!({})).unwrap();
        assert_eq!(config.backend, "mooncake");
        assert_eq!(config.hash_mode, HashingMode::Tokens);
        assert_eq!(config.connector, ConnectorConfig::default());
        assert_eq!(config.connector.lookup_rpc_port, 0);
        assert!(config.connector.discard_partial_chunks);
        assert!(!config.connector.load_async);
        assert_eq!(config.connector.prefill_pp_size, 1);
        assert_eq!(config.connector.prefill_pp_layer_partition, None);
        assert!(config.section_names().is_empty());

        let loaded = Config::load(&ConfigSources::default()).unwrap();
        assert_eq!(loaded.backend, "mooncake");
        assert_eq!(loaded.connector, ConnectorConfig::default());
        assert_eq!(Config::default().connector, ConnectorConfig::default());
    }

    #[test]
    fn seed_extra_config_loads_unchanged() {
        let config = extra(json!({"lookup_rpc_port": "0", "backend": "mooncake"})).unwrap();
        assert_eq!(config.backend, "mooncake");
        assert_eq!(config.connector.lookup_rpc_port, 0);
        let config = extra(json!({"lookup_rpc_port": "1", "backend": "mooncake"})).unwrap();
        assert_eq!(config.connector.lookup_rpc_port, 1);
    }

    #[test]
    fn strings_are_accepted_for_integers_and_booleans() {
        let config = extra(json!({
            "load_async": "true",
            "use_layerwise": "False",
            "consumer_is_to_put": true,
            "consumer_is_to_load": 1,
            "save_decode_cache": "yes",
            "discard_partial_chunks": "false",
            "prefill_pp_size": "2",
            "prefill_pp_layer_partition": "30,31",
            "hash_mode": "vllm",
        }))
        .unwrap();
        let c = &config.connector;
        assert!(c.load_async && !c.use_layerwise && c.consumer_is_to_put);
        assert!(c.consumer_is_to_load && c.save_decode_cache && !c.discard_partial_chunks);
        assert_eq!(c.prefill_pp_size, 2);
        assert_eq!(c.layer_partition().unwrap(), Some(vec![30, 31]));
        assert_eq!(config.hash_mode, HashingMode::Vllm);
    }

    #[test]
    fn unregistered_tables_are_unknown_but_the_chosen_backend_passes() {
        let msg = config_err(extra(json!({"foo": {"a": 1}})));
        assert!(msg.contains("unknown key `foo`"), "{msg}");
        // Left for the registry to reject with the list of registered backends.
        let c = extra(json!({"backend": "foo", "foo": {"a": 1}})).unwrap();
        assert_eq!(c.section_names(), vec!["foo".to_string()]);
    }

    #[test]
    fn backend_must_look_like_a_scheme() {
        for bad in ["", "Mooncake", "moon cake", "-x"] {
            let msg = config_err(extra(json!({"backend": bad})));
            assert!(msg.contains("`backend`"), "{msg}");
        }
        let msg = config_err(extra(json!({"backend": "Mooncake"})));
        assert!(msg.contains("did you mean `mooncake`"), "{msg}");
        let c = extra(json!({"backend": "rocksdb-ssd"})).unwrap();
        assert_eq!(c.backend, "rocksdb-ssd");
    }

    #[test]
    fn mooncake_rpc_port_is_a_deprecated_alias() {
        let c = extra(json!({"mooncake_rpc_port": "7"})).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 7);
        assert_eq!(c.to_json()["lookup_rpc_port"], json!(7));
        assert!(c.to_json().get("mooncake_rpc_port").is_none());

        let c = extra(json!({"mooncake_rpc_port": 7, "lookup_rpc_port": "7"})).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 7);

        let msg = config_err(extra(json!({"mooncake_rpc_port": 7, "lookup_rpc_port": 8})));
        assert!(
            msg.contains("mooncake_rpc_port") && msg.contains("lookup_rpc_port"),
            "{msg}"
        );

        // An explicit 0 differs from a defaulted one.
        assert!(extra(json!({"mooncake_rpc_port": 7, "lookup_rpc_port": 0})).is_err());
        let msg = config_err(extra(json!({"mooncake_rpc_port": "x"})));
        assert!(msg.contains("`mooncake_rpc_port`"), "{msg}");
    }

    #[test]
    fn section_reads_tables_and_names_full_keys_in_errors() {
        let c = extra(json!({"memory": {"capacity": "1GB", "shards": "4"}})).unwrap();
        assert_eq!(c.section_names(), vec!["memory".to_string()]);
        let memory: MemorySection = c.section("memory").unwrap();
        assert_eq!(memory.capacity, Some(ByteSize(GIB)));
        assert_eq!(memory.shards, Some(4));

        let c = extra(json!({"memory": {"capcity": "1GB"}})).unwrap();
        let err = c.section::<MemorySection>("memory").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        let msg = err.to_string();
        assert!(msg.contains("`memory.capcity`"), "{msg}");
        assert!(msg.contains("kv_connector_extra_config"), "{msg}");
        assert!(msg.contains("did you mean `capacity`"), "{msg}");

        let c = extra(json!({"memory": {"capacity": "lots"}})).unwrap();
        let msg = c
            .section::<MemorySection>("memory")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("`memory.capacity`") && msg.contains("lots"),
            "{msg}"
        );

        let c = extra(json!({"memory": {"shards": true}})).unwrap();
        let msg = c
            .section::<MemorySection>("memory")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`memory.shards`"), "{msg}");
    }

    #[test]
    fn missing_section_uses_serde_defaults() {
        #[derive(Deserialize)]
        struct Redis {
            #[serde(default = "default_url")]
            url: String,
        }
        fn default_url() -> String {
            "redis://127.0.0.1:6379".into()
        }
        let c = Config::default();
        assert_eq!(
            c.section::<Redis>("redis").unwrap().url,
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            c.section::<MemorySection>("memory").unwrap(),
            MemorySection {
                capacity: None,
                shards: None,
                prefault: None
            }
        );

        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct Required {
            path: String,
        }
        let msg = c
            .section::<Required>("rocksdb-ssd")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`rocksdb_ssd.path`"), "{msg}");
    }

    #[test]
    fn pp_partition_is_checked() {
        let msg = config_err(extra(json!({"prefill_pp_layer_partition": "30,31"})));
        assert!(msg.contains("`prefill_pp_layer_partition`"), "{msg}");
        assert!(msg.contains("prefill_pp_size"), "{msg}");
        let msg = config_err(extra(
            json!({"prefill_pp_size": 2, "prefill_pp_layer_partition": "30,x"}),
        ));
        assert!(msg.contains("`prefill_pp_layer_partition`"), "{msg}");
        let msg = config_err(extra(json!({"prefill_pp_size": 0})));
        assert!(msg.contains("`prefill_pp_size`"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let path = file_with(
            &dir,
            "pp.toml",
            "prefill_pp_size = 2\nprefill_pp_layer_partition = [30, 31]\n",
        );
        let c = with_env(Some(&path), None, &[]).unwrap();
        assert_eq!(c.connector.layer_partition().unwrap(), Some(vec![30, 31]));
    }

    #[test]
    fn ascend_store_only_keys_are_accepted_and_ignored() {
        let c = extra(json!({
            "register_buffer": true,
            "prefill_tp_size": 4,
            "backend": "memory",
        }))
        .unwrap();
        assert_eq!(c.backend, "memory");
        assert!(c.to_json().get("register_buffer").is_none());
    }

    #[test]
    fn to_json_shows_effective_values_and_hides_secrets() {
        let c = extra(json!({
            "backend": "redis",
            "lookup_rpc_port": "3",
            "redis": {"url": "redis://h:1", "password": "hunter2", "auth_token": ""},
        }))
        .unwrap();
        let j = c.to_json();
        assert_eq!(j["backend"], json!("redis"));
        assert_eq!(j["hash_mode"], json!("tokens"));
        assert_eq!(j["lookup_rpc_port"], json!(3));
        assert_eq!(j["discard_partial_chunks"], json!(true));
        assert_eq!(j["prefill_pp_layer_partition"], json!(null));
        assert_eq!(j["redis"]["url"], json!("redis://h:1"));
        assert_eq!(j["redis"]["password"], json!("***"));
        assert_eq!(j["redis"]["auth_token"], json!(""));
    }

    #[test]
    fn hashing_mode_parses_and_prints() {
        assert_eq!("VLLM".parse::<HashingMode>().unwrap(), HashingMode::Vllm);
        assert_eq!(HashingMode::Tokens.to_string(), "tokens");
        assert!("sha".parse::<HashingMode>().is_err());
    }
}
