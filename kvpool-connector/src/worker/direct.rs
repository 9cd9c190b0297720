//! Loads and saves straight between host KV and the backend: the backend reads and writes the
//! cache tensors themselves.

use std::sync::Arc;

use kvpool_core::error::Result;

use super::events::SaveEvents;
use super::{Blocks, LoadTally, Presence, SaveTally, Shared};
use crate::layout::KvLayout;

/// Loads `keys` into their blocks; returns the block ids that could not be loaded.
pub(super) async fn load(shared: &Shared, kv: &KvLayout, req_id: &str, keys: Blocks) -> Vec<u32> {
    let mut items = Vec::with_capacity(keys.len());
    for (block, key) in &keys {
        match kv.scatter(*block) {
            Ok(iov) => items.push((*block, key.clone(), iov)),
            Err(_) => return keys.iter().map(|(b, _)| *b).collect(),
        }
    }
    let mut tally = LoadTally::default();
    for chunk in items.chunks(shared.max_batch) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|(_, k, iov)| (k.clone(), iov.clone()))
            .collect();
        match shared.backend.get_into(batch).await {
            Ok(outcomes) => {
                for ((block, key, iov), outcome) in chunk.iter().zip(outcomes) {
                    tally.outcome(req_id, (*block, key), iov.len(), outcome);
                }
            }
            Err(e) => tally.failed(req_id, chunk.iter().map(|(b, _, _)| *b), &e),
        }
    }
    tally.finish(shared)
}

/// Saves blocks under `keys`: `exists` first, then `put` of the missing keys.
pub(super) async fn save(
    shared: &Shared,
    kv: &KvLayout,
    req_id: &str,
    share: Blocks,
    events: Option<&Arc<SaveEvents>>,
    presence: Presence,
) -> Result<()> {
    let mut tally = SaveTally::new(events);
    for chunk in share.chunks(shared.max_batch) {
        let missing = tally.missing(shared, chunk, presence).await?;
        if missing.is_empty() {
            continue;
        }
        let mut items = Vec::with_capacity(missing.len());
        for (block, key) in missing {
            items.push((key, kv.gather(block)?));
        }
        tally.put(shared, req_id, items).await?;
    }
    tally.finish(shared);
    Ok(())
}
