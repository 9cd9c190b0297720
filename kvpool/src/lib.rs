//! kvpool: a KV-cache pool for LLM inference.
//!
//! It stores the attention KV of full token blocks under keys derived from
//! the tokens, so any inference instance can reuse a prefix computed
//! anywhere. Backends are chosen at run time by `"backend": "..."`:
//!
//! ```no_run
//! # async fn demo() -> kvpool::Result<()> {
//! let config = kvpool::Config::from_extra_config(serde_json::json!({
//!     "backend": "memory",
//!     "memory": { "capacity": "1GB" }
//! }))?;
//! let pool = kvpool::open(&config).await?;
//! println!("{}", pool.info());
//! # Ok(()) }
//! ```
//!
//! This crate is the library facade only: it re-exports [`kvpool_core`] (the
//! storage contract) and links one crate per enabled backend feature. The
//! vLLM connector lives in `kvpool-connector`, the `kvpool` binary in
//! `kvpool-cli`.

pub use kvpool_core::*;

/// Backend crates, by scheme.
///
/// Naming each enabled backend crate here is what links it: a crate that is
/// only a dependency is never referenced, so its `inventory` registration
/// would silently disappear.
pub mod backends {
    #[cfg(feature = "memory")]
    pub use ::kvpool_backend_memory as memory;
    #[cfg(feature = "mooncake")]
    pub use ::kvpool_backend_mooncake as mooncake;
    #[cfg(feature = "object")]
    pub use ::kvpool_backend_object as object;
    #[cfg(feature = "redis")]
    pub use ::kvpool_backend_redis as redis;
    #[cfg(feature = "rocksdb-ssd")]
    pub use ::kvpool_backend_rocksdb_ssd as rocksdb_ssd;
    #[cfg(feature = "tiered")]
    pub use ::kvpool_backend_tiered as tiered;
}

/// The schemes of the backend features this build enables.
pub const ENABLED_BACKENDS: &[&str] = &[
    #[cfg(feature = "memory")]
    "memory",
    #[cfg(feature = "mooncake")]
    "mooncake",
    #[cfg(feature = "object")]
    "object",
    #[cfg(feature = "redis")]
    "redis",
    #[cfg(feature = "rocksdb-ssd")]
    "rocksdb-ssd",
    #[cfg(feature = "tiered")]
    "tiered",
];
