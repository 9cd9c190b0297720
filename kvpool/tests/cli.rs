//! The `kvpool` binary, run as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

fn kvpool(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvpool"))
        .args(args)
        .env_remove("KVPOOL_CONFIG")
        .env_remove("MOONCAKE_CONFIG_PATH")
        .env_remove("KVPOOL_BACKEND")
        .output()
        .expect("run kvpool")
}

fn stdout_json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "kvpool failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn trace() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/conversation_trace.jsonl");
    assert!(
        p.exists(),
        "the trace must sit at {} (clone next to shared/)",
        p.display()
    );
    p
}

const MEMORY: &str = r#"{"backend":"memory","memory":{"capacity":"16MB"}}"#;

#[test]
fn check_prints_backend_and_capabilities() {
    let out = kvpool(&["check", "--extra-config", MEMORY, "--json"]);
    let v = stdout_json(&out);
    assert_eq!(v["backend"], "memory");
    assert_eq!(v["capabilities"]["capacity_bound"], true);
    assert_eq!(v["capabilities"]["max_value_size"], 16 << 20);
}

#[test]
fn check_with_bad_config_fails_naming_the_key() {
    let out = kvpool(&[
        "check",
        "--extra-config",
        r#"{"backend":"memory","lookup_rpc_prot":"0"}"#,
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lookup_rpc_prot"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kvpool.toml");
    std::fs::write(
        &file,
        "backend = \"memory\"\n[memory]\ncapacity = \"lots\"\n",
    )
    .unwrap();
    let out = kvpool(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("capacity") && err.contains("lots"), "{err}");

    let out = kvpool(&["check", "--extra-config", r#"{"backend":"nosuch"}"#]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("registered backends: memory"), "{err}");
}

#[test]
fn store_rejects_malformed_keys() {
    let out = kvpool(&[
        "store",
        "exists",
        "--key",
        "not-a-key",
        "--extra-config",
        MEMORY,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-a-key"));
}

#[test]
fn store_operations_on_a_fresh_memory_pool() {
    // The memory backend lives in the process, so each command sees an empty
    // pool: put stores, exists/get miss, rm succeeds.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value.bin");
    std::fs::write(&file, b"hello kv").unwrap();
    let key = format!(
        "m@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@{}",
        "ab".repeat(32)
    );
    let put = kvpool(&[
        "store",
        "put",
        "--key",
        &key,
        "--file",
        file.to_str().unwrap(),
        "--extra-config",
        MEMORY,
        "--json",
    ]);
    let v = stdout_json(&put);
    assert_eq!(v["outcome"], "stored");
    assert_eq!(v["bytes"], 8);
    let exists = kvpool(&["store", "exists", "--key", &key, "--extra-config", MEMORY]);
    assert_eq!(exists.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&exists.stdout).trim(), "absent");
    let missing = dir.path().join("nope.bin");
    let put = kvpool(&[
        "store",
        "put",
        "--key",
        &key,
        "--file",
        missing.to_str().unwrap(),
        "--extra-config",
        MEMORY,
    ]);
    assert_eq!(put.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&put.stderr).contains("nope.bin"));
}

#[test]
fn replay_reproduces_the_published_hit_ratios() {
    let trace = trace();
    let trace = trace.to_str().unwrap();
    let v = stdout_json(&kvpool(&["replay", trace, "--json"]));
    assert_eq!(v["requests"], 12031);
    assert_eq!(
        format!("{:.3}", v["token_hit_ratio"].as_f64().unwrap()),
        "0.374"
    );
    assert_eq!(v["capacity_blocks"], serde_json::Value::Null);

    let v = stdout_json(&kvpool(&[
        "replay",
        trace,
        "--capacity-tokens",
        "3000000",
        "--policy",
        "lru",
        "--json",
    ]));
    assert_eq!(
        format!("{:.3}", v["token_hit_ratio"].as_f64().unwrap()),
        "0.138"
    );
    assert_eq!(v["capacity_blocks"], 5859);
    assert_eq!(v["policy"], "lru");
    let block = v["block_hit_ratio"].as_f64().unwrap();
    assert!(block > 0.0 && block < 0.138, "{block}");
}

#[test]
fn replay_reports_a_bad_line_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.jsonl");
    std::fs::write(
        &file,
        "{\"input_length\": 10, \"hash_ids\": [1]}\n{\"input_length\": 5}\n",
    )
    .unwrap();
    let out = kvpool(&["replay", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("hash_ids"), "{err}");
}

#[test]
fn demo_verifies_every_loaded_byte_and_hits_shared_prefixes() {
    let v = stdout_json(&kvpool(&[
        "demo",
        "--sessions",
        "4",
        "--turns",
        "3",
        "--capacity",
        "256MiB",
        "--json",
    ]));
    assert_eq!(v["requests"], 12);
    let ratio = v["token_hit_ratio"].as_f64().unwrap();
    // Three of the four first turns reuse the shared system prompt, and every
    // later turn reuses its own history: well over half the tokens hit.
    assert!(ratio > 0.5 && ratio < 1.0, "{ratio}");
    assert_eq!(v["bytes_verified"], v["bytes_loaded"]);
    assert!(v["bytes_loaded"].as_u64().unwrap() > 0);
}

#[test]
fn bench_reports_ratios_against_memcpy() {
    let v = stdout_json(&kvpool(&[
        "bench",
        "--backend",
        "memory",
        "--value-size",
        "64KiB",
        "--batch",
        "4",
        "--seconds",
        "0.05",
        "--exists-keys",
        "100",
        "--extra-config",
        r#"{"memory":{"capacity":"64MB"}}"#,
        "--json",
    ]));
    for field in [
        "put_gbps",
        "get_gbps",
        "memcpy_gbps",
        "get_vs_memcpy",
        "put_vs_memcpy",
        "exists_ops",
    ] {
        let x = v[field]
            .as_f64()
            .unwrap_or_else(|| panic!("{field} missing: {v}"));
        assert!(x > 0.0 && x.is_finite(), "{field} = {x}");
    }
    let ratio = v["get_vs_memcpy"].as_f64().unwrap();
    let expect = v["get_gbps"].as_f64().unwrap() / v["memcpy_gbps"].as_f64().unwrap();
    assert!((ratio - expect).abs() < 1e-9);
    assert_eq!(v["backend"], "memory");
}
