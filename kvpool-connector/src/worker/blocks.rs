//! Saving and loading blocks under caller-chosen keys, without vLLM's plans: the API below the
//! vLLM hooks, for tests, tools and engines other than vLLM. It moves bytes exactly as the
//! hooks do (same layout, staging and copy engine); only the bookkeeping of requests is left
//! out.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvpool_core::error::{Error, Result};
use kvpool_core::key::BlockKey;

use super::staged::Staged;
use super::{load_fully, lock, save_reads, Blocks, Presence, WorkerConnector};
use crate::device::{Direction, StreamHandle};
use crate::layout::KvLayout;

/// A save or load in flight. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Transfer {
    state: Arc<(Mutex<Option<Vec<u32>>>, Condvar)>,
}

impl Transfer {
    fn finish(&self, failed: Vec<u32>) {
        let (done, changed) = &*self.state;
        *lock(done) = Some(failed);
        changed.notify_all();
    }

    /// Whether it has completed.
    pub fn is_done(&self) -> bool {
        lock(&self.state.0).is_some()
    }

    /// Waits up to `timeout`; the blocks that failed (not saved, or not loaded: a miss, a
    /// corrupt value, a backend or copy error), or `None` if it is still running.
    pub fn wait(&self, timeout: Duration) -> Option<Vec<u32>> {
        let (done, changed) = &*self.state;
        let guard = lock(done);
        let (guard, _) = changed
            .wait_timeout_while(guard, timeout, |d| d.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

/// What a block transfer runs with once its arguments are checked.
type Prepared = (Arc<KvLayout>, Option<Arc<Staged>>, Blocks, Transfer);

impl WorkerConnector {
    /// Checks `blocks` against `keys` and the cache, and orders the copy stream of
    /// `direction` after `compute`.
    fn prepare(
        &self,
        blocks: &[u32],
        keys: Vec<BlockKey>,
        direction: Direction,
        compute: StreamHandle,
    ) -> Result<Prepared> {
        if blocks.len() != keys.len() {
            return Err(Error::invalid_argument(format!(
                "{} block ids but {} keys; each block needs its key",
                blocks.len(),
                keys.len()
            )));
        }
        let kv = self.kv_layout()?;
        for &b in blocks {
            kv.check_block(b)?;
        }
        let staged = lock(&self.staged).clone();
        if let Some(staged) = &staged {
            staged.engine.order_after(direction, compute)?;
        }
        let pairs = blocks.iter().copied().zip(keys).collect();
        Ok((kv, staged, pairs, Transfer::default()))
    }

    /// Saves `blocks` under `keys` (keys the backend holds already are left alone). Device KV
    /// is read after the work queued so far on `compute`. The transfer completes once the
    /// backend has every value; its failed blocks are those not saved.
    ///
    /// # Errors
    /// Mismatched lengths, a block outside the cache, or no cache registered.
    pub fn save_blocks(
        &self,
        blocks: &[u32],
        keys: Vec<BlockKey>,
        compute: StreamHandle,
    ) -> Result<Transfer> {
        let (kv, staged, pairs, transfer) =
            self.prepare(blocks, keys, Direction::ToHost, compute)?;
        let done = transfer.clone();
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let all: Vec<u32> = pairs.iter().map(|(b, _)| *b).collect();
            let failed = match save_reads(
                &shared,
                &kv,
                staged.as_deref(),
                "save_blocks",
                pairs,
                None,
                Presence::Unknown,
            )
            .await
            {
                Ok(puts) => {
                    for put in puts {
                        let _ = put.await;
                    }
                    Vec::new()
                }
                Err(e) => {
                    tracing::warn!(error = %e, "save_blocks failed");
                    all
                }
            };
            done.finish(failed);
        });
        Ok(transfer)
    }

    /// Loads the values under `keys` into `blocks`. Device blocks are written after the work
    /// queued so far on `compute`. The transfer completes once the bytes are in the blocks
    /// (on a device: once the copies to it have completed); its failed blocks were not loaded
    /// and hold no guaranteed bytes.
    ///
    /// # Errors
    /// Mismatched lengths, a block outside the cache, or no cache registered.
    pub fn load_blocks(
        &self,
        blocks: &[u32],
        keys: Vec<BlockKey>,
        compute: StreamHandle,
    ) -> Result<Transfer> {
        let (kv, staged, pairs, transfer) =
            self.prepare(blocks, keys, Direction::ToDevice, compute)?;
        let done = transfer.clone();
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let failed = load_fully(&shared, &kv, staged.as_deref(), "load_blocks", pairs).await;
            done.finish(failed);
        });
        Ok(transfer)
    }
}
