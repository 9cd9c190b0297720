//! Mooncake's own configuration sources, which this crate contributes as layers of the
//! `mooncake` table when `mooncake` is the selected backend: `mooncake.json` at
//! `MOONCAKE_CONFIG_PATH` (the Ascend Store guide's deployment), then `MOONCAKE_MASTER` and
//! `MOONCAKE_GLOBAL_SEGMENT_SIZE` over it, which Mooncake's Python client honours too.

use std::path::Path;

use kvpool_core::config::{Env, Layer};
use kvpool_core::Result;

const MOONCAKE_JSON: &str = "mooncake.json";

/// Mooncake's own overrides of `mooncake.json`: the variable, the key it sets.
const OVERRIDES: [(&str, &str); 2] = [
    ("MOONCAKE_MASTER", "master_server_address"),
    ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "global_segment_size"),
];

/// The layers of the `mooncake` table, lowest first, read from the loader's environment.
pub(crate) fn layers(env: &Env<'_>) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    if let Some(path) = env.var("MOONCAKE_CONFIG_PATH") {
        let var = Some("MOONCAKE_CONFIG_PATH");
        layers.push(Layer::json_file(MOONCAKE_JSON, Path::new(path), var)?);
    }
    let overrides: Vec<(&str, &str)> = OVERRIDES
        .iter()
        .filter_map(|&(name, key)| Some((key, env.var(name)?)))
        .collect();
    if !overrides.is_empty() {
        layers.push(Layer::env(overrides, override_name));
    }
    Ok(layers)
}

/// The variable behind the key at `path` in the table; the whole table is all of them.
fn override_name(path: &[&str]) -> String {
    OVERRIDES
        .iter()
        .find(|(_, key)| path.first() == Some(key))
        .map_or("MOONCAKE_*", |(name, _)| name)
        .to_string()
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::PathBuf;

    use kvpool_core::config::ConfigSources;
    use kvpool_core::size::ByteSize;
    use kvpool_core::{Config, ErrorKind};
    use serde::Deserialize;
    use serde_json::json;

    use super::*;

    const GIB: u64 = 1 << 30;
    const SEED_MOONCAKE_JSON: &str = r#"{"metadata_server": "P2PHANDSHAKE","protocol": "ascend","device_name": "","master_server_address": "127.0.0.1:50088","global_segment_size": "1GB"}"#;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct MooncakeSection {
        metadata_server: String,
        protocol: String,
        device_name: String,
        master_server_address: String,
        global_segment_size: ByteSize,
    }

    /// A directory removed when dropped; this crate does without `tempfile`.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "kvpool-mooncake-sources-{:016x}",
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn file_with(dir: &TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.0.join(name);
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

    /// The loader with this crate's section registered, as in every build that links it.
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
        Config::load_with_env(&sources, &env(vars))
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
    fn each_layer_overrides_the_one_below() {
        let dir = TempDir::new();
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
    fn vllm_native_mooncake_json_loads_through_mooncake_config_path() {
        let dir = TempDir::new();
        let json = r#"{"metadata_server": "P2PHANDSHAKE", "master_server_address": "127.0.0.1:50051",
            "protocol": "tcp", "device_name": "", "mode": "standalone-store",
            "global_segment_size": 0, "local_buffer_size": "1GB", "enable_offload": false,
            "tenant_id": "default"}"#;
        let path = file_with(&dir, "mooncake.json", json);
        let vars = [("MOONCAKE_CONFIG_PATH", path.to_str().unwrap())];
        let c = with_env(None, Some(json!({"backend": "mooncake"})), &vars).unwrap();
        let section: crate::MooncakeConfig = c.section("mooncake").unwrap();
        section.validate().unwrap();
        assert_eq!(section.mode, "standalone-store");
        assert_eq!(section.local_buffer_size, ByteSize(GIB));
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
    fn seed_mooncake_json_is_section_mooncake_only_for_the_mooncake_backend() {
        let dir = TempDir::new();
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
        let dir = TempDir::new();
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
    fn mooncake_sources_are_read_only_with_use_env() {
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
}
