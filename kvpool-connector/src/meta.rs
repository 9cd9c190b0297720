//! The per-step plan the scheduler sends to every worker.
//!
//! vLLM pickles the connector metadata and ships it to each worker process; kvpool's is this
//! struct encoded as JSON (bytes), so the Python side carries an opaque blob and the worker
//! decodes exactly what the scheduler encoded. Decoding checks everything a worker relies on:
//! a malformed blob is an error, never a wrong block.

use serde::{Deserialize, Serialize};

use kvpool_core::error::{Error, Result};
use kvpool_core::key::BlockHash;

/// Blocks of one request to load into the engine's cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadPlan {
    /// vLLM's request id.
    pub req_id: String,
    /// Destination block ids, one per hash.
    pub block_ids: Vec<u32>,
    /// The blocks' hashes, hex, 64 characters each, concatenated.
    pub hashes: String,
    /// Load in the background and report through `get_finished`.
    pub is_async: bool,
    /// The KV-cache group of each block (hybrid models); empty: every block is in group 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<u32>,
}

/// Blocks of one request to save from the engine's cache.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavePlan {
    /// vLLM's request id.
    pub req_id: String,
    /// Source block ids, one per hash.
    pub block_ids: Vec<u32>,
    /// Index of the first block within the request (each tensor-parallel rank's share is
    /// decided by this position, so it must be stable across steps).
    pub first_block: u32,
    /// The blocks' hashes, hex, 64 characters each, concatenated.
    pub hashes: String,
    /// The KV-cache group the blocks belong to.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub group: u32,
    /// KV events only (vLLM's `--kv-events-config`): the hash of the block before the first
    /// one, hex (none for a request's first block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// KV events only: the blocks' tokens, block after block (empty where unknown).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_ids: Vec<u32>,
    /// KV events only: the request's LoRA adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora_name: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One step's plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepMeta {
    /// Loads, in scheduling order.
    pub loads: Vec<LoadPlan>,
    /// Saves, in scheduling order.
    pub saves: Vec<SavePlan>,
    /// Requests preempted in this step: their blocks are about to be reused.
    pub preempted: Vec<String>,
    /// Finished requests whose block free vLLM did not delay (they held no blocks): workers
    /// must not report them as finished sending, which vLLM would take for an unknown request.
    #[serde(default)]
    pub forget: Vec<String>,
}

#[cfg(test)]
fn encode_hashes(hashes: &[BlockHash]) -> String {
    let mut s = String::with_capacity(hashes.len() * 64);
    for h in hashes {
        s.push_str(&h.to_hex());
    }
    s
}

pub(crate) fn decode_hashes(hex: &str, expected: usize, req_id: &str) -> Result<Vec<BlockHash>> {
    if hex.len() != expected * 64 {
        return Err(Error::invalid_argument(format!(
            "connector metadata for request {req_id:?}: {} hex digits of hashes for {expected} \
             blocks",
            hex.len()
        )));
    }
    (0..expected)
        .map(|i| {
            hex.get(i * 64..(i + 1) * 64)
                .ok_or_else(|| Error::invalid_argument("connector metadata: non-ASCII hashes"))
                .and_then(BlockHash::from_hex)
        })
        .collect()
}

impl StepMeta {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.loads.is_empty()
            && self.saves.is_empty()
            && self.preempted.is_empty()
            && self.forget.is_empty()
    }

    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("StepMeta always serializes")
    }

    /// Parses and checks the wire form.
    ///
    /// # Errors
    /// `InvalidArgument` for anything but a well-formed plan whose hash lists match their
    /// block lists.
    pub fn decode(bytes: &[u8]) -> Result<StepMeta> {
        let meta: StepMeta = serde_json::from_slice(bytes).map_err(|e| {
            Error::invalid_argument(format!("connector metadata is not a kvpool step plan: {e}"))
        })?;
        for l in &meta.loads {
            decode_hashes(&l.hashes, l.block_ids.len(), &l.req_id)?;
            if !l.groups.is_empty() && l.groups.len() != l.block_ids.len() {
                return Err(Error::invalid_argument(format!(
                    "connector metadata for request {:?}: {} group indices for {} blocks",
                    l.req_id,
                    l.groups.len(),
                    l.block_ids.len()
                )));
            }
        }
        for s in &meta.saves {
            decode_hashes(&s.hashes, s.block_ids.len(), &s.req_id)?;
            if let Some(parent) = &s.parent {
                BlockHash::from_hex(parent).map_err(|e| {
                    Error::invalid_argument(format!(
                        "connector metadata for request {:?}: parent hash: {e}",
                        s.req_id
                    ))
                })?;
            }
        }
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_mismatched_hash_lists() {
        let h = BlockHash([7u8; 32]);
        let meta = StepMeta {
            loads: vec![LoadPlan {
                req_id: "a".into(),
                block_ids: vec![3, 4],
                hashes: encode_hashes(&[h, h]),
                is_async: false,
                groups: vec![],
            }],
            saves: vec![],
            preempted: vec!["b".into()],
            forget: vec![],
        };
        let back = StepMeta::decode(&meta.encode()).unwrap();
        assert_eq!(back, meta);
        assert_eq!(
            decode_hashes(&back.loads[0].hashes, 2, "a").unwrap(),
            vec![h, h]
        );

        let mut bad = meta.clone();
        bad.loads[0].block_ids.push(5);
        let err = StepMeta::decode(&bad.encode()).unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
        assert!(StepMeta::decode(b"{\"loads\": 1}").is_err());
        let mut bad = meta.clone();
        bad.loads[0].groups = vec![1];
        let err = StepMeta::decode(&bad.encode()).unwrap_err();
        assert!(
            err.to_string().contains("1 group indices for 2 blocks"),
            "{err}"
        );
        let mut hybrid = meta.clone();
        hybrid.loads[0].groups = vec![0, 1];
        assert_eq!(StepMeta::decode(&hybrid.encode()).unwrap(), hybrid);
        assert!(StepMeta::decode(b"\xff").is_err());
    }

    #[test]
    fn event_details_of_a_save_round_trip_and_a_bad_parent_is_refused() {
        let h = BlockHash([7u8; 32]);
        let mut meta = StepMeta {
            saves: vec![SavePlan {
                req_id: "s".into(),
                block_ids: vec![3],
                first_block: 1,
                hashes: encode_hashes(&[h]),
                group: 0,
                parent: Some(BlockHash([1u8; 32]).to_hex()),
                token_ids: vec![5, 6],
                lora_name: Some("a".into()),
            }],
            ..StepMeta::default()
        };
        assert_eq!(StepMeta::decode(&meta.encode()).unwrap(), meta);
        meta.saves[0].parent = Some("12".into());
        let err = StepMeta::decode(&meta.encode()).unwrap_err();
        assert!(err.to_string().contains("\"s\": parent hash"), "{err}");
    }
}
