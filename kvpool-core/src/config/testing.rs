//! What the config tests share: loading against a fixed set of backend sections, so that no
//! test depends on which backend crates happen to be linked.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{BackendSection, Config, ConfigSources};
use crate::error::{ErrorKind, Result};
use crate::size::ByteSize;

pub(super) const GIB: u64 = 1 << 30;

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(super) struct MemorySection {
    #[serde(default)]
    pub(super) capacity: Option<ByteSize>,
    #[serde(default)]
    pub(super) shards: Option<u32>,
    #[serde(default)]
    pub(super) prefault: Option<bool>,
}

pub(super) fn file_with(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

const fn plain(scheme: &'static str) -> BackendSection {
    BackendSection {
        scheme,
        extra_layers: None,
    }
}

/// The backend tables of a full build; kvpool-core's own tests link no backend.
pub(super) const SECTIONS: &[&BackendSection] = &[
    &plain("memory"),
    &plain("mooncake"),
    &plain("redis"),
    &plain("rocksdb-ssd"),
];

/// [`Config::load_with_env`] against `sections`, the environment read.
pub(super) fn load_with(
    sections: &[&BackendSection],
    file: Option<&Path>,
    extra: Option<serde_json::Value>,
    vars: &[(&str, &str)],
) -> Result<Config> {
    let sources = ConfigSources {
        file: file.map(Path::to_path_buf),
        extra_config: extra,
        use_env: true,
    };
    Config::load_inner(&sources, &env(vars), sections)
}

/// [`load_with`] against [`SECTIONS`].
pub(super) fn with_env(
    file: Option<&Path>,
    extra: Option<serde_json::Value>,
    vars: &[(&str, &str)],
) -> Result<Config> {
    load_with(SECTIONS, file, extra, vars)
}

/// [`Config::from_extra_config`] against [`SECTIONS`].
pub(super) fn extra(value: serde_json::Value) -> Result<Config> {
    let sources = ConfigSources {
        extra_config: Some(value),
        ..ConfigSources::default()
    };
    Config::load_inner(&sources, &[], SECTIONS)
}

/// The message, asserting the invariants every config error shares.
pub(super) fn config_err(result: Result<Config>) -> String {
    let err = result.expect_err("expected a configuration error");
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid, "{err}");
    let shown = err.to_string();
    assert!(!shown.contains('\n'), "not one line: {shown}");
    shown
}
