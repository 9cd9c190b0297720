//! Loads and saves straight between host KV and the backend: the backend reads and writes the
//! cache tensors themselves.

use kvpool_core::error::Result;

use super::{load_keys, save_keys, LoadTally, SaveTally, Shared};
use crate::layout::KvLayout;
use crate::meta::{LoadPlan, SavePlan};

/// Loads one plan; returns the block ids that could not be loaded.
pub(super) async fn load(shared: &Shared, kv: &KvLayout, plan: LoadPlan) -> Vec<u32> {
    let Ok(keys) = load_keys(shared, &plan) else {
        return plan.block_ids;
    };
    let mut items = Vec::with_capacity(keys.len());
    for (block, key) in keys {
        match kv.scatter(block) {
            Ok(iov) => items.push((block, key, iov)),
            Err(_) => return plan.block_ids,
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
                for ((block, _, iov), outcome) in chunk.iter().zip(outcomes) {
                    tally.outcome(&plan.req_id, *block, iov.len(), outcome);
                }
            }
            Err(e) => tally.failed(&plan.req_id, chunk.iter().map(|(b, _, _)| *b), &e),
        }
    }
    tally.finish()
}

/// Saves this rank's share of one plan: `exists` first, then `put` of the missing keys.
pub(super) async fn save(shared: &Shared, kv: &KvLayout, plan: SavePlan) -> Result<()> {
    let share = save_keys(shared, &plan)?;
    let mut tally = SaveTally::default();
    for chunk in share.chunks(shared.max_batch) {
        let missing = tally.missing(shared, chunk).await?;
        if missing.is_empty() {
            continue;
        }
        let mut items = Vec::with_capacity(missing.len());
        for (block, key) in missing {
            items.push((key, kv.gather(block)?));
        }
        tally.put(shared, &plan.req_id, items).await?;
    }
    tally.finish();
    Ok(())
}
