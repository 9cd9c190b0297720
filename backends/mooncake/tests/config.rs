//! The seed's deployment: Mooncake's own `mooncake.json` at
//! `MOONCAKE_CONFIG_PATH`, read through this crate's config section and opened
//! through the registry, with `MOONCAKE_MASTER` overriding the address.

use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_core::config::ConfigSources;
use kvpool_core::{Config, ErrorKind};

// Link the backend so its registrations (factory and config section) are present.
use kvpool_backend_mooncake as _;

fn write_json(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "kvpool-mooncake-{:016x}.json",
        rand::random::<u64>()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &std::path::Path, master: &str) -> Config {
    let sources = ConfigSources {
        extra_config: Some(serde_json::json!({"lookup_rpc_port": "0", "backend": "mooncake"})),
        use_env: true,
        ..ConfigSources::default()
    };
    let env = [
        (
            "MOONCAKE_CONFIG_PATH".to_string(),
            path.display().to_string(),
        ),
        ("MOONCAKE_MASTER".to_string(), master.to_string()),
    ];
    Config::load_with_env(&sources, &env).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_seed_json_with_tcp_opens_and_with_ascend_says_why_not() {
    let master = MooncakeMaster::start();
    // As the guide writes it, except the protocol; the address is a
    // placeholder that MOONCAKE_MASTER overrides.
    let tcp = write_json(
        r#"{
    "metadata_server": "P2PHANDSHAKE",
    "protocol": "tcp",
    "device_name": "",
    "master_server_address": "xx.xx.xx.xx:50088",
    "global_segment_size": "64MB"
}"#,
    );
    let ascend = write_json(
        r#"{"metadata_server": "P2PHANDSHAKE", "protocol": "ascend", "device_name": "",
            "master_server_address": "127.0.0.1:50088", "global_segment_size": "1GB"}"#,
    );
    rt().block_on(async {
        let pool = kvpool_core::open(&load(&tcp, &master.address()))
            .await
            .unwrap();
        let info = pool.info().to_string();
        assert!(info.contains("segment owner of 64 MiB"), "{info}");
        assert!(info.contains(&master.address()), "{info}");
        pool.close().await.unwrap();

        let e = kvpool_core::open(&load(&ascend, &master.address()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let msg = e.to_string();
        assert!(
            msg.contains("\"protocol\": \"tcp\"") && msg.contains("CANN"),
            "{msg}"
        );
    });
    let _ = std::fs::remove_file(tcp);
    let _ = std::fs::remove_file(ascend);
}

#[test]
fn a_master_that_is_not_there_fails_open_promptly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let json = write_json(r#"{"metadata_server": "P2PHANDSHAKE", "protocol": "tcp"}"#);
    rt().block_on(async {
        let e = kvpool_core::open(&load(&json, &addr)).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        assert!(e.to_string().contains(&addr), "{e}");
    });
    let _ = std::fs::remove_file(json);
}

/// A segment owner of 32 MB; `MOONCAKE_MASTER` (see `load`) supplies the address.
const OWNER_32MB: &str = r#"{"metadata_server": "P2PHANDSHAKE", "protocol": "tcp",
    "device_name": "", "master_server_address": "127.0.0.1:1", "global_segment_size": "32MB"}"#;

#[test]
fn clear_all_empties_the_shared_pool_and_clear_local_leaves_it() {
    use kvpool_core::{BlockHash, BlockKey, ClearScope, KvBackendExt, Namespace};
    let master = MooncakeMaster::start();
    let json = write_json(OWNER_32MB);
    rt().block_on(async {
        let pool = kvpool_core::open(&load(&json, &master.address()))
            .await
            .unwrap();
        let ns = std::sync::Arc::new(Namespace::single_rank("m").unwrap());
        let keys: Vec<BlockKey> = (0..4u8)
            .map(|i| BlockKey::new(ns.clone(), BlockHash([i; 32])))
            .collect();
        for k in &keys {
            pool.put_bytes(k.clone(), vec![7u8; 4096].into())
                .await
                .unwrap();
        }
        assert!(!pool.clear(ClearScope::Local).await.unwrap());
        assert_eq!(pool.exists(&keys).await.unwrap(), [true; 4]);
        assert!(pool.clear(ClearScope::All).await.unwrap());
        assert_eq!(pool.exists(&keys).await.unwrap(), [false; 4]);
        // The pool takes new objects after it.
        pool.put_bytes(keys[0].clone(), vec![9u8; 4096].into())
            .await
            .unwrap();
        let back = pool.get_bytes(&keys[0]).await.unwrap().unwrap();
        assert_eq!(&back[..], &[9u8; 4096][..]);
        pool.close().await.unwrap();
    });
    let _ = std::fs::remove_file(json);
}

/// Releases of `mooncake_master` answer `ServiceReady` with the same "2.0.0" but encode puts
/// differently; a client that misreads them puts nothing. kvpool refuses such a master at open.
#[test]
fn a_master_of_another_release_is_refused_at_open() {
    let other = MooncakeMaster::start_release_0_3_14();
    let json = write_json(OWNER_32MB);
    rt().block_on(async {
        let e = kvpool_core::open(&load(&json, &other.address()))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        let msg = e.to_string();
        assert!(msg.contains("\"2.0.0\"") && msg.contains("0.3.13"), "{msg}");
        assert!(msg.contains("mooncake-transfer-engine-non-cuda"), "{msg}");

        // The release kvpool speaks opens and puts.
        let same = MooncakeMaster::start();
        let pool = kvpool_core::open(&load(&json, &same.address()))
            .await
            .unwrap();
        pool.close().await.unwrap();
    });
    let _ = std::fs::remove_file(json);
}
