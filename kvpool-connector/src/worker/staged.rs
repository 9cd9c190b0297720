//! Loads and saves through pinned staging: device KV (and host KV with `stage_host_kv`).
//!
//! Save: `exists`, then device → staging copies for the missing blocks, a fence, and once it
//! completes the blocks are free for the engine again (the request may be reported finished
//! sending) while the backend's `put` reads staging in the background. Load: the backend's
//! `get_into` staging, then staging → device copies and a fence; the slots go back when it
//! completes. Chunks are at most half the slots, so one chunk's copies overlap the next one's
//! backend transfer.

use std::sync::Arc;

use tokio::task::JoinHandle;

use kvpool_core::error::{Error, ErrorKind, Result};

use super::events::SaveEvents;
use super::{Blocks, LoadTally, Presence, SaveTally, Shared};
use crate::device::{CopyEngine, Direction, Fence};
use crate::layout::KvLayout;
use crate::staging::{Slots, Staging};

/// Most blocks per chunk.
const MAX_CHUNK: usize = 16;

/// The device half of a worker: its copy engine and staging memory.
#[derive(Debug)]
pub(crate) struct Staged {
    pub(crate) engine: Arc<dyn CopyEngine>,
    pub(crate) staging: Arc<Staging>,
    /// Blocks per chunk.
    pub(crate) chunk: usize,
}

impl Staged {
    pub(crate) fn new(engine: Arc<dyn CopyEngine>, staging: Staging, max_batch: usize) -> Self {
        // Small enough that a step has several chunks, so the device copies of one overlap
        // the backend transfer of the next; large enough to keep backend batches efficient.
        let chunk = (staging.slots() / 2).clamp(1, max_batch.clamp(1, MAX_CHUNK));
        Staged {
            engine,
            staging: Arc::new(staging),
            chunk,
        }
    }
}

/// Waits for `fence` without holding up the runtime's workers.
pub(super) async fn fence_done(fence: Arc<dyn Fence>) -> Result<()> {
    if fence.is_done()? {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || fence.wait())
        .await
        .map_err(|e| Error::new(ErrorKind::Unexpected, "a copy waiter died").set_source(e))?
}

/// Rewrites slots `held` from address order to value order (save) or back (load).
fn reorder(kv: &KvLayout, slots: &mut Slots, held: impl Iterator<Item = usize>, to_value: bool) {
    if !kv.needs_reorder() {
        return;
    }
    let mut scratch = vec![0u8; kv.value_len()];
    for i in held {
        let slot = &mut slots.bytes(i)[..kv.value_len()];
        scratch.copy_from_slice(slot);
        if to_value {
            kv.image_to_value(&scratch, slot);
        } else {
            kv.value_to_image(&scratch, slot);
        }
    }
}

/// Saves blocks under `keys`. Returns once every device read is complete; the backend writes
/// it started are returned as handles, still running.
pub(super) async fn save(
    shared: &Arc<Shared>,
    kv: &Arc<KvLayout>,
    staged: &Staged,
    req_id: &str,
    share: Blocks,
    events: Option<&Arc<SaveEvents>>,
    presence: Presence,
) -> Result<Vec<JoinHandle<()>>> {
    let mut puts = Vec::new();
    let mut copies = Vec::new();
    for chunk in share.chunks(staged.chunk) {
        let mut tally = SaveTally::new(events);
        let missing = tally.missing(shared, chunk, presence).await?;
        if missing.is_empty() {
            tally.finish(shared);
            continue;
        }
        let mut slots = staged.staging.acquire(missing.len()).await?;
        copies.clear();
        for (i, (block, _)) in missing.iter().enumerate() {
            kv.device_copies(*block, slots.addr(i), &mut copies)?;
        }
        // SAFETY: the copies read device KV of registered blocks vLLM keeps until this save is
        // reported, and write slots held by `slots` until the fence below has completed.
        let copied = unsafe { staged.engine.to_host(&copies) }
            .and_then(|()| staged.engine.fence(Direction::ToHost));
        let copied = match copied {
            Ok(fence) => fence_done(fence).await,
            Err(e) => Err(e),
        };
        if let Err(e) = copied {
            tracing::warn!(req = req_id, error = %e, "copy of KV to staging failed; blocks not saved");
            tally.not_saved(missing.len());
            tally.finish(shared);
            continue;
        }
        reorder(kv, &mut slots, 0..missing.len(), true);
        let mut items = Vec::with_capacity(missing.len());
        for (i, (_, key)) in missing.into_iter().enumerate() {
            items.push((key, slots.iovec(i, kv.value_len())?));
        }
        let shared = shared.clone();
        let req_id = req_id.to_owned();
        puts.push(tokio::spawn(async move {
            if let Err(e) = tally.put(&shared, &req_id, items).await {
                tracing::warn!(req = req_id.as_str(), error = %e, "kvpool save failed");
            }
            tally.finish(&shared);
            drop(slots);
        }));
    }
    Ok(puts)
}

/// Loads `keys` into staging and queues the copies to their blocks. Returns the blocks that
/// failed already (misses, backend errors, copies that could not be queued) and one waiter per
/// chunk that resolves, once the chunk's copies are fenced, to the blocks whose copy failed.
pub(super) async fn load(
    shared: &Shared,
    kv: &KvLayout,
    staged: &Staged,
    req_id: &str,
    keys: Blocks,
) -> (Vec<u32>, Vec<Waiter>) {
    let mut tally = LoadTally::default();
    let mut waiters = Vec::new();
    let mut copies = Vec::new();
    for chunk in keys.chunks(staged.chunk) {
        let mut slots = match staged.staging.acquire(chunk.len()).await {
            Ok(s) => s,
            Err(e) => {
                tally.failed(req_id, chunk.iter().map(|(b, _)| *b), &e);
                continue;
            }
        };
        let mut batch = Vec::with_capacity(chunk.len());
        for (i, (_, key)) in chunk.iter().enumerate() {
            match slots.iovec_mut(i, kv.value_len()) {
                Ok(iov) => batch.push((key.clone(), iov)),
                Err(e) => {
                    tally.failed(req_id, chunk.iter().map(|(b, _)| *b), &e);
                    batch.clear();
                    break;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let outcomes = match shared.backend.get_into(batch).await {
            Ok(o) => o,
            Err(e) => {
                tally.failed(req_id, chunk.iter().map(|(b, _)| *b), &e);
                continue;
            }
        };
        let mut hits = Vec::with_capacity(chunk.len());
        for (i, ((block, key), outcome)) in chunk.iter().zip(outcomes).enumerate() {
            if tally.outcome(req_id, (*block, key), kv.value_len(), outcome) {
                hits.push((i, *block));
            }
        }
        if hits.is_empty() {
            continue;
        }
        reorder(kv, &mut slots, hits.iter().map(|&(i, _)| i), false);
        copies.clear();
        let mut planned = Ok(());
        for &(i, block) in &hits {
            planned = planned.and_then(|()| kv.device_copies(block, slots.addr(i), &mut copies));
        }
        // SAFETY: the copies read slots held by `slots` until the fence completes, and write
        // blocks vLLM allocated for this load and does not read before the load is reported
        // (async) or before the compute stream's wait on the fence (sync).
        let queued = planned
            .and_then(|()| unsafe { staged.engine.to_device(&copies) })
            .and_then(|()| staged.engine.fence(Direction::ToDevice));
        let blocks: Vec<u32> = hits.iter().map(|&(_, b)| b).collect();
        match queued {
            Err(e) => tally.copy_failed(req_id, &blocks, &e),
            Ok(fence) => {
                let req_id = req_id.to_owned();
                let covered = blocks.clone();
                let handle = tokio::spawn(async move {
                    let result = fence_done(fence).await;
                    drop(slots);
                    match result {
                        Ok(()) => Vec::new(),
                        Err(e) => {
                            let mut t = LoadTally::default();
                            t.copy_failed(&req_id, &blocks, &e);
                            // The chunk was counted as loaded in its load's record; the
                            // failure reaches vLLM through the failed blocks.
                            t.finish_metrics_only()
                        }
                    }
                });
                waiters.push(Waiter {
                    handle,
                    blocks: covered,
                });
            }
        }
    }
    (tally.finish(shared), waiters)
}

/// One chunk's copies to the device, in flight.
#[derive(Debug)]
pub(super) struct Waiter {
    /// Resolves to the blocks whose copy failed.
    handle: JoinHandle<Vec<u32>>,
    /// Every block the chunk copies.
    blocks: Vec<u32>,
}

/// The blocks of `waiters` whose copy failed; a waiter that died loses all of its blocks.
pub(super) async fn settle(waiters: Vec<Waiter>) -> Vec<u32> {
    let mut failed = Vec::new();
    for w in waiters {
        match w.handle.await {
            Ok(blocks) => failed.extend(blocks),
            Err(e) => {
                tracing::error!(error = %e, "a KV copy waiter died; its blocks count as failed");
                failed.extend(w.blocks);
            }
        }
    }
    failed
}
