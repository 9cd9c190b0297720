//! Prometheus metrics for every backend operation.
//!
//! One process-wide registry, as Prometheus clients usually have: the
//! connector, the CLI and a scrape endpoint all read [`global`]. Every backend
//! opened through [`crate::registry::open`] is wrapped in a layer that records
//! into it, so backends do not instrument themselves.

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of per-call series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// Backend scheme.
    pub backend: &'static str,
    /// `exists`, `put`, `get`, `remove`, `value_lens`.
    pub op: &'static str,
}

/// Labels of per-key series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// Backend scheme.
    pub backend: &'static str,
    /// The operation.
    pub op: &'static str,
    /// `hit`, `miss`, `stored`, `exists`, `present`, `absent`, `failed`.
    pub outcome: &'static str,
}

/// Labels of error series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Backend scheme.
    pub backend: &'static str,
    /// The operation.
    pub op: &'static str,
    /// The error kind, as [`crate::ErrorKind::as_str`] spells it.
    pub kind: &'static str,
}

/// The metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Calls, by operation.
    pub calls: Family<OpLabels, Counter>,
    /// Keys, by operation and outcome (hits and misses are `op="get"`).
    pub keys: Family<KeyLabels, Counter>,
    /// Value bytes moved, by operation.
    pub bytes: Family<OpLabels, Counter>,
    /// Errors, whole-call and per-key, by kind.
    pub errors: Family<ErrorLabels, Counter>,
    /// Call latency in seconds.
    pub latency: Family<OpLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of families in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kvpool");
        let calls = Family::<OpLabels, Counter>::default();
        let keys = Family::<KeyLabels, Counter>::default();
        let bytes = Family::<OpLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        // 1 µs .. ~16 s, doubling: covers a cached 4 KiB exists and a cold 16 MiB remote get.
        let latency = Family::<OpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(1e-6, 2.0, 25))
        });
        registry.register("calls", "Backend calls", calls.clone());
        registry.register("keys", "Keys processed, by outcome", keys.clone());
        registry.register("value_bytes", "Value bytes stored or loaded", bytes.clone());
        registry.register("errors", "Errors, by kind", errors.clone());
        registry.register(
            "call_duration_seconds",
            "Backend call latency",
            latency.clone(),
        );
        Metrics {
            registry,
            calls,
            keys,
            bytes,
            errors,
            latency,
        }
    }

    /// Records one finished call.
    pub fn observe_call(&self, backend: &'static str, op: &'static str, elapsed: Duration) {
        let labels = OpLabels { backend, op };
        self.calls.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// Adds `n` keys with `outcome`.
    pub fn add_keys(&self, backend: &'static str, op: &'static str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.keys
                .get_or_create(&KeyLabels {
                    backend,
                    op,
                    outcome,
                })
                .inc_by(n);
        }
    }

    /// Adds `n` value bytes moved by `op`.
    pub fn add_bytes(&self, backend: &'static str, op: &'static str, n: u64) {
        if n > 0 {
            self.bytes
                .get_or_create(&OpLabels { backend, op })
                .inc_by(n);
        }
    }

    /// Counts one error.
    pub fn add_error(&self, backend: &'static str, op: &'static str, kind: crate::ErrorKind) {
        self.errors
            .get_or_create(&ErrorLabels {
                backend,
                op,
                kind: kind.as_str(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    static GLOBAL: OnceLock<Metrics> = OnceLock::new();
    GLOBAL.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_carries_counts_and_labels() {
        let m = Metrics::new();
        m.observe_call("memory", "get", Duration::from_micros(3));
        m.add_keys("memory", "get", "hit", 5);
        m.add_keys("memory", "get", "miss", 2);
        m.add_bytes("memory", "get", 4096);
        m.add_error("memory", "put", crate::ErrorKind::NoSpace);
        let text = m.encode();
        assert!(
            text.contains(r#"kvpool_keys_total{backend="memory",op="get",outcome="hit"} 5"#),
            "{text}"
        );
        assert!(text.contains(r#"kvpool_keys_total{backend="memory",op="get",outcome="miss"} 2"#));
        assert!(text.contains(r#"kvpool_value_bytes_total{backend="memory",op="get"} 4096"#));
        assert!(
            text.contains(r#"kvpool_errors_total{backend="memory",op="put",kind="no_space"} 1"#)
        );
        assert!(text.contains(r#"kvpool_call_duration_seconds_count{backend="memory",op="get"} 1"#));
        assert!(text.ends_with("# EOF\n"));
    }
}
