//! Credentials hidden from a printed configuration (`kvpool check`, `Config::to_json`).

/// Whether a key names a credential. Errs on the side of hiding: a printed config is pasted
/// into issues and chat.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "access_key",
        "key_id",
        "sas",
    ]
    .iter()
    .any(|w| key == *w || key.contains(w))
        || key.ends_with("_key")
}

/// `scheme://user:password@host/...` with the password masked.
fn redact_url(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (userinfo, host) = rest[..authority_end].rsplit_once('@')?;
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    Some(format!(
        "{scheme}://{user}:***@{host}{}",
        &rest[authority_end..]
    ))
}

pub(super) fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                // Free-form store options (`object.options`) may hold any credential.
                let secret = is_secret_key(key) || key.eq_ignore_ascii_case("options");
                match v {
                    serde_json::Value::String(s) if secret && !s.is_empty() => *s = "***".into(),
                    serde_json::Value::Object(inner) if secret => {
                        for v in inner.values_mut() {
                            if let serde_json::Value::String(s) = v {
                                *s = "***".into();
                            } else {
                                redact(v);
                            }
                        }
                    }
                    _ => redact(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        serde_json::Value::String(s) => {
            if let Some(masked) = redact_url(s) {
                *s = masked;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn printed_configs_hide_every_credential() {
        let mut v = json!({
            "object": {"url": "s3://b/p", "access_key_id": "AKIA123", "secret_access_key": "s3cr3t",
                       "session_token": "tok", "options": {"azure_storage_sas_key": "sig"}},
            "redis": {"url": "redis://alice:hunter2@127.0.0.1:6379/0", "password": "pw",
                      "username": "alice"},
            "tiered": {"tiers": [{"redis": {"cluster_nodes": ["redis://:pw2@h:1"]}}]},
        });
        redact(&mut v);
        let text = v.to_string();
        for secret in [
            "AKIA123", "s3cr3t", "tok\"", "sig", "hunter2", "\"pw\"", "pw2",
        ] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
        assert!(
            text.contains("redis://alice:***@127.0.0.1:6379/0"),
            "{text}"
        );
        assert!(text.contains("\"username\":\"alice\""), "{text}");
        assert!(text.contains("s3://b/p"), "{text}");
    }
}
