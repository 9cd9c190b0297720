//! `kvpool soak` run as operators and CI run it, in a short form: a few seconds against
//! each backend, with real servers for redis and mooncake. A missing server binary fails
//! the test (the fixtures panic), never skips it.

use std::process::{Command, Output};

use kvpool_conformance::fixtures::mooncake::MooncakeMaster;
use kvpool_conformance::fixtures::redis::{RedisOptions, RedisServer};

/// Short enough that the four backends together stay well under 30 s of CI time.
const SECONDS: &str = "3";

fn kvpool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvpool"))
        .args(args)
        .env_remove("KVPOOL_CONFIG")
        .env_remove("MOONCAKE_CONFIG_PATH")
        .env_remove("MOONCAKE_MASTER")
        .env_remove("KVPOOL_BACKEND")
        .output()
        .expect("run kvpool")
}

/// Runs a short soak with `extra_config` and checks what every backend must deliver.
fn soak(backend: &str, extra_config: &str) -> serde_json::Value {
    let out = kvpool(&[
        "soak",
        "--backend",
        backend,
        "--clients",
        "4",
        "--seconds",
        SECONDS,
        "--value-size",
        "16KiB",
        "--extra-config",
        extra_config,
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "soak on {backend} failed ({}): {stderr}\n{stdout}",
        out.status
    );
    // Exactly one JSON object on stdout.
    let v: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    for field in [
        "ops",
        "errors",
        "wrong_bytes",
        "rss_start_mb",
        "rss_end_mb",
        "p99_get_us",
        "rss_warm_mb",
        "p99_put_us",
    ] {
        assert!(v.get(field).is_some(), "no {field} in {v}");
    }
    assert_eq!(v["backend"], backend, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["wrong_bytes"], 0, "{v}");
    assert_eq!(v["wrong_values"], 0, "{v}");
    assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
    // Clients share prefixes, so some loads happened and every one of them was verified.
    assert!(v["blocks_hit"].as_u64().unwrap() > 0, "{v}");
    assert!(v["blocks_stored"].as_u64().unwrap() > 0, "{v}");
    assert!(v["p99_get_us"].as_u64().unwrap() > 0, "{v}");
    assert!(v["p99_put_us"].as_u64().unwrap() > 0, "{v}");
    for field in ["rss_start_mb", "rss_warm_mb", "rss_end_mb"] {
        assert!(v[field].as_f64().unwrap() > 0.0, "{field}: {v}");
    }
    v
}

#[test]
fn soak_memory() {
    let v = soak("memory", r#"{"memory":{"capacity":"64MiB"}}"#);
    // The pool is smaller than what the run stores, so it evicted and kept going.
    assert!(v["rss_end_mb"].as_f64().unwrap() > 64.0, "{v}");
}

#[test]
fn soak_rocksdb_ssd() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "rocksdb_ssd": { "path": dir.path().join("db"), "capacity": "128MiB" }
    });
    soak("rocksdb-ssd", &config.to_string());
}

#[test]
fn soak_redis() {
    // As a cache is run: bounded, evicting.
    let server = RedisServer::start(RedisOptions {
        maxmemory: Some((128 << 20, "allkeys-lru".into())),
        ..RedisOptions::default()
    });
    let config = serde_json::json!({ "redis": { "url": server.url() } });
    soak("redis", &config.to_string());
}

#[test]
fn soak_mooncake() {
    let master = MooncakeMaster::start();
    // This process owns the segment the values go to (a pure client would have
    // nowhere to put them).
    let config = serde_json::json!({ "mooncake": {
        "master_server_address": master.address(),
        "global_segment_size": "128MiB",
        "local_hostname": "127.0.0.1",
    }});
    soak("mooncake", &config.to_string());
}

#[test]
fn soak_prints_a_human_summary_without_json() {
    let out = kvpool(&[
        "soak",
        "--backend",
        "memory",
        "--clients",
        "1",
        "--seconds",
        "0.5",
        "--extra-config",
        r#"{"memory":{"capacity":"16MiB"}}"#,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("memory backend, 1 clients"), "{stdout}");
    assert!(stdout.contains("errors    0, wrong bytes 0"), "{stdout}");
    assert!(serde_json::from_str::<serde_json::Value>(&stdout).is_err());
}

#[test]
fn soak_rejects_bad_flags_in_one_line() {
    let memory = r#"{"memory":{"capacity":"16MiB"}}"#;
    for (flags, says) in [
        (&["--clients", "0"][..], "--clients"),
        (&["--seconds", "0"], "--seconds"),
        (&["--seconds", "nan"], "--seconds"),
        (
            &["--seconds", "2", "--warmup-seconds", "2"],
            "--warmup-seconds",
        ),
        (&["--value-size", "0"], "--value-size"),
        (&["--new-ratio", "1.5"], "--new-ratio"),
        (
            &["--prefix-blocks", "0", "--suffix-blocks", "0"],
            "--prefix-blocks",
        ),
        (&["--variants", "0"], "--variants"),
        // Over the memory backend's largest value (its capacity).
        (&["--value-size", "32MiB"], "--value-size"),
    ] {
        let mut args = vec![
            "soak",
            "--backend",
            "memory",
            "--extra-config",
            memory,
            "--json",
        ];
        args.extend(flags);
        let out = kvpool(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(says), "{flags:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{flags:?}: one line: {err}");
        assert!(out.stdout.is_empty(), "{flags:?}: nothing on stdout");
    }
    // clap's own parse errors exit 2 as well and name the flag.
    let out = kvpool(&["soak", "--backend", "memory", "--clients", "many"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--clients"));
    let out = kvpool(&["soak", "--backend", "nosuch", "--seconds", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("registered backends"));
}
