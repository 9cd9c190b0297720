//! Layered configuration.
//!
//! Layers, lowest first; a higher layer overrides a lower one key by key, tables merge:
//!
//! 1. defaults (Ascend Store's: `backend = "mooncake"`, `discard_partial_chunks = true`, ...);
//! 2. a TOML file: [`ConfigSources::file`] (`--config`), else `KVPOOL_CONFIG`;
//! 3. Mooncake's `mooncake.json` at `MOONCAKE_CONFIG_PATH`, as the table `mooncake`, then
//!    `MOONCAKE_MASTER` / `MOONCAKE_GLOBAL_SEGMENT_SIZE` over it, only when the backend is
//!    `mooncake` (Ascend Store reads that file only for that backend, and a user switching
//!    backends should not have to unset it);
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

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider, Source};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

// Layer names, as they appear in error messages ("... in kv_connector_extra_config").
const DEFAULTS: &str = "defaults";
const CONFIG_FILE: &str = "config file";
const MOONCAKE_JSON: &str = "mooncake.json";
const ENVIRONMENT: &str = "environment";
const EXTRA_CONFIG: &str = "kv_connector_extra_config";

const ENV_PREFIX: &str = "KVPOOL_";

/// The fields of [`ConnectorConfig`], in declaration order.
const CONNECTOR_KEYS: &[&str] = &[
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
];

/// Ascend Store keys for features kvpool does not implement. A config written for Ascend Store
/// must still load, so these are accepted with a warning rather than rejected as unknown.
const ASCEND_STORE_ONLY_KEYS: &[&str] = &[
    "prefill_tp_size",
    "decode_tp_size",
    "layerwise_prefetch_layers",
    "layerwise_max_transfer_blocks",
    "layerwise_max_transfer_bytes",
    "h2d_stagger_us",
    "layerwise_num_shared_buffers",
    "layerwise_independent_layers",
    "register_buffer",
];

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
    /// Whether to read the environment at all: `KVPOOL_*`, `KVPOOL_CONFIG`,
    /// `MOONCAKE_CONFIG_PATH`, `MOONCAKE_MASTER`, `MOONCAKE_GLOBAL_SEGMENT_SIZE`.
    pub use_env: bool,
}

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

    fn parse_partition(&self) -> std::result::Result<Option<Vec<u32>>, String> {
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
        let schemes = crate::registry::registered_schemes();
        Config::load_inner(sources, env, &schemes)
    }

    /// The loader, with the registered schemes (which name the allowed tables) passed in so
    /// tests do not depend on which backend crates happen to be linked.
    fn load_inner(
        sources: &ConfigSources,
        env: &[(String, String)],
        schemes: &[&str],
    ) -> Result<Config> {
        let env = if sources.use_env { env } else { &[] };
        // An empty variable is how shells unset one for a single command (`KVPOOL_CONFIG= cmd`).
        let var = |name: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };

        let file = match (&sources.file, var("KVPOOL_CONFIG")) {
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

        // Whether mooncake.json is a layer depends on the backend, which the other layers decide.
        let backend = resolve_backend(&build(&[]))?;
        let mut mooncake_layers = Vec::new();
        if backend == "mooncake" {
            if let Some(path) = var("MOONCAKE_CONFIG_PATH") {
                mooncake_layers.push(mooncake_json_layer(Path::new(path))?);
            }
            mooncake_layers.extend(mooncake_env_layer(&var));
        }
        let figment = build(&mooncake_layers);
        Config::validate(figment, backend, !mooncake_layers.is_empty(), schemes)
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

    fn validate(
        figment: Figment,
        backend: String,
        mooncake_merged: bool,
        schemes: &[&str],
    ) -> Result<Config> {
        let data = figment
            .data()
            .map_err(|e| figment_error(e, &figment, &[]))?
            .remove(&Profile::Default)
            .unwrap_or_default();

        let mut allowed_sections: BTreeSet<String> =
            schemes.iter().map(|s| s.replace('-', "_")).collect();
        if mooncake_merged {
            allowed_sections.insert("mooncake".into());
        }
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

fn unknown_keys_error(unknown: &[(String, String)], sections: &BTreeSet<String>) -> Error {
    let mut known: Vec<&str> = vec!["backend", "hash_mode"];
    known.extend_from_slice(CONNECTOR_KEYS);
    let candidates: Vec<&str> = known
        .iter()
        .copied()
        .chain(std::iter::once("mooncake_rpc_port"))
        .chain(sections.iter().map(String::as_str))
        .collect();
    let listed: Vec<String> = unknown
        .iter()
        .map(|(key, origin)| {
            let hint = closest(key, &candidates)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!("`{key}` in {origin}{hint}")
        })
        .collect();
    let plural = if unknown.len() == 1 { "key" } else { "keys" };
    let mut tables: Vec<&str> = sections.iter().map(String::as_str).collect();
    if tables.is_empty() {
        tables.push("(none registered)");
    }
    Error::config_invalid(format!(
        "unknown {plural} {}; known keys: {}; backend tables: {}",
        listed.join(", "),
        known.join(", "),
        tables.join(", ")
    ))
}

/// The candidate within a small edit distance of `key`, for "did you mean".
fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(key, c), *c))
        .filter(|&(d, c)| d > 0 && d <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Where the value at `path` (from the root) came from, e.g. "environment variable
/// KVPOOL_LOOKUP_RPC_PORT" or "config file `/etc/kvpool.toml`".
fn origin_of(figment: &Figment, path: &[&str]) -> String {
    let key = path.join(".");
    let Some(metadata) = figment.find_metadata(&key) else {
        return "the configuration".into();
    };
    let described = describe(metadata, path);
    // A table from the environment is many variables, none named exactly like the table.
    let is_table = matches!(figment.find_value(&key), Ok(Value::Dict(..)));
    match described.strip_prefix("environment variable ") {
        Some(name) if is_table && name.starts_with(ENV_PREFIX) => {
            format!("environment variables {name}__*")
        }
        _ => described,
    }
}

fn describe(metadata: &Metadata, path: &[&str]) -> String {
    if metadata.name == ENVIRONMENT && !path.is_empty() {
        return format!(
            "environment variable {}",
            metadata.interpolate(&Profile::Default, path)
        );
    }
    match &metadata.source {
        Some(Source::File(file)) => format!("{} `{}`", metadata.name, file.display()),
        _ => metadata.name.to_string(),
    }
}

/// Turns figment's error into ours: one line, the full dotted key, and its source.
/// `prefix` is the path of the table `err`'s paths are relative to.
fn figment_error(err: figment::Error, root: &Figment, prefix: &[&str]) -> Error {
    use figment::error::Kind;

    let more = err.count() - 1;
    let mut path: Vec<&str> = prefix.to_vec();
    path.extend(err.path.iter().map(String::as_str));
    // figment puts the offending key on the path itself; older versions did not.
    if let Kind::UnknownField(field, _) = &err.kind {
        if path.last() != Some(&field.as_str()) {
            path.push(field);
        }
    }
    let key = path.join(".");
    let origin = root
        .find_metadata(&key)
        .map(|m| describe(m, &path))
        .or_else(|| err.metadata.as_ref().map(|m| describe(m, &path)))
        .unwrap_or_else(|| "the configuration".into());

    let mut message = match &err.kind {
        Kind::UnknownField(_, expected) => {
            let hint = closest(path.last().copied().unwrap_or(""), expected)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!(
                "unknown key `{key}` in {origin}{hint}; known keys: {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => {
            let mut full = prefix.to_vec();
            full.extend(err.path.iter().map(String::as_str));
            full.push(field);
            format!("missing required key `{}`", full.join("."))
        }
        Kind::InvalidType(actual, expected) => {
            format!("invalid type for `{key}` in {origin}: found {actual}, expected {expected}")
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value for `{key}` in {origin}: found {actual}, expected {expected}")
        }
        Kind::UnknownVariant(found, expected) => format!(
            "invalid value for `{key}` in {origin}: found `{found}`, expected one of: {}",
            expected.join(", ")
        ),
        other if key.is_empty() => format!("invalid configuration in {origin}: {other}"),
        other => format!("invalid value for `{key}` in {origin}: {other}"),
    };
    if more > 0 {
        message.push_str(&format!(" (and {more} more errors)"));
    }
    Error::config_invalid(one_line(&message))
}

fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether a key names a credential. Errs on the side of hiding: a printed config is pasted
/// into issues and chat.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "access_key",
        "key_id",
        "sas",
    ]
    .iter()
    .any(|w| key == *w || key.contains(w))
        || key.ends_with("_key")
}

/// `scheme://user:password@host/...` with the password masked.
fn redact_url(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (userinfo, host) = rest[..authority_end].rsplit_once('@')?;
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    Some(format!(
        "{scheme}://{user}:***@{host}{}",
        &rest[authority_end..]
    ))
}

fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                // Free-form store options (`object.options`) may hold any credential.
                let secret = is_secret_key(key) || key.eq_ignore_ascii_case("options");
                match v {
                    serde_json::Value::String(s) if secret && !s.is_empty() => *s = "***".into(),
                    serde_json::Value::Object(inner) if secret => {
                        for v in inner.values_mut() {
                            if let serde_json::Value::String(s) = v {
                                *s = "***".into();
                            } else {
                                redact(v);
                            }
                        }
                    }
                    _ => redact(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::String(s) => {
            if let Some(masked) = redact_url(s) {
                *s = masked;
            }
        }
        _ => {}
    }
}

/// One configuration layer: a table of values and the metadata figment tags them with, which
/// is how an error finds the source of a key.
#[derive(Clone)]
struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

fn dotted(_: &Profile, keys: &[&str]) -> String {
    keys.join(".")
}

fn defaults_layer() -> Layer {
    let mut dict = Dict::new();
    dict.insert("backend".into(), Value::from("mooncake"));
    dict.insert(
        "hash_mode".into(),
        Value::from(HashingMode::default().as_str()),
    );
    if let Ok(Value::Dict(_, connector)) = Value::serialize(ConnectorConfig::default()) {
        dict.extend(connector);
    }
    Layer {
        metadata: Metadata::named(DEFAULTS).interpolater(dotted),
        dict,
    }
}

fn read_file(path: &Path, what: &str, via: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| {
        let problem = if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist"
        } else {
            "cannot be read"
        };
        Error::config_invalid(format!("{what} `{}`{via} {problem}", path.display())).set_source(e)
    })
}

fn toml_layer(path: &Path, via: &str) -> Result<Layer> {
    let text = read_file(path, CONFIG_FILE, via)?;
    let dict: Dict = Toml::from_str(&text).map_err(|e| {
        // toml's Display is a multi-line snippet; ours must stay on one line.
        let at = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(" at line {line}, column {column}")
            })
            .unwrap_or_default();
        Error::config_invalid(format!(
            "invalid TOML in {CONFIG_FILE} `{}`{via}{at}: {}",
            path.display(),
            one_line(e.message())
        ))
    })?;
    Ok(Layer {
        metadata: Metadata::from(CONFIG_FILE, path).interpolater(dotted),
        dict,
    })
}

/// `value` as a table, or an error saying `what` must be a JSON object.
fn json_object(value: serde_json::Value, what: &str) -> Result<Dict> {
    if !value.is_object() {
        return Err(Error::config_invalid(format!(
            "{what} must be a JSON object, found {value}"
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| Error::config_invalid(format!("{what} cannot be read: {e}")))
}

fn mooncake_json_layer(path: &Path) -> Result<Layer> {
    const VIA: &str = " (MOONCAKE_CONFIG_PATH)";
    let text = read_file(path, MOONCAKE_JSON, VIA)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::config_invalid(format!(
            "invalid JSON in {MOONCAKE_JSON} `{}`{VIA}: {e}",
            path.display()
        ))
    })?;
    let what = format!("{MOONCAKE_JSON} `{}`{VIA}", path.display());
    let mut dict = Dict::new();
    dict.insert("mooncake".into(), Value::from(json_object(json, &what)?));
    Ok(Layer {
        // Keys are reported as the file spells them, without our `mooncake.` prefix.
        metadata: Metadata::from(MOONCAKE_JSON, path)
            .interpolater(|_: &Profile, keys: &[&str]| keys[1.min(keys.len())..].join(".")),
        dict,
    })
}

/// Mooncake's own overrides of `mooncake.json`, which its Python client honours.
fn mooncake_env_layer<'a>(var: &impl Fn(&str) -> Option<&'a str>) -> Option<Layer> {
    const OVERRIDES: [(&str, &str); 2] = [
        ("MOONCAKE_MASTER", "master_server_address"),
        ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "global_segment_size"),
    ];
    let mut table = Dict::new();
    for (name, key) in OVERRIDES {
        if let Some(value) = var(name) {
            table.insert(key.into(), Value::from(value.to_string()));
        }
    }
    if table.is_empty() {
        return None;
    }
    let mut dict = Dict::new();
    dict.insert("mooncake".into(), Value::from(table));
    let interpolate = |_: &Profile, keys: &[&str]| {
        let name = OVERRIDES
            .iter()
            .find(|(_, key)| keys.get(1) == Some(key))
            .map_or("MOONCAKE_*", |(name, _)| name);
        name.to_string()
    };
    Some(Layer {
        metadata: Metadata::named(ENVIRONMENT).interpolater(interpolate),
        dict,
    })
}

/// `KVPOOL_*` variables as a layer; `None` when there are none.
fn env_layer(env: &[(String, String)]) -> Option<Layer> {
    let mut vars: Vec<(&str, &str)> = env
        .iter()
        .filter_map(|(name, value)| Some((name.strip_prefix(ENV_PREFIX)?, value.as_str())))
        // Read by the CLI and the test harness, not configuration keys.
        .filter(|(rest, _)| {
            let not_config = ["CONFIG", "LOG"].contains(rest)
                || rest.starts_with("LOG_")
                || rest.starts_with("TEST_");
            !not_config
        })
        .collect();
    vars.sort_unstable();
    let mut dict = Dict::new();
    for (rest, raw) in vars {
        let path: Vec<String> = rest
            .split("__")
            .filter(|s| !s.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if !path.is_empty() {
            insert_path(&mut dict, &path, env_value(raw));
        }
    }
    if dict.is_empty() {
        return None;
    }
    let interpolate = |_: &Profile, keys: &[&str]| {
        format!("{ENV_PREFIX}{}", keys.join("__").to_ascii_uppercase())
    };
    Some(Layer {
        metadata: Metadata::named(ENVIRONMENT).interpolater(interpolate),
        dict,
    })
}

/// An environment value: arrays and tables parse as figment's `Env` would; scalars stay strings
/// and lossy extraction converts them where a number or boolean is wanted, so a password of
/// digits still reads as a string.
fn env_value(raw: &str) -> Value {
    match raw.parse::<Value>() {
        Ok(v @ (Value::Dict(..) | Value::Array(..) | Value::String(..))) => v,
        _ => Value::from(raw.to_string()),
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    let (last, parents) = path.split_last().expect("path is not empty");
    let mut table = dict;
    for key in parents {
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| Value::from(Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(Dict::new());
        }
        let Value::Dict(_, inner) = entry else {
            unreachable!("just made a table")
        };
        table = inner;
    }
    table.insert(last.clone(), value);
}

fn extra_layer(value: &serde_json::Value) -> Result<Layer> {
    Ok(Layer {
        metadata: Metadata::named(EXTRA_CONFIG).interpolater(dotted),
        dict: json_object(value.clone(), EXTRA_CONFIG)?,
    })
}

/// Lenient deserializers for the connector keys, which arrive as strings from Python and shells.
mod flex {
    use std::fmt;

    use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};

    pub(super) fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        d.deserialize_any(U32)
    }

    pub(super) fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        d.deserialize_any(Bool)
    }

    pub(super) fn partition<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(Partition)
    }

    struct U32;

    impl Visitor<'_> for U32 {
        type Value = u32;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative 32-bit integer (or a string holding one)")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u32, E> {
            u32::try_from(v).map_err(|_| E::invalid_value(Unexpected::Signed(v), &self))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u32, E> {
            if v.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&v) {
                Ok(v as u32)
            } else {
                Err(E::invalid_value(Unexpected::Float(v), &self))
            }
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u32, E> {
            v.trim()
                .parse()
                .map_err(|_| E::invalid_value(Unexpected::Str(v), &self))
        }
    }

    struct Bool;

    impl Visitor<'_> for Bool {
        type Value = bool;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a boolean (or \"true\"/\"false\")")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(Unexpected::Unsigned(v), &self)),
            }
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(Unexpected::Signed(v), &self)),
            }
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            // Python's str(True) is "True"; figment's lossy booleans add yes/no, on/off, 1/0.
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" | "1" => Ok(true),
                "false" | "no" | "off" | "0" => Ok(false),
                _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
            }
        }
    }

    struct Partition;

    impl<'de> Visitor<'de> for Partition {
        type Value = Option<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("layer counts per stage, as a string like \"30,31\" or a list")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.trim().to_string()))
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut parts = Vec::new();
            while let Some(n) = seq.next_element::<u64>()? {
                parts.push(n.to_string());
            }
            Ok(Some(parts.join(",")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::size::ByteSize;
    use serde_json::json;
    use std::io::Write;

    const GIB: u64 = 1 << 30;
    const SEED_MOONCAKE_JSON: &str = r#"{"metadata_server": "P2PHANDSHAKE","protocol": "ascend","device_name": "","master_server_address": "127.0.0.1:50088","global_segment_size": "1GB"}"#;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct MemorySection {
        #[serde(default)]
        capacity: Option<ByteSize>,
        #[serde(default)]
        shards: Option<u32>,
        #[serde(default)]
        prefault: Option<bool>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct MooncakeSection {
        metadata_server: String,
        protocol: String,
        device_name: String,
        master_server_address: String,
        global_segment_size: ByteSize,
    }

    fn file_with(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        path
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// What the registry holds in a full build; kvpool-core's own tests link no backend.
    const SCHEMES: &[&str] = &["memory", "mooncake", "redis", "rocksdb-ssd"];

    fn with_env(
        file: Option<&Path>,
        extra: Option<serde_json::Value>,
        vars: &[(&str, &str)],
    ) -> Result<Config> {
        let sources = ConfigSources {
            file: file.map(Path::to_path_buf),
            extra_config: extra,
            use_env: true,
        };
        Config::load_inner(&sources, &env(vars), SCHEMES)
    }

    /// [`Config::from_extra_config`] against [`SCHEMES`].
    fn extra(value: serde_json::Value) -> Result<Config> {
        let sources = ConfigSources {
            extra_config: Some(value),
            ..ConfigSources::default()
        };
        Config::load_inner(&sources, &[], SCHEMES)
    }

    /// The message, asserting the invariants every config error shares.
    fn config_err(result: Result<Config>) -> String {
        let err = result.expect_err("expected a configuration error");
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
        let shown = err.to_string();
        assert!(!shown.contains('\n'), "not one line: {shown}");
        shown
    }

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
    fn each_layer_overrides_the_one_below() {
        let dir = tempfile::tempdir().unwrap();
        let toml = file_with(
            &dir,
            "kvpool.toml",
            "lookup_rpc_port = 1\nload_async = true\n\
             [mooncake]\nglobal_segment_size = \"2GB\"\nprotocol = \"tcp\"\n",
        );
        let mooncake = file_with(&dir, "mooncake.json", SEED_MOONCAKE_JSON);
        let mc = mooncake.to_str().unwrap();
        let segment = |c: &Config| c.section::<MooncakeSection>("mooncake").unwrap();

        // file over defaults
        let c = with_env(Some(&toml), None, &[]).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 1);
        assert!(c.connector.load_async);

        // mooncake.json over file
        let c = with_env(Some(&toml), None, &[("MOONCAKE_CONFIG_PATH", mc)]).unwrap();
        assert_eq!(segment(&c).global_segment_size, ByteSize(GIB));
        assert_eq!(segment(&c).protocol, "ascend");

        // env over mooncake.json and file
        let vars = [
            ("MOONCAKE_CONFIG_PATH", mc),
            ("KVPOOL_LOOKUP_RPC_PORT", "2"),
            ("KVPOOL_MOONCAKE__GLOBAL_SEGMENT_SIZE", "3GB"),
        ];
        let c = with_env(Some(&toml), None, &vars).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 2);
        assert!(
            c.connector.load_async,
            "untouched keys keep the file's value"
        );
        assert_eq!(segment(&c).global_segment_size, ByteSize(3 * GIB));

        // extra config over everything
        let extra = json!({"lookup_rpc_port": "3", "mooncake": {"global_segment_size": "4GB"}});
        let c = with_env(Some(&toml), Some(extra), &vars).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 3);
        assert_eq!(segment(&c).global_segment_size, ByteSize(4 * GIB));
        assert_eq!(segment(&c).master_server_address, "127.0.0.1:50088");
    }

    #[test]
    fn config_file_comes_from_kvpool_config_unless_given() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_with(&dir, "a.toml", "lookup_rpc_port = 5\n");
        let b = file_with(&dir, "b.toml", "lookup_rpc_port = 6\n");
        let vars = [("KVPOOL_CONFIG", a.to_str().unwrap())];
        assert_eq!(
            with_env(None, None, &vars)
                .unwrap()
                .connector
                .lookup_rpc_port,
            5
        );
        assert_eq!(
            with_env(Some(&b), None, &vars)
                .unwrap()
                .connector
                .lookup_rpc_port,
            6
        );
        // An empty variable counts as unset.
        let c = with_env(None, None, &[("KVPOOL_CONFIG", "")]).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 0);
    }

    #[test]
    fn missing_config_file_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.toml");
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");

        let vars = [("KVPOOL_CONFIG", path.to_str().unwrap())];
        let msg = config_err(with_env(None, None, &vars));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("KVPOOL_CONFIG"), "{msg}");
    }

    #[test]
    fn missing_mooncake_json_names_the_path() {
        let vars = [("MOONCAKE_CONFIG_PATH", "/nonexistent/mooncake.json")];
        let msg = config_err(with_env(None, None, &vars));
        assert!(msg.contains("/nonexistent/mooncake.json"), "{msg}");
        assert!(msg.contains("MOONCAKE_CONFIG_PATH"), "{msg}");
        // ... but only matters for the mooncake backend.
        let c = with_env(None, Some(json!({"backend": "memory"})), &vars).unwrap();
        assert_eq!(c.backend, "memory");
    }

    #[test]
    fn toml_syntax_error_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(
            &dir,
            "bad.toml",
            "backend = \"memory\"\nlookup_rpc_port = = 1\n",
        );
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
    }

    #[test]
    fn seed_mooncake_json_is_section_mooncake_only_for_the_mooncake_backend() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "mooncake.json", SEED_MOONCAKE_JSON);
        let vars = [("MOONCAKE_CONFIG_PATH", path.to_str().unwrap())];

        let c = with_env(
            None,
            Some(json!({"lookup_rpc_port": "0", "backend": "mooncake"})),
            &vars,
        )
        .unwrap();
        assert_eq!(c.section_names(), vec!["mooncake".to_string()]);
        let section: MooncakeSection = c.section("mooncake").unwrap();
        assert_eq!(
            section,
            MooncakeSection {
                metadata_server: "P2PHANDSHAKE".into(),
                protocol: "ascend".into(),
                device_name: String::new(),
                master_server_address: "127.0.0.1:50088".into(),
                global_segment_size: ByteSize(GIB),
            }
        );
        assert_eq!(c.to_json()["mooncake"]["global_segment_size"], json!("1GB"));

        // The default backend is mooncake, so the file is read with no extra config too.
        let c = with_env(None, None, &vars).unwrap();
        assert_eq!(c.section_names(), vec!["mooncake".to_string()]);

        for backend in [json!({"backend": "memory"}), json!({"backend": "redis"})] {
            let c = with_env(None, Some(backend), &vars).unwrap();
            assert!(c.section_names().is_empty());
            let raw: serde_json::Map<String, serde_json::Value> = c.section("mooncake").unwrap();
            assert!(raw.is_empty(), "{raw:?}");
        }
        let c = with_env(None, None, &[("KVPOOL_BACKEND", "memory")]).unwrap();
        assert_eq!(c.backend, "memory");
    }

    #[test]
    fn mooncake_env_overrides_the_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "mooncake.json", SEED_MOONCAKE_JSON);
        let vars = [
            ("MOONCAKE_CONFIG_PATH", path.to_str().unwrap()),
            ("MOONCAKE_MASTER", "10.0.0.1:50088"),
            ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "2048MB"),
        ];
        let section: MooncakeSection = with_env(None, None, &vars)
            .unwrap()
            .section("mooncake")
            .unwrap();
        assert_eq!(section.master_server_address, "10.0.0.1:50088");
        assert_eq!(section.global_segment_size, ByteSize(2 * GIB));

        let vars = [
            ("MOONCAKE_CONFIG_PATH", path.to_str().unwrap()),
            ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "lots"),
        ];
        let err = with_env(None, None, &vars)
            .unwrap()
            .section::<MooncakeSection>("mooncake")
            .unwrap_err()
            .to_string();
        assert!(err.contains("mooncake.global_segment_size"), "{err}");
        assert!(err.contains("MOONCAKE_GLOBAL_SEGMENT_SIZE"), "{err}");
    }

    #[test]
    fn unknown_key_names_key_source_and_suggestion() {
        let msg = config_err(extra(json!({"lookup_rpc_prot": "0"})));
        assert!(msg.contains("unknown key `lookup_rpc_prot`"), "{msg}");
        assert!(msg.contains("in kv_connector_extra_config"), "{msg}");
        assert!(msg.contains("did you mean `lookup_rpc_port`"), "{msg}");
        assert!(
            msg.contains("known keys: backend, hash_mode, lookup_rpc_port"),
            "{msg}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "k.toml", "[memroy]\ncapacity = \"1GB\"\n");
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains("`memroy`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("did you mean `memory`"), "{msg}");

        let msg = config_err(with_env(None, None, &[("KVPOOL_LOAD_ASYNCH", "1")]));
        assert!(msg.contains("`load_asynch`"), "{msg}");
        assert!(
            msg.contains("environment variable KVPOOL_LOAD_ASYNCH"),
            "{msg}"
        );

        let msg = config_err(with_env(None, None, &[("KVPOOL_MEMROY__CAPACITY", "1GB")]));
        assert!(msg.contains("`memroy`"), "{msg}");
        assert!(
            msg.contains("environment variables KVPOOL_MEMROY__*"),
            "{msg}"
        );
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
    fn wrong_types_name_the_key() {
        let msg = config_err(extra(json!({"lookup_rpc_port": "abc"})));
        assert!(msg.contains("`lookup_rpc_port`"), "{msg}");
        assert!(msg.contains("kv_connector_extra_config"), "{msg}");
        assert!(msg.contains("\"abc\""), "{msg}");

        let msg = config_err(extra(json!({"load_async": "maybe"})));
        assert!(msg.contains("`load_async`"), "{msg}");

        let msg = config_err(extra(json!({"hash_mode": "sha"})));
        assert!(msg.contains("`hash_mode`") && msg.contains("vllm"), "{msg}");
        let msg = config_err(extra(json!({"hash_mode": 1})));
        assert!(msg.contains("`hash_mode`"), "{msg}");

        let msg = config_err(extra(json!({"backend": 7})));
        assert!(msg.contains("`backend`"), "{msg}");

        let msg = config_err(extra(json!({"memory": 5})));
        assert!(msg.contains("`memory`") && msg.contains("table"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "t.toml", "prefill_pp_size = -1\n");
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains("`prefill_pp_size`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");

        let msg = config_err(with_env(
            None,
            None,
            &[("KVPOOL_USE_LAYERWISE", "sometimes")],
        ));
        assert!(msg.contains("KVPOOL_USE_LAYERWISE"), "{msg}");
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
    fn extra_config_must_be_an_object() {
        let msg = config_err(extra(json!([1, 2])));
        assert!(msg.contains("kv_connector_extra_config"), "{msg}");
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
    fn env_nests_with_double_underscore_and_keeps_strings() {
        #[derive(Deserialize)]
        struct Rocks {
            path: String,
            password: String,
        }
        let vars = [
            ("KVPOOL_BACKEND", "rocksdb-ssd"),
            ("KVPOOL_MEMORY__CAPACITY", "1GB"),
            ("KVPOOL_MEMORY__SHARDS", "8"),
            ("KVPOOL_MEMORY__PREFAULT", "true"),
            ("KVPOOL_ROCKSDB_SSD__PATH", "/data/kv"),
            ("KVPOOL_ROCKSDB_SSD__PASSWORD", "12345"),
            ("KVPOOL_HASH_MODE", "vllm"),
        ];
        let c = with_env(None, None, &vars).unwrap();
        assert_eq!(c.backend, "rocksdb-ssd");
        assert_eq!(c.hash_mode, HashingMode::Vllm);
        assert_eq!(c.section_names(), vec!["memory", "rocksdb_ssd"]);
        let memory: MemorySection = c.section("memory").unwrap();
        assert_eq!(memory.capacity, Some(ByteSize(GIB)));
        assert_eq!(memory.shards, Some(8));
        assert_eq!(memory.prefault, Some(true));
        let rocks: Rocks = c.section("rocksdb-ssd").unwrap();
        assert_eq!(rocks.path, "/data/kv");
        assert_eq!(rocks.password, "12345");
    }

    #[test]
    fn env_ignores_non_config_variables_and_use_env_false() {
        let vars = [
            ("KVPOOL_LOG", "debug"),
            ("KVPOOL_TEST_REDIS_URL", "redis://x"),
            ("KVPOOL_CONFIG", ""),
            ("PATH", "/usr/bin"),
            ("kvpool_backend", "redis"),
        ];
        let c = with_env(None, None, &vars).unwrap();
        assert_eq!(c.backend, "mooncake");

        let sources = ConfigSources {
            use_env: false,
            ..ConfigSources::default()
        };
        let vars = env(&[
            ("KVPOOL_BACKEND", "redis"),
            ("MOONCAKE_CONFIG_PATH", "/nonexistent"),
        ]);
        let c = Config::load_with_env(&sources, &vars).unwrap();
        assert_eq!(c.backend, "mooncake");
        assert!(c.section_names().is_empty());
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
    fn printed_configs_hide_every_credential() {
        let mut v = json!({
            "object": {"url": "s3://b/p", "access_key_id": "AKIA123", "secret_access_key": "s3cr3t",
                       "session_token": "tok", "options": {"azure_storage_sas_key": "sig"}},
            "redis": {"url": "redis://alice:hunter2@127.0.0.1:6379/0", "password": "pw",
                      "username": "alice"},
            "tiered": {"tiers": [{"redis": {"cluster_nodes": ["redis://:pw2@h:1"]}}]},
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in [
            "AKIA123", "s3cr3t", "tok\"", "sig", "hunter2", "\"pw\"", "pw2",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(
            text.contains("redis://alice:***@127.0.0.1:6379/0"),
            "{text}"
        );
        assert!(text.contains("\"username\":\"alice\""), "{text}");
        assert!(text.contains("s3://b/p"), "{text}");
    }
}
