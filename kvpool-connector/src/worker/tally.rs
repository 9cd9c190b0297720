//! Per-request keys and the metrics of loads and saves, shared by both transfer paths.

use kvpool_core::backend::{GetOutcome, PutOutcome};
use kvpool_core::buffer::IoVec;
use kvpool_core::error::{Error, Result};
use kvpool_core::key::{BlockHash, BlockKey};
use kvpool_core::metrics;

use std::sync::Arc;
use std::time::Instant;

use super::events::{PoolEvent, SaveEvents};
use super::{Blocks, Shared, TransferRecord, METRICS_LABEL};
use crate::meta::{decode_hashes, LoadPlan, SavePlan};

/// What a save knows of the blocks the backend already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Presence {
    /// Nothing: it asks (`exists`) and writes only the blocks the backend lacks.
    Unknown,
    /// The caller asked already: every block is written (`put` leaves a key the backend
    /// holds after all alone, as `Exists`).
    Absent,
}

/// The keys of a load plan's blocks, by KV-cache group, each rank starting at a different
/// block so ranks read from different places first.
pub(super) fn load_keys(shared: &Shared, plan: &LoadPlan) -> Result<Vec<(usize, Blocks)>> {
    let hashes = decode_hashes(&plan.hashes, plan.block_ids.len(), &plan.req_id)?;
    let mut by_group: Vec<(usize, Blocks)> = Vec::new();
    for (i, (&block, hash)) in plan.block_ids.iter().zip(&hashes).enumerate() {
        let group = plan.groups.get(i).copied().unwrap_or(0) as usize;
        let key = shared.group_keys(group, &plan.req_id)?.own_key(*hash);
        match by_group.iter_mut().find(|(g, _)| *g == group) {
            Some((_, blocks)) => blocks.push((block, key)),
            None => by_group.push((group, vec![(block, key)])),
        }
    }
    for (_, keys) in &mut by_group {
        let shift = shared.tp_rank as usize % keys.len();
        keys.rotate_left(shift);
    }
    Ok(by_group)
}

/// A save plan's block hashes, decoded: an error unless there is one per block.
pub(super) fn save_hashes(plan: &SavePlan) -> Result<Vec<BlockHash>> {
    decode_hashes(&plan.hashes, plan.block_ids.len(), &plan.req_id)
}

/// This rank's share of a save plan, given its decoded `hashes` (see [`save_hashes`]): ranks
/// holding identical KV split the blocks between them.
pub(super) fn save_share(shared: &Shared, plan: &SavePlan, hashes: &[BlockHash]) -> Result<Blocks> {
    let keys = shared.group_keys(plan.group as usize, &plan.req_id)?;
    let step = keys.put_step().max(1) as usize;
    let mine = shared.tp_rank as usize % step;
    Ok(plan
        .block_ids
        .iter()
        .zip(hashes)
        .enumerate()
        .filter(|(i, _)| (plan.first_block as usize + i) % step == mine)
        .map(|(_, (&block, hash))| (block, keys.own_key(*hash)))
        .collect())
}

/// Counts a load's outcomes into the metrics; collects the blocks that failed.
#[derive(Debug)]
pub(super) struct LoadTally {
    hits: u64,
    bytes: u64,
    failed: Vec<u32>,
    /// Blocks the pool no longer had, for KV events.
    lost: Vec<PoolEvent>,
    started: Instant,
}

impl Default for LoadTally {
    fn default() -> Self {
        LoadTally {
            hits: 0,
            bytes: 0,
            failed: Vec::new(),
            lost: Vec::new(),
            started: Instant::now(),
        }
    }
}

impl LoadTally {
    /// Records one block's outcome; true for a hit.
    pub(super) fn outcome(
        &mut self,
        req_id: &str,
        (block, key): (u32, &BlockKey),
        len: usize,
        outcome: GetOutcome,
    ) -> bool {
        match outcome {
            GetOutcome::Hit => {
                self.hits += 1;
                self.bytes += len as u64;
                return true;
            }
            GetOutcome::Miss => {
                self.failed.push(block);
                self.lost.push(PoolEvent::Removed {
                    group: key.namespace().group(),
                    hash: *key.hash(),
                });
            }
            GetOutcome::Failed(e) => {
                tracing::warn!(req = req_id, block, error = %e, "load failed");
                self.failed.push(block);
            }
        }
        false
    }

    pub(super) fn failed(&mut self, req_id: &str, blocks: impl Iterator<Item = u32>, e: &Error) {
        tracing::warn!(req = req_id, error = %e, "load failed");
        self.failed.extend(blocks);
    }

    /// Blocks that were hits but whose copy to the device failed.
    pub(super) fn copy_failed(&mut self, req_id: &str, blocks: &[u32], e: &Error) {
        tracing::warn!(req = req_id, error = %e, "copy of loaded KV to the device failed");
        self.hits = self.hits.saturating_sub(blocks.len() as u64);
        self.failed.extend_from_slice(blocks);
    }

    /// Counts into the metrics only, for a failure found after the load's record was taken.
    pub(super) fn finish_metrics_only(self) -> Vec<u32> {
        let m = metrics::global();
        m.add_keys(METRICS_LABEL, "load", "failed", self.failed.len() as u64);
        self.failed
    }

    pub(super) fn finish(self, shared: &Shared) -> Vec<u32> {
        let m = metrics::global();
        m.add_keys(METRICS_LABEL, "load", "hit", self.hits);
        m.add_keys(METRICS_LABEL, "load", "failed", self.failed.len() as u64);
        m.add_bytes(METRICS_LABEL, "load", self.bytes);
        shared.record(TransferRecord {
            op: "load",
            seconds: self.started.elapsed().as_secs_f64(),
            blocks: self.hits + self.failed.len() as u64,
            bytes: self.bytes,
            failed: self.failed.len() as u64,
        });
        if let Some(events) = &shared.events {
            events.push(self.lost);
        }
        self.failed
    }
}

/// Counts a save's outcomes into the metrics.
#[derive(Debug)]
pub(super) struct SaveTally {
    stored: u64,
    existed: u64,
    failed: u64,
    bytes: u64,
    started: Instant,
    /// With KV events: the plan's details, and the blocks the pool holds after this save.
    events: Option<(Arc<SaveEvents>, Vec<PoolEvent>)>,
}

impl SaveTally {
    /// A tally that also collects KV events when `events` is given.
    pub(super) fn new(events: Option<&Arc<SaveEvents>>) -> Self {
        SaveTally {
            stored: 0,
            existed: 0,
            failed: 0,
            bytes: 0,
            started: Instant::now(),
            events: events.map(|e| (e.clone(), Vec::new())),
        }
    }

    fn in_pool(&mut self, hash: Option<&BlockHash>) {
        if let (Some((plan, found)), Some(hash)) = (&mut self.events, hash) {
            found.extend(plan.stored(hash));
        }
    }

    /// The blocks of `chunk` the backend does not hold yet (all of them when `presence` says
    /// the caller checked).
    pub(super) async fn missing(
        &mut self,
        shared: &Shared,
        chunk: &[(u32, BlockKey)],
        presence: Presence,
    ) -> Result<Vec<(u32, BlockKey)>> {
        if presence == Presence::Absent {
            return Ok(chunk.to_vec());
        }
        let keys: Vec<BlockKey> = chunk.iter().map(|(_, k)| k.clone()).collect();
        let present = shared.backend.exists(&keys).await?;
        let mut missing = Vec::new();
        for (item, present) in chunk.iter().zip(present) {
            if present {
                self.existed += 1;
                self.in_pool(Some(item.1.hash()));
            } else {
                missing.push(item.clone());
            }
        }
        Ok(missing)
    }

    pub(super) fn not_saved(&mut self, blocks: usize) {
        self.failed += blocks as u64;
    }

    pub(super) async fn put(
        &mut self,
        shared: &Shared,
        req_id: &str,
        items: Vec<(BlockKey, IoVec)>,
    ) -> Result<()> {
        // Hashes are kept only for KV events: the common path copies nothing per block.
        let events = self.events.is_some();
        let written: Vec<(usize, Option<BlockHash>)> = items
            .iter()
            .map(|(k, iov)| (iov.len(), events.then(|| *k.hash())))
            .collect();
        for (outcome, (len, key)) in shared.backend.put(items).await?.into_iter().zip(written) {
            match outcome {
                PutOutcome::Stored => {
                    self.stored += 1;
                    self.bytes += len as u64;
                    self.in_pool(key.as_ref());
                }
                PutOutcome::Exists => {
                    self.existed += 1;
                    self.in_pool(key.as_ref());
                }
                PutOutcome::Failed(e) => {
                    self.failed += 1;
                    tracing::debug!(req = req_id, error = %e, "block not saved");
                }
            }
        }
        Ok(())
    }

    pub(super) fn finish(self, shared: &Shared) {
        let m = metrics::global();
        m.add_keys(METRICS_LABEL, "save", "stored", self.stored);
        m.add_keys(METRICS_LABEL, "save", "exists", self.existed);
        m.add_keys(METRICS_LABEL, "save", "failed", self.failed);
        m.add_bytes(METRICS_LABEL, "save", self.bytes);
        shared.record(TransferRecord {
            op: "save",
            seconds: self.started.elapsed().as_secs_f64(),
            blocks: self.stored + self.existed + self.failed,
            bytes: self.bytes,
            failed: self.failed,
        });
        if let (Some(log), Some((_, found))) = (&shared.events, self.events) {
            log.push(found);
        }
    }
}
