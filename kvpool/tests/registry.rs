//! Every enabled backend feature is registered and selectable by name.

use kvpool::{Config, ErrorKind};

#[test]
fn every_enabled_backend_feature_is_registered() {
    let registered = kvpool::registered_schemes();
    // rocksdb-ssd is not a default feature; kvpool's dev-dependency on itself enables it so
    // that its registration is checked here too.
    assert!(
        kvpool::ENABLED_BACKENDS.contains(&"rocksdb-ssd"),
        "{:?}",
        kvpool::ENABLED_BACKENDS
    );
    for scheme in kvpool::ENABLED_BACKENDS {
        assert!(
            registered.contains(scheme),
            "feature {scheme} is enabled but its backend did not register (registered: {registered:?})"
        );
    }
}

#[test]
fn every_backend_has_a_factory_and_a_config_section() {
    // A factory without a section could not be configured; a section without a factory
    // would accept a table nothing reads.
    assert_eq!(
        kvpool::registered_schemes(),
        kvpool::config::section_schemes()
    );
}

#[tokio::test]
async fn open_selects_the_backend_by_name() {
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "memory": { "capacity": "8MB" }
    }))
    .unwrap();
    let pool = kvpool::open(&config).await.unwrap();
    assert_eq!(pool.info().scheme, "memory");
    assert!(pool.info().capabilities.capacity_bound);
    assert_eq!(pool.info().capabilities.max_value_size, Some(8 << 20));
}

#[tokio::test]
async fn unknown_backend_lists_the_registered_ones() {
    let config = Config::from_extra_config(serde_json::json!({ "backend": "nosuch" })).unwrap();
    let err = kvpool::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
    let msg = err.to_string();
    assert!(msg.contains("\"nosuch\""), "{msg}");
    assert!(msg.contains("registered backends: memory"), "{msg}");
}

#[tokio::test]
async fn bad_backend_section_names_the_key() {
    let config = Config::from_extra_config(serde_json::json!({
        "backend": "memory",
        "memory": { "capcity": "8MB" }
    }))
    .unwrap();
    let err = kvpool::open(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
    assert!(err.to_string().contains("capcity"), "{err}");
}
