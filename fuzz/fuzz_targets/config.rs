//! Configuration from outside: vLLM's `kv_connector_extra_config` (JSON), the
//! TOML file, the environment, and Mooncake's `mooncake.json`. The first byte
//! picks the source, the rest is its text. Whatever loads must also type-check
//! as each backend's section without panicking, and its effective JSON
//! (`kvpool check`) must load again to the same.
#![no_main]

use std::path::PathBuf;

use kvpool_core::config::{Config, ConfigSources};

/// Variables that name files: the file sources are fuzzed through their own
/// modes, and a fuzzed path could name a device that never ends.
const FILE_VARS: [&str; 2] = ["KVPOOL_CONFIG", "MOONCAKE_CONFIG_PATH"];

fn scratch(ext: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kvpool-fuzz-config-{}.{ext}", std::process::id()))
}

fn env_pairs(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !FILE_VARS.contains(k))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let loaded = match mode % 4 {
        0 => match serde_json::from_slice(rest) {
            Ok(value) => Config::from_extra_config(value),
            Err(_) => return,
        },
        1 => {
            let path = scratch("toml");
            std::fs::write(&path, rest).expect("the temp dir is writable");
            let sources = ConfigSources {
                file: Some(path),
                ..ConfigSources::default()
            };
            Config::load_with_env(&sources, &[])
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let sources = ConfigSources {
                use_env: true,
                ..ConfigSources::default()
            };
            Config::load_with_env(&sources, &env_pairs(text))
        }
        _ => {
            let path = scratch("json");
            std::fs::write(&path, rest).expect("the temp dir is writable");
            let sources = ConfigSources {
                use_env: true,
                ..ConfigSources::default()
            };
            let env = [(
                "MOONCAKE_CONFIG_PATH".to_owned(),
                path.display().to_string(),
            )];
            Config::load_with_env(&sources, &env)
        }
    };
    let Ok(config) = loaded else {
        return;
    };
    let _ = config.section::<kvpool_backend_mooncake::MooncakeConfig>("mooncake");
    let _ = config.section::<kvpool_backend_redis::RedisConfig>("redis");
    let shown = config.to_json();
    let again = Config::from_extra_config(shown.clone())
        .unwrap_or_else(|e| panic!("kvpool check's JSON does not load again: {e}\n{shown}"));
    assert_eq!(again.to_json(), shown);
});
