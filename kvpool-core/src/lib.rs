//! kvpool-core: the storage contract every kvpool backend and front end share.
//!
//! It holds no runtime, network, HTTP, trace replay or tiering: those live in
//! kvpool-connector, the backend crates and kvpool-cli, so a backend depends on
//! this crate alone.
//!
//! - [`key`]: block hashes, namespaces and keys, with the vllm-ascend string form.
//! - [`hash`]: block hashing — our deterministic token chain and vLLM's own.
//! - [`backend`]: the [`KvBackend`] trait, its outcomes and capabilities.
//! - [`batch`]: per-key bookkeeping of a batch: outcomes by index, repeated keys, value sizes.
//! - [`buffer`]: registered memory regions and gather/scatter descriptors.
//! - [`registry`]: backends registered at compile time, chosen at run time.
//! - [`config`]: layered configuration.
//! - [`eviction`]: eviction policies, watermark semantics and the sharded index
//!   capacity-bound backends evict from.
//! - [`metrics`]: Prometheus metrics.
//! - [`frame`]: the checksummed form of values in stores kvpool does not control.
//! - [`checked`]: the layer every opened backend is wrapped in: contract checks and metrics.
//! - [`error`]: errors with a kind, a retry status and context.
//! - [`size`]: byte sizes as users write them in config ("4GB").

pub mod backend;
pub mod batch;
pub mod buffer;
pub mod checked;
pub mod config;
pub mod error;
pub mod eviction;
pub mod frame;
pub mod hash;
pub mod key;
pub mod metrics;
pub mod registry;
pub mod size;

pub use backend::{
    BackendInfo, Capabilities, ClearScope, GetOutcome, KvBackend, KvBackendExt, PutOutcome,
};
pub use buffer::{IoVec, IoVecMut, MemRegion};
pub use config::Config;
pub use error::{Error, ErrorKind, ErrorStatus, Result};
pub use key::{BlockHash, BlockKey, Namespace};
pub use registry::{open, registered_schemes, BackendFactory};
