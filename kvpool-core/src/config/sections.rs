//! The hook through which a backend crate declares its table and contributes the layers of
//! its own configuration sources.

use super::{Env, Layer};
use crate::error::Result;

/// A backend's table in the configuration, submitted with `inventory::submit!` by the crate
/// that implements the backend, next to its [`BackendFactory`](crate::registry::BackendFactory).
///
/// The loader allows a table only for a registered section (or the selected backend, so that
/// opening an unknown one fails with the registry's list of known backends). A section may
/// also read the backend's own configuration sources:
///
/// ```
/// # use std::path::Path;
/// # use kvpool_core::config::{BackendSection, Env, Layer};
/// # use kvpool_core::Result;
/// fn mooncake_layers(env: &Env<'_>) -> Result<Vec<Layer>> {
///     let Some(path) = env.var("MOONCAKE_CONFIG_PATH") else {
///         return Ok(Vec::new());
///     };
///     let var = Some("MOONCAKE_CONFIG_PATH");
///     Ok(vec![Layer::json_file("mooncake.json", Path::new(path), var)?])
/// }
///
/// inventory::submit! {
///     BackendSection { scheme: "mooncake", extra_layers: Some(mooncake_layers) }
/// }
/// # fn main() {}
/// ```
#[derive(Debug)]
pub struct BackendSection {
    /// The backend's scheme; its table is named the same with `-` read as `_`.
    pub scheme: &'static str,
    /// Layers of the backend's own table, lowest first, read from the environment the loader
    /// was given. Called only when this backend is the selected one, and merged above the TOML
    /// file and below `KVPOOL_*` variables and the extra config.
    pub extra_layers: Option<ExtraLayers>,
}

/// Reads a backend's own configuration sources: see [`BackendSection::extra_layers`].
pub type ExtraLayers = fn(&Env<'_>) -> Result<Vec<Layer>>;

inventory::collect!(BackendSection);

/// The schemes of every linked [`BackendSection`], sorted: the backends that may have a table.
pub fn section_schemes() -> Vec<&'static str> {
    let mut schemes: Vec<_> = inventory::iter::<BackendSection>
        .into_iter()
        .map(|s| s.scheme)
        .collect();
    schemes.sort_unstable();
    schemes.dedup();
    schemes
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde::Deserialize;
    use serde_json::json;

    use super::super::testing::{config_err, env, file_with, load_with, GIB, SECTIONS};
    use super::super::{Config, ConfigSources};
    use super::*;
    use crate::size::ByteSize;

    /// A backend whose crate contributes layers of its own, as mooncake's does: a JSON file at
    /// `SEEDED_CONFIG_PATH`, then `SEEDED_SIZE` over it.
    fn seeded_layers(env: &Env<'_>) -> Result<Vec<Layer>> {
        let mut layers = Vec::new();
        if let Some(path) = env.var("SEEDED_CONFIG_PATH") {
            let var = Some("SEEDED_CONFIG_PATH");
            layers.push(Layer::json_file("seeded.json", Path::new(path), var)?);
        }
        if let Some(size) = env.var("SEEDED_SIZE") {
            layers.push(Layer::env([("size", size)], |keys| match keys {
                ["size", ..] => "SEEDED_SIZE".into(),
                _ => "SEEDED_*".into(),
            }));
        }
        Ok(layers)
    }

    const SEEDED: BackendSection = BackendSection {
        scheme: "seeded",
        extra_layers: Some(seeded_layers),
    };

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct SeededSection {
        size: ByteSize,
        #[serde(default)]
        protocol: String,
    }

    /// [`load_with`] against [`SECTIONS`] and [`SEEDED`].
    fn seeded(
        file: Option<&Path>,
        extra: Option<serde_json::Value>,
        vars: &[(&str, &str)],
    ) -> Result<Config> {
        let mut sections = SECTIONS.to_vec();
        sections.push(&SEEDED);
        load_with(&sections, file, extra, vars)
    }

    #[test]
    fn each_layer_overrides_the_one_below() {
        let dir = tempfile::tempdir().unwrap();
        let toml = file_with(
            &dir,
            "kvpool.toml",
            "backend = \"seeded\"\nlookup_rpc_port = 1\nload_async = true\n\
             [seeded]\nsize = \"2GB\"\nprotocol = \"tcp\"\n",
        );
        let json = file_with(
            &dir,
            "seeded.json",
            r#"{"size": "1GB", "protocol": "ascend"}"#,
        );
        let js = json.to_str().unwrap();
        let section = |c: &Config| c.section::<SeededSection>("seeded").unwrap();

        // file over defaults
        let c = seeded(Some(&toml), None, &[]).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 1);
        assert!(c.connector.load_async);
        assert_eq!(section(&c).size, ByteSize(2 * GIB));

        // the backend's own layers over the file, in the order it gives them
        let c = seeded(Some(&toml), None, &[("SEEDED_CONFIG_PATH", js)]).unwrap();
        assert_eq!(section(&c).size, ByteSize(GIB));
        assert_eq!(section(&c).protocol, "ascend");
        let vars = [("SEEDED_CONFIG_PATH", js), ("SEEDED_SIZE", "5GB")];
        let c = seeded(Some(&toml), None, &vars).unwrap();
        assert_eq!(section(&c).size, ByteSize(5 * GIB));
        assert_eq!(section(&c).protocol, "ascend");

        // env over the backend's layers and the file
        let vars = [
            ("SEEDED_CONFIG_PATH", js),
            ("SEEDED_SIZE", "5GB"),
            ("KVPOOL_LOOKUP_RPC_PORT", "2"),
            ("KVPOOL_SEEDED__SIZE", "3GB"),
        ];
        let c = seeded(Some(&toml), None, &vars).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 2);
        assert!(
            c.connector.load_async,
            "untouched keys keep the file's value"
        );
        assert_eq!(section(&c).size, ByteSize(3 * GIB));

        // extra config over everything
        let extra = json!({"lookup_rpc_port": "3", "seeded": {"size": "4GB"}});
        let c = seeded(Some(&toml), Some(extra), &vars).unwrap();
        assert_eq!(c.connector.lookup_rpc_port, 3);
        assert_eq!(section(&c).size, ByteSize(4 * GIB));
        assert_eq!(section(&c).protocol, "ascend");
    }

    #[test]
    fn backend_layers_are_read_only_for_the_selected_backend_from_the_given_env() {
        let vars = [("SEEDED_CONFIG_PATH", "/nonexistent/seeded.json")];
        let msg = config_err(seeded(None, Some(json!({"backend": "seeded"})), &vars));
        assert!(
            msg.contains(
                "seeded.json `/nonexistent/seeded.json` (SEEDED_CONFIG_PATH) does not exist"
            ),
            "{msg}"
        );
        let c = seeded(None, Some(json!({"backend": "memory"})), &vars).unwrap();
        assert!(c.section_names().is_empty());

        let sources = ConfigSources {
            extra_config: Some(json!({"backend": "seeded"})),
            use_env: false,
            ..ConfigSources::default()
        };
        let c = Config::load_inner(&sources, &env(&vars), &[&SEEDED]).unwrap();
        assert_eq!(c.backend, "seeded");
        assert!(c.section_names().is_empty());
    }

    #[test]
    fn backend_layer_errors_name_their_source() {
        let dir = tempfile::tempdir().unwrap();
        let backend = || Some(json!({"backend": "seeded"}));
        let load = |path: &Path| {
            seeded(
                None,
                backend(),
                &[("SEEDED_CONFIG_PATH", path.to_str().unwrap())],
            )
        };

        let bad = file_with(&dir, "bad.json", "{not json");
        let msg = config_err(load(&bad));
        let named = format!("seeded.json `{}` (SEEDED_CONFIG_PATH)", bad.display());
        assert!(msg.contains(&format!("invalid JSON in {named}")), "{msg}");

        let list = file_with(&dir, "list.json", "[1]");
        let msg = config_err(load(&list));
        assert!(msg.contains("must be a JSON object"), "{msg}");

        let typo = file_with(&dir, "typo.json", r#"{"size": "1GB", "protocl": "tcp"}"#);
        let c = load(&typo).unwrap();
        assert_eq!(c.section_names(), vec!["seeded".to_string()]);
        let msg = c
            .section::<SeededSection>("seeded")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`seeded.protocl`"), "{msg}");
        assert!(
            msg.contains(&format!("seeded.json `{}`", typo.display())),
            "{msg}"
        );
        assert!(msg.contains("did you mean `protocol`"), "{msg}");

        let c = seeded(None, backend(), &[("SEEDED_SIZE", "lots")]).unwrap();
        let msg = c
            .section::<SeededSection>("seeded")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("`seeded.size`"), "{msg}");
        assert!(msg.contains("environment variable SEEDED_SIZE"), "{msg}");
    }
}
