//! The storage contract every backend implements.
//!
//! Each promise below is a case of the conformance suite (crate
//! `kvpool-conformance`); a backend skips a case only when its
//! [`Capabilities`] exclude it.
//!
//! General rules:
//! - Batch first: every data operation takes many keys, and results come back
//!   in the order of the input.
//! - An outer `Err` means the whole call failed (backend closed, server down);
//!   per-key trouble is an outcome. A miss is a value, never an error.
//! - Keys are content-derived: a key names one value forever, so a `put` of a
//!   key that is present keeps the stored value and reports
//!   [`PutOutcome::Exists`].
//! - A value is at least one byte and at most `max_value_size`.

use std::fmt::{self, Debug};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;

use crate::buffer::{IoVec, IoVecMut, MemRegion};
use crate::error::{Error, ErrorKind, Result};
use crate::key::BlockKey;

/// What a backend can do; the conformance suite and the check layer read it.
///
/// Not `#[non_exhaustive]`, so backend crates can build it with
/// `Capabilities { shared: true, ..Default::default() }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Other processes or hosts see the same objects.
    pub shared: bool,
    /// Objects survive a restart of the backend.
    pub persistent: bool,
    /// `remove` deletes objects (otherwise it is a no-op that returns `Ok`).
    pub remove: bool,
    /// Memory must be registered with [`KvBackend::register`] before use.
    pub requires_registration: bool,
    /// The backend holds a bounded number of bytes and evicts to stay under it.
    pub capacity_bound: bool,
    /// The largest batch one call may carry; larger batches are rejected.
    pub max_batch: Option<usize>,
    /// The largest value in bytes.
    pub max_value_size: Option<usize>,
    /// [`KvBackend::exists_for_load`] keeps what it finds loadable for the hold, eviction
    /// notwithstanding (otherwise it is at best a hint, such as a refreshed LRU position).
    pub holds_for_load: bool,
}

/// A backend's identity.
#[derive(Debug, Clone, Serialize)]
pub struct BackendInfo {
    /// The scheme it is registered under (`"memory"`, `"redis"`, ...).
    pub scheme: &'static str,
    /// A short human description of this instance (address, capacity).
    pub description: String,
    /// What it can do.
    pub capabilities: Capabilities,
}

/// The result of storing one key.
#[derive(Debug)]
pub enum PutOutcome {
    /// The value is now stored.
    Stored,
    /// The key was already present; the stored value is unchanged.
    Exists,
    /// This key failed; the others in the batch are unaffected. Nothing of
    /// this key was stored.
    Failed(Error),
}

impl PutOutcome {
    /// Whether the key is present after the call.
    pub fn is_present(&self) -> bool {
        matches!(self, PutOutcome::Stored | PutOutcome::Exists)
    }
}

/// The result of loading one key.
#[derive(Debug)]
pub enum GetOutcome {
    /// The whole value was written into the destination.
    Hit,
    /// The key is absent; the destination is untouched.
    Miss,
    /// This key failed; the destination may only be trusted for other keys.
    /// A length mismatch is [`ErrorKind::InvalidArgument`] and writes nothing.
    Failed(Error),
}

impl GetOutcome {
    /// Whether the destination now holds the value.
    pub fn is_hit(&self) -> bool {
        matches!(self, GetOutcome::Hit)
    }
}

/// The hold a lookup asks of [`KvBackend::exists_for_load`]: its load comes one engine step
/// later (milliseconds to a few hundred), or a few steps when the request waits for device
/// blocks; two seconds covers that with room, and bounds what holds can pin.
pub const DEFAULT_LOAD_HOLD: Duration = Duration::from_secs(2);

/// A KV block store.
///
/// Object-safe: kvpool holds backends as `Arc<dyn KvBackend>`.
#[async_trait]
pub trait KvBackend: Send + Sync + Debug + 'static {
    /// Scheme, description and capabilities.
    fn info(&self) -> &BackendInfo;

    /// Makes `region` usable as a source or destination.
    ///
    /// Backends with `requires_registration` refuse descriptors over
    /// unregistered memory; others accept any region and return `Ok`.
    async fn register(&self, region: &Arc<MemRegion>) -> Result<()> {
        let _ = region;
        Ok(())
    }

    /// For each key, whether it is present.
    async fn exists(&self, keys: &[BlockKey]) -> Result<Vec<bool>>;

    /// For each key, whether it is present, as [`exists`](Self::exists) answers, for a caller
    /// that will load the present keys soon: a lookup whose hit is loaded one engine step
    /// later. Between the two, a capacity-bound store keeps evicting, and a block that was
    /// promised and is gone at load time must be recomputed.
    ///
    /// With [`Capabilities::holds_for_load`], every key answered `true` stays loadable by
    /// [`get_into`](Self::get_into) until `hold` has passed, even if eviction picks it
    /// meanwhile; [`remove`](Self::remove) and [`clear`](Self::clear) still delete it. The
    /// hold is bounded: it ends at its deadline (a backend whose store fixes the length, or
    /// caps it, says so), and what a `put` meets when only held keys could make room is the
    /// backend's to document. Without the capability the hold is a hint (say, the keys move to
    /// the recent end of an LRU).
    /// A `hold` of zero asks for nothing beyond `exists`.
    ///
    /// The default is [`exists`](Self::exists).
    async fn exists_for_load(&self, keys: &[BlockKey], hold: Duration) -> Result<Vec<bool>> {
        let _ = hold;
        self.exists(keys).await
    }

    /// For each key, the length of its value, or `None` when absent.
    async fn value_lens(&self, keys: &[BlockKey]) -> Result<Vec<Option<usize>>>;

    /// Stores each value, gathered from its descriptor.
    ///
    /// Present keys keep their value ([`PutOutcome::Exists`]); an invalid
    /// descriptor (empty, over `max_value_size`) fails that key only.
    async fn put(&self, items: Vec<(BlockKey, IoVec)>) -> Result<Vec<PutOutcome>>;

    /// Loads each value, scattered into its descriptor.
    ///
    /// The descriptor's length must equal the stored value's; otherwise that
    /// key fails with InvalidArgument and its destination is untouched.
    async fn get_into(&self, items: Vec<(BlockKey, IoVecMut)>) -> Result<Vec<GetOutcome>>;

    /// Deletes the keys; absent keys are not an error.
    async fn remove(&self, keys: &[BlockKey]) -> Result<()>;

    /// Deletes the objects in `scope`, for a reset of the engine's prefix cache (vLLM's
    /// `reset_cache`); returns whether anything was in scope. [`ClearScope::Local`] leaves a
    /// shared store alone (`Ok(false)`) and clears what only this process sees;
    /// [`ClearScope::All`] clears a shared store for every instance. Keys put while it runs
    /// may or may not survive it.
    ///
    /// The default clears nothing locally for a shared backend and is `Unsupported`
    /// otherwise.
    async fn clear(&self, scope: ClearScope) -> Result<bool> {
        if scope == ClearScope::Local && self.info().capabilities.shared {
            return Ok(false);
        }
        Err(Error::new(
            ErrorKind::Unsupported,
            format!("the {} backend cannot be cleared", self.info().scheme),
        ))
    }

    /// Releases resources. Every later call fails with [`ErrorKind::Closed`];
    /// closing twice is `Ok`.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// What [`KvBackend::clear`] deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearScope {
    /// Objects no other process sees: a memory backend, a local disk, a tiered backend's
    /// local tiers.
    Local,
    /// Every object, whichever instance stored it.
    All,
}

/// Convenience operations over owned bytes, for tests and tools. The data
/// path uses [`KvBackend::put`] and [`KvBackend::get_into`] directly.
#[async_trait]
pub trait KvBackendExt: KvBackend {
    /// Stores one value from bytes.
    async fn put_bytes(&self, key: BlockKey, value: Bytes) -> Result<PutOutcome> {
        let region = MemRegion::from_vec(value.to_vec());
        self.register(&region).await?;
        let mut out = self.put(vec![(key, IoVec::whole(&region))]).await?;
        single(&mut out, "put")
    }

    /// Loads one value into new bytes; `None` when absent.
    async fn get_bytes(&self, key: &BlockKey) -> Result<Option<Bytes>> {
        let Some(len) = self
            .value_lens(std::slice::from_ref(key))
            .await?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let region = MemRegion::alloc(len);
        self.register(&region).await?;
        let mut out = self
            .get_into(vec![(key.clone(), IoVecMut::whole(&region))])
            .await?;
        match single(&mut out, "get_into")? {
            GetOutcome::Hit => Ok(Some(Bytes::from(region.read(0, len)?))),
            // Removed or evicted between the two calls.
            GetOutcome::Miss => Ok(None),
            GetOutcome::Failed(e) => Err(e),
        }
    }
}

impl<T: KvBackend + ?Sized> KvBackendExt for T {}

fn single<T>(out: &mut Vec<T>, op: &'static str) -> Result<T> {
    if out.len() != 1 {
        return Err(Error::new(
            ErrorKind::Unexpected,
            format!("backend answered {} outcomes for one key", out.len()),
        )
        .with_operation(op));
    }
    Ok(out.pop().expect("length checked"))
}

impl fmt::Display for BackendInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.scheme, self.description)
    }
}
