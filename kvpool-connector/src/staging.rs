//! Pinned host memory that device KV passes through on its way to and from a backend.
//!
//! One region, allocated and pinned once at registration, registered with the backend like a
//! KV cache, cut into slots of one block's value each. A slot is held from the moment a copy
//! into it is submitted until the copy out of it has completed (save: the backend's `put`
//! returned; load: the copy to the device is fenced), so a slot is never reused in flight. The
//! slot count bounds the memory whatever the step asks for: a step that needs more waits.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use kvpool_core::buffer::{IoVec, IoVecMut, MemRegion};
use kvpool_core::error::{Error, Result};

use crate::device::CopyEngine;

/// Byte written over a released slot in debug builds, so a read of a slot nobody holds shows.
const POISON: u8 = 0xA5;

#[derive(Debug)]
pub(crate) struct Staging {
    region: Arc<MemRegion>,
    slot_len: usize,
    slots: usize,
    free: Mutex<Vec<usize>>,
    permits: Arc<Semaphore>,
    engine: Arc<dyn CopyEngine>,
}

impl Staging {
    /// Pins `budget` bytes (rounded down to whole slots of `slot_len`) with `engine`.
    ///
    /// # Errors
    /// `ConfigInvalid` when `budget` holds fewer than two slots: copies and backend transfers
    /// could then not overlap. The engine's pinning errors.
    pub(crate) fn new(engine: Arc<dyn CopyEngine>, slot_len: usize, budget: u64) -> Result<Self> {
        let slots = usize::try_from(budget).unwrap_or(usize::MAX) / slot_len.max(1);
        if slots < 2 {
            return Err(Error::config_invalid(format!(
                "`device_staging_bytes` ({budget} bytes) must hold at least two blocks' KV \
                 ({slot_len} bytes each on this rank); raise it to {} or more",
                2 * slot_len
            )));
        }
        let region = MemRegion::alloc(slots * slot_len);
        // SAFETY: `region` is owned here and unpinned in `drop`, before it can be freed.
        unsafe { engine.pin(region.as_ptr(), region.len())? };
        Ok(Staging {
            region,
            slot_len,
            slots,
            free: Mutex::new((0..slots).rev().collect()),
            permits: Arc::new(Semaphore::new(slots)),
            engine,
        })
    }

    pub(crate) fn region(&self) -> &Arc<MemRegion> {
        &self.region
    }

    pub(crate) fn slots(&self) -> usize {
        self.slots
    }

    /// Slots free right now, for tests.
    pub(crate) fn free_slots(&self) -> usize {
        self.permits.available_permits()
    }

    /// Waits for `n` free slots (`n` is capped at the slot count).
    pub(crate) async fn acquire(self: &Arc<Self>, n: usize) -> Result<Slots> {
        let n = n.min(self.slots);
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .map_err(|_| Error::closed("staging"))?;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let at = free.len() - n;
        let ids = free.split_off(at);
        Ok(Slots {
            staging: self.clone(),
            ids,
            _permit: permit,
        })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: pinned in `new`; no slot is held once the staging itself is dropped.
        if let Err(e) = unsafe { self.engine.unpin(self.region.as_ptr()) } {
            tracing::warn!(error = %e, "kvpool could not unpin its staging memory");
        }
    }
}

/// Slots held for one chunk of blocks; released when dropped.
#[derive(Debug)]
pub(crate) struct Slots {
    staging: Arc<Staging>,
    ids: Vec<usize>,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    fn offset(&self, i: usize) -> usize {
        self.ids[i] * self.staging.slot_len
    }

    /// Host address of slot `i`.
    pub(crate) fn addr(&self, i: usize) -> usize {
        self.staging.region.as_ptr() as usize + self.offset(i)
    }

    /// Slot `i`'s bytes.
    pub(crate) fn bytes(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: slot `i` is held by `self` alone (ids are unique among live `Slots`) and
        // lies inside the region; no copy into it is in flight when the worker calls this.
        unsafe { std::slice::from_raw_parts_mut(self.addr(i) as *mut u8, self.staging.slot_len) }
    }

    /// Slot `i` as a source for a backend's `put`.
    pub(crate) fn iovec(&self, i: usize, len: usize) -> Result<IoVec> {
        IoVec::single(
            &self.staging.region,
            self.offset(i),
            len.min(self.staging.slot_len),
        )
    }

    /// Slot `i` as a destination for a backend's `get_into`.
    pub(crate) fn iovec_mut(&self, i: usize, len: usize) -> Result<IoVecMut> {
        IoVecMut::single(
            &self.staging.region,
            self.offset(i),
            len.min(self.staging.slot_len),
        )
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        if cfg!(debug_assertions) {
            for i in 0..self.ids.len() {
                self.bytes(i).fill(POISON);
            }
        }
        let mut free = self.staging.free.lock().unwrap_or_else(|e| e.into_inner());
        free.extend(self.ids.drain(..));
        // The permit is released after the ids are back, so a waiter always finds them.
    }
}
