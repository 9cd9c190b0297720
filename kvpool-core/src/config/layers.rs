//! The layers the loader merges, each tagged with its source so that an error can name it:
//! the defaults, the TOML file, `KVPOOL_*` variables, vLLM's extra config, and the layers a
//! backend contributes for its own table ([`Layer::json_file`], [`Layer::env`]).

use std::fmt;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::diagnostics::one_line;
use super::{ConnectorConfig, HashingMode};
use crate::error::{Error, Result};

// Layer names, as they appear in error messages ("... in kv_connector_extra_config").
pub(super) const DEFAULTS: &str = "defaults";
const CONFIG_FILE: &str = "config file";
pub(super) const ENVIRONMENT: &str = "environment";
const EXTRA_CONFIG: &str = "kv_connector_extra_config";

pub(super) const ENV_PREFIX: &str = "KVPOOL_";

/// The environment the loader reads: the process's for [`Config::load`], the caller's pairs
/// for [`Config::load_with_env`], and nothing at all unless [`ConfigSources::use_env`].
///
/// [`Config::load`]: super::Config::load
/// [`Config::load_with_env`]: super::Config::load_with_env
/// [`ConfigSources::use_env`]: super::ConfigSources::use_env
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    vars: &'a [(String, String)],
}

impl<'a> Env<'a> {
    pub(super) fn new(vars: &'a [(String, String)]) -> Self {
        Env { vars }
    }

    /// The value of `name`; the last one where a name is given twice. An empty value counts as
    /// unset, because that is how shells unset a variable for a single command
    /// (`KVPOOL_CONFIG= cmd`).
    pub fn var(&self, name: &str) -> Option<&'a str> {
        self.vars
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }
}

/// One configuration layer: a table of values and the metadata figment tags them with, which
/// is how an error finds the source of a key.
///
/// A backend builds its own with [`Layer::json_file`] and [`Layer::env`]. Those hold the
/// backend's table only: the loader puts them under the backend's name, so a backend can set
/// nothing outside its own table, and keys in errors are as the source spells them.
#[derive(Clone)]
pub struct Layer {
    metadata: Metadata,
    dict: Dict,
}

impl fmt::Debug for Layer {
    // The metadata's interpolater is a closure, and its Debug says nothing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layer")
            .field("name", &self.metadata.name)
            .field("source", &self.metadata.source)
            .field("keys", &self.dict.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        self.metadata.clone()
    }

    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

impl Layer {
    /// A backend's table read from the JSON object in the file at `path`. Errors name it
    /// "`name` `path`", and when reading fails also `var`, the variable the path came from:
    /// "mooncake.json `/etc/mooncake.json` (MOONCAKE_CONFIG_PATH) does not exist".
    ///
    /// # Errors
    /// `ConfigInvalid` when the file is missing or unreadable, is not JSON, or holds something
    /// other than an object.
    pub fn json_file(name: &'static str, path: &Path, var: Option<&str>) -> Result<Layer> {
        let via = var.map(|var| format!(" ({var})")).unwrap_or_default();
        let text = read_file(path, name, &via)?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::config_invalid(format!(
                "invalid JSON in {name} `{}`{via}: {e}",
                path.display()
            ))
        })?;
        let what = format!("{name} `{}`{via}", path.display());
        let dict = json_object(json, &what)?;
        Ok(Layer {
            // Keys are reported as the file spells them, without the table's name.
            metadata: Metadata::from(name, path)
                .interpolater(|_: &Profile, keys: &[&str]| keys[1.min(keys.len())..].join(".")),
            dict,
        })
    }

    /// A backend's table set from environment variables: `values` are `(key, value)` pairs,
    /// kept as strings (lossy extraction reads numbers, booleans and sizes from them). An error
    /// names the key's source "environment variable {var_name(path)}", where `path` is the key's
    /// path inside the table, empty for the table itself.
    pub fn env<'v>(
        values: impl IntoIterator<Item = (&'v str, &'v str)>,
        var_name: fn(&[&str]) -> String,
    ) -> Layer {
        let mut dict = Dict::new();
        for (key, value) in values {
            dict.insert(key.into(), Value::from(value.to_string()));
        }
        let interpolate = move |_: &Profile, keys: &[&str]| var_name(&keys[1.min(keys.len())..]);
        Layer {
            metadata: Metadata::named(ENVIRONMENT).interpolater(interpolate),
            dict,
        }
    }

    /// The layer as the table `name` of the whole configuration.
    pub(super) fn under(self, name: &str) -> Layer {
        let mut dict = Dict::new();
        dict.insert(name.into(), Value::from(self.dict));
        Layer {
            metadata: self.metadata,
            dict,
        }
    }
}

fn dotted(_: &Profile, keys: &[&str]) -> String {
    keys.join(".")
}

pub(super) fn defaults_layer() -> Layer {
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

pub(super) fn toml_layer(path: &Path, via: &str) -> Result<Layer> {
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

/// `KVPOOL_*` variables as a layer; `None` when there are none.
pub(super) fn env_layer(env: Env<'_>) -> Option<Layer> {
    let mut vars: Vec<(&str, &str)> = env
        .vars
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

pub(super) fn extra_layer(value: &serde_json::Value) -> Result<Layer> {
    Ok(Layer {
        metadata: Metadata::named(EXTRA_CONFIG).interpolater(dotted),
        dict: json_object(value.clone(), EXTRA_CONFIG)?,
    })
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::super::testing::{config_err, env, extra, file_with, with_env, MemorySection, GIB};
    use super::super::{Config, ConfigSources, HashingMode};
    use crate::size::ByteSize;

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
    fn extra_config_must_be_an_object() {
        let msg = config_err(extra(json!([1, 2])));
        assert!(msg.contains("kv_connector_extra_config"), "{msg}");
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
        let vars = env(&[("KVPOOL_BACKEND", "redis")]);
        let c = Config::load_with_env(&sources, &vars).unwrap();
        assert_eq!(c.backend, "mooncake");
        assert!(c.section_names().is_empty());
    }
}
