//! Backends registered at compile time, chosen at run time by name.
//!
//! Each backend crate submits one [`BackendFactory`] with
//! `inventory::submit!`, and one [`BackendSection`] for its configuration
//! table. A crate that is a dependency but never referenced is
//! not linked and its registration silently disappears, which is why the
//! `kvpool` facade names every enabled backend crate with `extern crate`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::backend::KvBackend;
use crate::checked::CheckedBackend;
#[cfg(doc)]
use crate::config::BackendSection;
use crate::config::Config;
use crate::error::{Error, Result};

/// The future a factory returns.
pub type OpenFuture = Pin<Box<dyn Future<Output = Result<Arc<dyn KvBackend>>> + Send>>;

/// How to build one backend.
#[derive(Debug)]
pub struct BackendFactory {
    /// The name `"backend": "..."` selects.
    pub scheme: &'static str,
    /// One line for `kvpool check` and error messages.
    pub description: &'static str,
    /// Builds the backend from the whole config; it reads its own section
    /// with [`Config::section`].
    pub open: fn(Config) -> OpenFuture,
}

inventory::collect!(BackendFactory);

/// The schemes of every linked backend, sorted.
pub fn registered_schemes() -> Vec<&'static str> {
    let mut schemes: Vec<_> = inventory::iter::<BackendFactory>
        .into_iter()
        .map(|f| f.scheme)
        .collect();
    schemes.sort_unstable();
    schemes.dedup();
    schemes
}

/// The backends kvpool ships, each behind a feature of the same name in the `kvpool`,
/// `kvpool-cli` and `kvpool-python` crates. A build may leave any of them out (rocksdb-ssd
/// is left out by default), and naming one must then say how to get it rather than call
/// the name unknown.
const SHIPPED_BACKENDS: &[&str] = &[
    "memory",
    "mooncake",
    "object",
    "redis",
    "rocksdb-ssd",
    "tiered",
];

/// The factory for `scheme`; an unknown name errors and lists the registered ones.
pub fn factory(scheme: &str) -> Result<&'static BackendFactory> {
    inventory::iter::<BackendFactory>
        .into_iter()
        .find(|f| f.scheme == scheme)
        .ok_or_else(|| {
            let known = registered_schemes();
            let registered = if known.is_empty() {
                "no backend is compiled in; enable a backend feature of the kvpool crate"
                    .to_string()
            } else {
                format!("registered backends: {}", known.join(", "))
            };
            let message = if SHIPPED_BACKENDS.contains(&scheme) {
                not_compiled_in(scheme, &registered)
            } else {
                format!("unknown backend {scheme:?}; {registered}")
            };
            Error::config_invalid(message).with_context("key", "backend")
        })
}

fn not_compiled_in(scheme: &str, registered: &str) -> String {
    // rocksdb-ssd's wheel links the system librocksdb instead of bundling it: maturin's
    // repair patches the cargo artifact in place, so a second build would fail to find the
    // renamed copy it bundled the first time.
    let (needs, pip_args) = if scheme == "rocksdb-ssd" {
        (
            " (it links the system RocksDB: on Debian/Ubuntu `apt-get install librocksdb-dev \
             clang libclang-dev` first)",
            " --auditwheel skip",
        )
    } else {
        ("", "")
    };
    format!(
        "backend {scheme:?} is not compiled into this build; rebuild with the cargo feature \
         `{scheme}`{needs}: `cargo build --release -p kvpool-cli --features {scheme}` for the \
         kvpool command, `pip install ./connector-py --config-settings=build-args=\"--features \
         {scheme}{pip_args}\"` for the Python package; {registered}"
    )
}

/// Opens the backend `config.backend` names, wrapped in the contract-check and
/// metrics layer.
pub async fn open(config: &Config) -> Result<Arc<dyn KvBackend>> {
    let factory = factory(&config.backend).map_err(|e| e.with_operation("open"))?;
    let backend = (factory.open)(config.clone()).await.map_err(|e| {
        e.with_operation("open")
            .with_context("backend", factory.scheme)
    })?;
    Ok(Arc::new(CheckedBackend::new(backend)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    // kvpool-core's own tests link no backend, so every name is missing here.
    #[test]
    fn a_shipped_backend_left_out_of_the_build_names_its_feature() {
        let err = factory("rocksdb-ssd").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ConfigInvalid);
        let msg = err.to_string();
        assert!(
            msg.contains("\"rocksdb-ssd\" is not compiled into this build"),
            "{msg}"
        );
        assert!(msg.contains("--features rocksdb-ssd"), "{msg}");
        assert!(msg.contains("librocksdb-dev"), "{msg}");
    }

    #[test]
    fn an_unknown_backend_is_called_unknown() {
        let msg = factory("nosuch").unwrap_err().to_string();
        assert!(msg.contains("unknown backend \"nosuch\""), "{msg}");
        assert!(!msg.contains("--features"), "{msg}");
    }
}
