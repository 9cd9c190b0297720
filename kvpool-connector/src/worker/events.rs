//! What the pool gained and lost, for vLLM's KV events (`BlockStored`, `BlockRemoved`,
//! `AllBlocksCleared`): a cache-aware router subscribed to vLLM's event publisher learns which
//! prefixes the pool can serve.
//!
//! Each worker reports what its own saves and loads saw; the Python shim wraps the records in
//! vLLM's event types and vLLM counts them across ranks (a block is stored once every rank
//! holding a share of it reports it).

use std::collections::HashMap;
use std::sync::Mutex;

use kvpool_core::error::Result;
use kvpool_core::key::BlockHash;

#[cfg(test)]
use super::tally::save_hashes;
use crate::meta::SavePlan;

/// Events kept between two collections. vLLM collects after every step, so this is reached
/// only by an engine that never collects; later events are then dropped (and counted), which
/// costs a router hits, never correctness.
const MAX_PENDING_EVENTS: usize = 1 << 16;

/// A block the pool holds after a save.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    /// The KV-cache group.
    pub group: u32,
    /// The hash the block is keyed by.
    pub hash: BlockHash,
    /// The hash of the block before it in the request (none for the first block).
    pub parent: Option<BlockHash>,
    /// The block's tokens (empty where the scheduler did not have them).
    pub token_ids: Vec<u32>,
    /// Tokens per block of the group.
    pub block_size: u32,
    /// The request's LoRA adapter.
    pub lora_name: Option<String>,
}

/// One change to the pool's contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolEvent {
    /// Saved, or found already saved, by this rank.
    Stored(StoredBlock),
    /// A load found the block missing: the pool lost it (evicted, expired, removed).
    Removed { group: u32, hash: BlockHash },
    /// The pool was emptied (a prefix-cache reset that cleared it).
    Cleared,
}

/// Events since the last collection.
#[derive(Debug, Default)]
pub(super) struct EventLog {
    events: Mutex<Vec<PoolEvent>>,
}

impl EventLog {
    pub(super) fn push(&self, events: impl IntoIterator<Item = PoolEvent>) {
        let mut pending = super::lock(&self.events);
        let mut dropped = 0usize;
        for e in events {
            if pending.len() < MAX_PENDING_EVENTS {
                pending.push(e);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "kvpool KV events not collected by the engine; dropping the newest"
            );
        }
    }

    pub(super) fn take(&self) -> Vec<PoolEvent> {
        std::mem::take(&mut *super::lock(&self.events))
    }
}

/// What a save plan's events need besides the hashes the backend confirms.
#[derive(Debug)]
pub(super) struct SaveEvents {
    group: u32,
    block_size: u32,
    hashes: Vec<BlockHash>,
    /// Position of each hash in the plan.
    index: HashMap<BlockHash, usize>,
    parent: Option<BlockHash>,
    token_ids: Vec<u32>,
    lora_name: Option<String>,
}

impl SaveEvents {
    /// The plan's event details, decoding its hashes; `block_size` is its group's.
    #[cfg(test)]
    pub(super) fn from_plan(plan: &SavePlan, block_size: usize) -> Result<SaveEvents> {
        Self::new(plan, &save_hashes(plan)?, block_size)
    }

    /// The plan's event details, given its decoded `hashes` (see
    /// [`save_hashes`](super::tally::save_hashes));
    /// `block_size` is its group's.
    pub(super) fn new(
        plan: &SavePlan,
        hashes: &[BlockHash],
        block_size: usize,
    ) -> Result<SaveEvents> {
        let parent = match &plan.parent {
            Some(hex) => Some(BlockHash::from_hex(hex)?),
            None => None,
        };
        let index = hashes.iter().enumerate().map(|(i, h)| (*h, i)).collect();
        Ok(SaveEvents {
            group: plan.group,
            block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
            hashes: hashes.to_vec(),
            index,
            parent,
            token_ids: plan.token_ids.clone(),
            lora_name: plan.lora_name.clone(),
        })
    }

    /// The event for a block of the plan the pool now holds (none for a hash not in it).
    pub(super) fn stored(&self, hash: &BlockHash) -> Option<PoolEvent> {
        let i = *self.index.get(hash)?;
        let bs = self.block_size as usize;
        let parent = match i {
            0 => self.parent,
            _ => Some(self.hashes[i - 1]),
        };
        let token_ids = self
            .token_ids
            .get(i * bs..(i + 1) * bs)
            .map(<[u32]>::to_vec)
            .unwrap_or_default();
        Some(PoolEvent::Stored(StoredBlock {
            group: self.group,
            hash: *hash,
            parent,
            token_ids,
            block_size: self.block_size,
            lora_name: self.lora_name.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> BlockHash {
        BlockHash::from_slice(&[n; 32]).unwrap()
    }

    fn plan(first_block: u32, n: u8, parent: Option<u8>, tokens: usize) -> SavePlan {
        SavePlan {
            req_id: "r".into(),
            block_ids: (1..=u32::from(n)).collect(),
            first_block,
            hashes: (1..=n).map(|i| hash(i).to_hex()).collect(),
            group: 1,
            parent: parent.map(|p| hash(p).to_hex()),
            token_ids: (0..tokens as u32).collect(),
            lora_name: Some("adapter".into()),
        }
    }

    #[test]
    fn stored_blocks_chain_to_their_parent_and_carry_their_tokens() {
        let events = SaveEvents::from_plan(&plan(4, 3, Some(9), 12), 4).unwrap();
        let first = events.stored(&hash(1)).unwrap();
        assert_eq!(
            first,
            PoolEvent::Stored(StoredBlock {
                group: 1,
                hash: hash(1),
                parent: Some(hash(9)),
                token_ids: vec![0, 1, 2, 3],
                block_size: 4,
                lora_name: Some("adapter".into()),
            })
        );
        let PoolEvent::Stored(third) = events.stored(&hash(3)).unwrap() else {
            panic!("a stored event");
        };
        assert_eq!(third.parent, Some(hash(2)));
        assert_eq!(third.token_ids, vec![8, 9, 10, 11]);
        assert_eq!(events.stored(&hash(7)), None, "a hash outside the plan");
    }

    #[test]
    fn missing_tokens_give_empty_token_lists_not_wrong_ones() {
        // Tokens for the first two blocks only (a plan built without decode tokens).
        let events = SaveEvents::from_plan(&plan(0, 3, None, 8), 4).unwrap();
        let PoolEvent::Stored(first) = events.stored(&hash(1)).unwrap() else {
            panic!("a stored event");
        };
        assert_eq!(first.parent, None);
        let PoolEvent::Stored(third) = events.stored(&hash(3)).unwrap() else {
            panic!("a stored event");
        };
        assert!(third.token_ids.is_empty());
    }

    #[test]
    fn hashes_decoded_by_the_caller_give_the_plans_events_and_bad_ones_an_error() {
        let p = plan(2, 3, Some(9), 12);
        let own = SaveEvents::from_plan(&p, 4).unwrap();
        let given = SaveEvents::new(&p, &save_hashes(&p).unwrap(), 4).unwrap();
        for n in 1..=4 {
            assert_eq!(own.stored(&hash(n)), given.stored(&hash(n)));
        }
        let mut bad = p.clone();
        bad.hashes.pop();
        assert!(save_hashes(&bad).is_err());
        assert!(SaveEvents::from_plan(&bad, 4).is_err());
    }

    #[test]
    fn a_bad_parent_hash_is_an_error() {
        let mut p = plan(1, 1, None, 0);
        p.parent = Some("zz".into());
        assert!(SaveEvents::from_plan(&p, 4).is_err());
    }

    #[test]
    fn the_log_is_bounded() {
        let log = EventLog::default();
        log.push((0..MAX_PENDING_EVENTS + 10).map(|_| PoolEvent::Cleared));
        assert_eq!(log.take().len(), MAX_PENDING_EVENTS);
        assert!(log.take().is_empty());
    }
}
