//! The cross-check against Python: vLLM's hashes recomputed by the local
//! `python3` (its real `pickle.dumps`) on inputs that reach every encoding edge.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::test_support::{bs, none, range};
use super::{
    none_hash, vllm_block_hashes, vllm_hash_block_tokens, VllmHashAlgo, DEFAULT_NONE_HASH_SEED,
};
use crate::key::BlockHash;

/// Python side of the cross-check: `sha256` is hashed from the real
/// `pickle.dumps`; `sha256_cbor` from a small canonical encoder written
/// from RFC 8949, since the standard library has no CBOR. Strings come
/// from `json.loads`, so their object identity (which pickle's memo
/// follows) is what a request's decoded fields have.
const PYTHON_CHECK: &str = r#"
import hashlib, json, pickle, sys

def pickle_fn(obj):
    return hashlib.sha256(pickle.dumps(obj, protocol=5)).digest()

def cbor_head(out, major, n):
    if n < 24:
        out.append(major << 5 | n)
    elif n < 1 << 8:
        out += bytes([major << 5 | 24, n])
    elif n < 1 << 16:
        out.append(major << 5 | 25); out += n.to_bytes(2, "big")
    elif n < 1 << 32:
        out.append(major << 5 | 26); out += n.to_bytes(4, "big")
    else:
        out.append(major << 5 | 27); out += n.to_bytes(8, "big")

def cbor(out, v):
    if v is None:
        out.append(0xF6)
    elif isinstance(v, int):
        assert v >= 0; cbor_head(out, 0, v)
    elif isinstance(v, bytes):
        cbor_head(out, 2, len(v)); out += v
    elif isinstance(v, str):
        b = v.encode("utf-8"); cbor_head(out, 3, len(b)); out += b
    elif isinstance(v, tuple):
        cbor_head(out, 4, len(v))
        for x in v:
            cbor(out, x)
    else:
        raise TypeError(type(v))

def cbor_fn(obj):
    out = bytearray(); cbor(out, obj)
    return hashlib.sha256(bytes(out)).digest()

def chain(fn, c):
    none_hash = fn(c["seed"])
    tokens, bs, lora, salt = c["tokens"], c["block_size"], c["lora"], c["salt"]
    parent, out = None, []
    for start in range(0, len(tokens) - bs + 1, bs):
        keys = ([lora] if lora is not None else []) + ([salt] if start == 0 and salt else [])
        h = fn((parent or none_hash, tuple(tokens[start:start + bs]), tuple(keys) if keys else None))
        out.append(h.hex()); parent = h
    return out

data = json.loads(sys.stdin.buffer.read().decode("utf-8"))
result = {}
for name, fn in (("sha256", pickle_fn), ("sha256_cbor", cbor_fn)):
    result[name] = {
        "seeds": [fn(s).hex() for s in data["seeds"]],
        "blocks": [
            fn((bytes.fromhex(b["parent"]), tuple(b["tokens"]),
                None if b["extra"] is None else tuple(b["extra"]))).hex()
            for b in data["blocks"]
        ],
        "chains": [chain(fn, c) for c in data["chains"]],
    }
json.dump(result, sys.stdout)
"#;

/// Token values that hit every pickle and CBOR integer width, in a
/// deterministic order so frame boundaries fall mid-sequence.
fn mixed_tokens(n: usize, mut state: u64) -> Vec<u32> {
    const EDGES: [u32; 14] = [
        0, 1, 23, 24, 255, 256, 65535, 65536, 2147483647, 2147483648, 4294967295, 70000, 300, 5,
    ];
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let r = (state >> 33) as u32;
            // One token in three is an edge value.
            match r % 3 {
                0 => EDGES[(r / 3) as usize % EDGES.len()],
                _ => r,
            }
        })
        .collect()
}

#[test]
fn vllm_hashes_match_python() {
    let parent = none_hash(VllmHashAlgo::Sha256, DEFAULT_NONE_HASH_SEED);
    let mut blocks: Vec<(Vec<u32>, Option<Vec<String>>)> = Vec::new();
    for n in [0, 1, 2, 3, 4, 127, 128, 255, 256, 65535, 65536, 100_000] {
        blocks.push((mixed_tokens(n, n as u64), None));
    }
    let edges = vec![
        255, 256, 65535, 65536, 2147483647, 2147483648, 4294967295, 0, 1,
    ];
    blocks.push((edges.clone(), None));
    blocks.push((vec![7; 100], None));
    blocks.push((vec![u32::MAX; 40_000], None));
    blocks.push((vec![300; 40_000], None));
    let strings = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let many: Vec<String> = (0..300)
        .map(|i| format!("k{i}"))
        .chain(["a".to_string(), "a".to_string()])
        .collect();
    for extra in [
        strings(&["my-lora"]),
        strings(&["my-lora", "tenant-salt"]),
        strings(&["same", "same"]),
        strings(&["a", "a"]),
        strings(&["", ""]),
        strings(&["\u{e9}", "\u{e9}"]),
        strings(&["\u{100}", "\u{100}"]),
        strings(&["日本語-lora"]),
        strings(&["a", "b", "c", "a"]),
        strings(&[]),
        Some(vec!["L".repeat(300)]),
        Some(vec!["L".repeat(70_000), "s".to_string()]),
        // Payloads of 64 KiB and more are written outside any frame.
        Some(vec!["M".repeat(65_535), "N".repeat(65_536)]),
        Some(many),
    ] {
        blocks.push((range(0, 16), extra.clone()));
        blocks.push((edges.clone(), extra.clone()));
        blocks.push((mixed_tokens(65536, 7), extra));
    }
    let seeds: Vec<String> = [
        "0",
        DEFAULT_NONE_HASH_SEED,
        "",
        "\u{e9}",
        "random",
        "4294967295",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([300, 65_535, 65_536, 70_000].map(|n| "y".repeat(n)))
    .collect();
    let chain_tokens = mixed_tokens(100, 99);
    let chains = [
        ("0", 16, None, None),
        (DEFAULT_NONE_HASH_SEED, 16, Some("my-lora"), None),
        (DEFAULT_NONE_HASH_SEED, 16, None, Some("tenant")),
        ("0", 7, Some("my-lora"), Some("tenant")),
        ("0", 16, Some("a"), Some("a")),
        ("0", 16, Some("same"), Some("same")),
        ("0", 16, Some(""), Some("")),
        ("0", 1, None, Some("s")),
        ("0", 100, None, None),
        ("0", 101, None, None),
    ];

    let input = json!({
        "seeds": seeds,
        "blocks": blocks.iter().map(|(tokens, extra)| json!({
            "parent": parent.to_hex(), "tokens": tokens, "extra": extra,
        })).collect::<Vec<_>>(),
        "chains": chains.iter().map(|(seed, bs, lora, salt)| json!({
            "seed": seed, "tokens": chain_tokens, "block_size": bs,
            "lora": lora, "salt": salt,
        })).collect::<Vec<_>>(),
    });
    let python = run_python(PYTHON_CHECK, &input.to_string());

    for algo in VllmHashAlgo::ALL {
        let want = &python[algo.as_str()];
        let hexes = |v: &Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap().to_string())
                .collect()
        };
        for (seed, want) in seeds.iter().zip(hexes(&want["seeds"])) {
            assert_eq!(
                none(algo, seed),
                want,
                "{algo} seed of {} chars",
                seed.len()
            );
        }
        for ((tokens, extra), want) in blocks.iter().zip(hexes(&want["blocks"])) {
            let keys: Option<Vec<&str>> = extra
                .as_ref()
                .map(|k| k.iter().map(String::as_str).collect());
            let got = vllm_hash_block_tokens(algo, &parent, tokens, keys.as_deref());
            assert_eq!(
                got.to_hex(),
                want,
                "{algo}: {} tokens, extra keys {:?}",
                tokens.len(),
                keys.map(|k| k.iter().map(|s| s.len()).collect::<Vec<_>>())
            );
        }
        let want_chains = want["chains"].as_array().unwrap();
        for (&(seed, block, lora, salt), want) in chains.iter().zip(want_chains) {
            let got: Vec<String> =
                vllm_block_hashes(algo, seed, &chain_tokens, bs(block), lora, salt)
                    .iter()
                    .map(BlockHash::to_hex)
                    .collect();
            assert_eq!(
                got,
                hexes(want),
                "{algo}: chain {seed:?} {block} {lora:?} {salt:?}"
            );
        }
    }
}

/// Runs `script` under `python3`. A missing interpreter fails the test:
/// the cross-check is the only evidence that the pickle bytes are exact.
fn run_python(script: &str, stdin: &str) -> Value {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("python3 is required for this cross-check: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_string();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let output = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        output.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}
