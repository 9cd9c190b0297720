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

/// The factory for `scheme`; an unknown name errors and lists the registered ones.
pub fn factory(scheme: &str) -> Result<&'static BackendFactory> {
    inventory::iter::<BackendFactory>
        .into_iter()
        .find(|f| f.scheme == scheme)
        .ok_or_else(|| {
            let known = registered_schemes();
            let hint = if known.is_empty() {
                "no backend is compiled in; enable a backend feature of the kvpool crate"
                    .to_string()
            } else {
                format!("registered backends: {}", known.join(", "))
            };
            Error::config_invalid(format!("unknown backend {scheme:?}; {hint}"))
                .with_context("key", "backend")
        })
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
