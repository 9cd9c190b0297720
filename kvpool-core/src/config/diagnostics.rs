//! Configuration errors as users read them: one line that names the full dotted key, where
//! its value came from, and the key that was probably meant.

use std::collections::BTreeSet;

use figment::value::Value;
use figment::{Figment, Metadata, Profile, Source};

use super::connector::CONNECTOR_KEYS;
use super::layers::{ENVIRONMENT, ENV_PREFIX};
use crate::error::Error;

pub(super) fn unknown_keys_error(
    unknown: &[(String, String)],
    sections: &BTreeSet<String>,
) -> Error {
    let mut known: Vec<&str> = vec!["backend", "hash_mode"];
    known.extend_from_slice(CONNECTOR_KEYS);
    let candidates: Vec<&str> = known
        .iter()
        .copied()
        .chain(std::iter::once("mooncake_rpc_port"))
        .chain(sections.iter().map(String::as_str))
        .collect();
    let listed: Vec<String> = unknown
        .iter()
        .map(|(key, origin)| {
            let hint = closest(key, &candidates)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!("`{key}` in {origin}{hint}")
        })
        .collect();
    let plural = if unknown.len() == 1 { "key" } else { "keys" };
    let mut tables: Vec<&str> = sections.iter().map(String::as_str).collect();
    if tables.is_empty() {
        tables.push("(none registered)");
    }
    Error::config_invalid(format!(
        "unknown {plural} {}; known keys: {}; backend tables: {}",
        listed.join(", "),
        known.join(", "),
        tables.join(", ")
    ))
}

/// The candidate within a small edit distance of `key`, for "did you mean".
fn closest<'a>(key: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(key, c), *c))
        .filter(|&(d, c)| d > 0 && d <= 2.max(c.len() / 4))
        .min()
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// Where the value at `path` (from the root) came from, e.g. "environment variable
/// KVPOOL_LOOKUP_RPC_PORT" or "config file `/etc/kvpool.toml`".
pub(super) fn origin_of(figment: &Figment, path: &[&str]) -> String {
    let key = path.join(".");
    let Some(metadata) = figment.find_metadata(&key) else {
        return "the configuration".into();
    };
    let described = describe(metadata, path);
    // A table from the environment is many variables, none named exactly like the table.
    let is_table = matches!(figment.find_value(&key), Ok(Value::Dict(..)));
    match described.strip_prefix("environment variable ") {
        Some(name) if is_table && name.starts_with(ENV_PREFIX) => {
            format!("environment variables {name}__*")
        }
        _ => described,
    }
}

pub(super) fn describe(metadata: &Metadata, path: &[&str]) -> String {
    if metadata.name == ENVIRONMENT && !path.is_empty() {
        return format!(
            "environment variable {}",
            metadata.interpolate(&Profile::Default, path)
        );
    }
    match &metadata.source {
        Some(Source::File(file)) => format!("{} `{}`", metadata.name, file.display()),
        _ => metadata.name.to_string(),
    }
}

/// Turns figment's error into ours: one line, the full dotted key, and its source.
/// `prefix` is the path of the table `err`'s paths are relative to.
pub(super) fn figment_error(err: figment::Error, root: &Figment, prefix: &[&str]) -> Error {
    use figment::error::Kind;

    let more = err.count() - 1;
    let mut path: Vec<&str> = prefix.to_vec();
    path.extend(err.path.iter().map(String::as_str));
    // figment puts the offending key on the path itself; older versions did not.
    if let Kind::UnknownField(field, _) = &err.kind {
        if path.last() != Some(&field.as_str()) {
            path.push(field);
        }
    }
    let key = path.join(".");
    let origin = root
        .find_metadata(&key)
        .map(|m| describe(m, &path))
        .or_else(|| err.metadata.as_ref().map(|m| describe(m, &path)))
        .unwrap_or_else(|| "the configuration".into());

    let mut message = match &err.kind {
        Kind::UnknownField(_, expected) => {
            let hint = closest(path.last().copied().unwrap_or(""), expected)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!(
                "unknown key `{key}` in {origin}{hint}; known keys: {}",
                expected.join(", ")
            )
        }
        Kind::MissingField(field) => {
            let mut full = prefix.to_vec();
            full.extend(err.path.iter().map(String::as_str));
            full.push(field);
            format!("missing required key `{}`", full.join("."))
        }
        Kind::InvalidType(actual, expected) => {
            format!("invalid type for `{key}` in {origin}: found {actual}, expected {expected}")
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value for `{key}` in {origin}: found {actual}, expected {expected}")
        }
        Kind::UnknownVariant(found, expected) => format!(
            "invalid value for `{key}` in {origin}: found `{found}`, expected one of: {}",
            expected.join(", ")
        ),
        other if key.is_empty() => format!("invalid configuration in {origin}: {other}"),
        other => format!("invalid value for `{key}` in {origin}: {other}"),
    };
    if more > 0 {
        message.push_str(&format!(" (and {more} more errors)"));
    }
    Error::config_invalid(one_line(&message))
}

pub(super) fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::testing::{config_err, extra, file_with, with_env};

    #[test]
    fn unknown_key_names_key_source_and_suggestion() {
        let msg = config_err(extra(json!({"lookup_rpc_prot": "0"})));
        assert!(msg.contains("unknown key `lookup_rpc_prot`"), "{msg}");
        assert!(msg.contains("in kv_connector_extra_config"), "{msg}");
        assert!(msg.contains("did you mean `lookup_rpc_port`"), "{msg}");
        assert!(
            msg.contains("known keys: backend, hash_mode, lookup_rpc_port"),
            "{msg}"
        );

        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "k.toml", "[memroy]\ncapacity = \"1GB\"\n");
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains("`memroy`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("did you mean `memory`"), "{msg}");

        let msg = config_err(with_env(None, None, &[("KVPOOL_LOAD_ASYNCH", "1")]));
        assert!(msg.contains("`load_asynch`"), "{msg}");
        assert!(
            msg.contains("environment variable KVPOOL_LOAD_ASYNCH"),
            "{msg}"
        );

        let msg = config_err(with_env(None, None, &[("KVPOOL_MEMROY__CAPACITY", "1GB")]));
        assert!(msg.contains("`memroy`"), "{msg}");
        assert!(
            msg.contains("environment variables KVPOOL_MEMROY__*"),
            "{msg}"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        let msg = config_err(extra(json!({"lookup_rpc_port": "abc"})));
        assert!(msg.contains("`lookup_rpc_port`"), "{msg}");
        assert!(msg.contains("kv_connector_extra_config"), "{msg}");
        assert!(msg.contains("\"abc\""), "{msg}");

        let msg = config_err(extra(json!({"load_async": "maybe"})));
        assert!(msg.contains("`load_async`"), "{msg}");

        let msg = config_err(extra(json!({"hash_mode": "sha"})));
        assert!(msg.contains("`hash_mode`") && msg.contains("vllm"), "{msg}");
        let msg = config_err(extra(json!({"hash_mode": 1})));
        assert!(msg.contains("`hash_mode`"), "{msg}");

        let msg = config_err(extra(json!({"backend": 7})));
        assert!(msg.contains("`backend`"), "{msg}");

        let msg = config_err(extra(json!({"memory": 5})));
        assert!(msg.contains("`memory`") && msg.contains("table"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let path = file_with(&dir, "t.toml", "prefill_pp_size = -1\n");
        let msg = config_err(with_env(Some(&path), None, &[]));
        assert!(msg.contains("`prefill_pp_size`"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");

        let msg = config_err(with_env(
            None,
            None,
            &[("KVPOOL_USE_LAYERWISE", "sometimes")],
        ));
        assert!(msg.contains("KVPOOL_USE_LAYERWISE"), "{msg}");
    }
}
