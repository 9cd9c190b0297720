//! kvpool-connector: the engine side of kvpool — the vLLM KV connector's logic, split as vLLM
//! splits it: a scheduler half and a worker half.
//!
//! It depends on `kvpool-core` only (the storage contract); the backends are linked by whoever
//! builds the final artifact (the Python extension links them through the `kvpool` facade) and
//! are opened by name through the registry.
//!
//! The Python package (`connector-py`) is a shim over these types: it turns vLLM objects into
//! the plain values below and tensors into [`TensorDesc`]s, and holds no logic of its own.
//!
//! - [`SchedulerConnector`] answers "how many prompt tokens can the pool supply?"
//!   (through the lookup service), records the load plan after vLLM allocates blocks, and
//!   emits each step's [`StepMeta`]: which blocks every worker loads and saves.
//! - [`WorkerConnector`] owns the KV-cache layout ([`KvLayout`]) and the backend: it loads
//!   before the forward (synchronously, or in the background with `load_async`), saves newly
//!   completed full blocks after it, reports finished transfers and blocks whose load failed
//!   (vLLM recomputes those: the pool never hands back garbage KV), and on rank 0 serves
//!   [`lookup`] requests from the scheduler.
//!
//! The rules are Ascend Store's (vllm-ascend v0.18 `pool_scheduler.py` / `pool_worker.py`):
//! whole blocks only, a prefix walk that ends at the first block missing on any rank, one token
//! less than a full hit so vLLM computes the last token's logits, blocks already in the engine's
//! own prefix cache are not loaded again, each tensor-parallel rank saves only its share of
//! blocks whose KV is identical across ranks, and `exists` before `put`.

pub mod device;
pub mod groups;
mod layout;
pub mod lookup;
mod meta;
mod metrics_server;
mod scheduler;
mod staging;
mod worker;

pub use device::{Device, StreamHandle};
pub use groups::{GroupKind, KvCacheGroup};
pub use layout::{KvLayout, TensorDesc};
pub use meta::{LoadPlan, SavePlan, StepMeta};
pub use scheduler::{
    BoundaryState, CachedRequest, NewRequest, RequestInfo, SchedulerConnector, StepInput,
};
pub use worker::{
    FinishedTransfers, PoolEvent, StoredBlock, Transfer, TransferRecord, WorkerConnector,
};

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use kvpool_core::config::Config;
use kvpool_core::error::{Error, Result};
use kvpool_core::key::{BlockHash, BlockKey, KeyFormat, Namespace};

/// vLLM's `kv_role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvRole {
    /// `kv_producer`: saves, and loads prefixes (a prefill node).
    #[serde(rename = "kv_producer")]
    Producer,
    /// `kv_consumer`: a decode node; loads only with `consumer_is_to_load`, saves only with
    /// `consumer_is_to_put`.
    #[serde(rename = "kv_consumer")]
    Consumer,
    /// `kv_both`: loads and saves.
    #[serde(rename = "kv_both")]
    Both,
}

impl FromStr for KvRole {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "kv_producer" => Ok(KvRole::Producer),
            "kv_consumer" => Ok(KvRole::Consumer),
            "kv_both" => Ok(KvRole::Both),
            other => Err(Error::config_invalid(format!(
                "unknown kv_role {other:?}; expected kv_producer, kv_consumer or kv_both"
            ))),
        }
    }
}

impl fmt::Display for KvRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvRole::Producer => "kv_producer",
            KvRole::Consumer => "kv_consumer",
            KvRole::Both => "kv_both",
        })
    }
}

/// What the connector needs to know about the engine: model, block size and parallel layout.
/// The Python shim reads it from vLLM's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineLayout {
    /// The model path or Hugging Face id; only its last component enters keys.
    pub model: String,
    /// Tokens per KV block (vLLM's `cache_config.block_size`).
    pub block_size: usize,
    /// Tensor-parallel size and this process's rank in it (0 on the scheduler).
    pub tp_size: u32,
    pub tp_rank: u32,
    /// Pipeline-parallel size and this process's stage (0 on the scheduler).
    pub pp_size: u32,
    pub pp_rank: u32,
    /// Data-parallel rank of this engine: it names the lookup socket.
    pub dp_rank: u32,
    /// The model's total number of KV heads.
    pub num_kv_heads: u32,
    /// Multi-head latent attention: every tensor-parallel rank holds the same KV.
    pub use_mla: bool,
    /// vLLM's `kv_role`.
    pub role: KvRole,
    /// The engine's KV-cache groups (vLLM's `kv_cache_config.kv_cache_groups`), in order.
    /// Empty means one full-attention group of `block_size` tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<KvCacheGroup>,
    /// vLLM publishes KV events (`--kv-events-config '{"enable_kv_cache_events": true}'`):
    /// the connector then reports what the pool stores and loses.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub kv_events: bool,
    /// KV-cache layers of each pipeline stage, in stage order (vLLM's layer partition).
    /// Layerwise mode keys one object per layer and needs it; empty otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stage_layers: Vec<u32>,
}

impl EngineLayout {
    /// Checks the layout before anything is built on it.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::config_invalid(format!("engine layout: {what}")));
        if self.block_size == 0 {
            return bad("block_size is 0".into());
        }
        if self.tp_size == 0 || self.tp_rank >= self.tp_size {
            return bad(format!(
                "tp_rank {} is not below tp_size {}",
                self.tp_rank, self.tp_size
            ));
        }
        if self.pp_size == 0 || self.pp_rank >= self.pp_size {
            return bad(format!(
                "pp_rank {} is not below pp_size {}",
                self.pp_rank, self.pp_size
            ));
        }
        if self.num_kv_heads == 0 && !self.use_mla {
            return bad("num_kv_heads is 0".into());
        }
        for (i, g) in self.groups.iter().enumerate() {
            g.validate(i)?;
        }
        Namespace::new(&self.model, 0, 0, 0, 0).map(|_| ())
    }

    /// The KV-cache groups: `groups`, or one full-attention group of `block_size` tokens.
    pub fn kv_cache_groups(&self) -> Vec<KvCacheGroup> {
        if self.groups.is_empty() {
            vec![KvCacheGroup::full_attention(self.block_size)]
        } else {
            self.groups.clone()
        }
    }

    /// Whether the engine has more than one KV-cache group (a hybrid model).
    pub fn is_hybrid(&self) -> bool {
        self.groups.len() > 1
    }

    /// Tokens per hashed block: vLLM hashes at the greatest common divisor of the groups'
    /// block sizes (`block_size` for one group).
    pub fn hash_block_size(&self) -> usize {
        if self.groups.is_empty() {
            self.block_size
        } else {
            groups::hash_block_size(&self.groups)
        }
    }

    pub(crate) fn hash_block_size_nz(&self) -> NonZeroUsize {
        NonZeroUsize::new(self.hash_block_size()).unwrap_or(NonZeroUsize::MIN)
    }

    /// KV heads as far as key sharing goes: 1 with MLA, where every rank holds the same KV.
    fn effective_kv_heads(&self) -> u32 {
        if self.use_mla {
            1
        } else {
            self.num_kv_heads.max(1)
        }
    }

    /// How many consecutive tensor-parallel ranks hold identical KV (and share one key).
    pub fn put_step(&self) -> u32 {
        let heads = self.effective_kv_heads();
        if heads < self.tp_size {
            self.tp_size / heads
        } else {
            1
        }
    }

    /// The `head_or_tp_rank` field of this rank's keys.
    pub fn head_or_tp_rank(&self) -> u32 {
        self.tp_rank / self.put_step()
    }

    /// Whether this process ever saves: producers and `kv_both`, consumers only with
    /// `consumer_is_to_put`.
    pub fn saves(&self, consumer_is_to_put: bool) -> bool {
        self.role != KvRole::Consumer || consumer_is_to_put
    }

    /// Whether this process ever loads. As in Ascend Store, a producer (the prefill node of a
    /// P/D pair, which the seed configures as `kv_producer`) loads prefixes from the pool too:
    /// that reuse is the pool's point. A consumer loads only with `consumer_is_to_load`, since
    /// its KV normally arrives from the producer directly.
    pub fn loads(&self, consumer_is_to_load: bool) -> bool {
        self.role != KvRole::Consumer || consumer_is_to_load
    }
}

/// The namespaces a worker writes one KV-cache group under and the scheduler's lookup checks.
#[derive(Debug, Clone)]
pub struct RankKeys {
    own: Arc<Namespace>,
    all: Vec<Arc<Namespace>>,
    put_step: u32,
}

impl RankKeys {
    /// Namespaces of KV-cache group 0 for `layout` in `format`; see [`for_group`](Self::for_group).
    pub fn new(layout: &EngineLayout, format: KeyFormat) -> Result<Self> {
        Self::for_group(layout, format, 0)
    }

    /// Namespaces of KV-cache group `group` for `layout` in `format`: this rank's, and every
    /// (head_or_tp_rank, pp_rank) that stores data, which a lookup must find before it counts
    /// a block as present. As Ascend Store v0.23 infers them: the cache family is `c1` for MLA
    /// models and `default` otherwise; Mamba groups key on the raw tensor-parallel rank (each
    /// rank holds its own state, so every rank saves its blocks).
    ///
    /// # Errors
    /// `ConfigInvalid` for a hybrid layout with `v0.18` keys, which have no group field.
    pub fn for_group(layout: &EngineLayout, format: KeyFormat, group: u32) -> Result<Self> {
        if format == KeyFormat::V018 && layout.is_hybrid() {
            return Err(Error::config_invalid(format!(
                "`key_format` \"v0.18\" keys one KV-cache group, but this model has {}; \
                 hybrid models need the current format (remove `key_format`)",
                layout.groups.len()
            )));
        }
        let kind = layout
            .kv_cache_groups()
            .get(group as usize)
            .map(|g| g.kind)
            .ok_or_else(|| {
                Error::invalid_argument(format!("the engine has no KV-cache group {group}"))
            })?;
        let family = if layout.use_mla && kind != GroupKind::Mamba {
            "c1"
        } else {
            "default"
        };
        let namespace = |head: u32, pp: u32| match format {
            KeyFormat::Current => Namespace::current(&layout.model, 0, 0, head, pp, group, family),
            KeyFormat::V018 => Namespace::new(&layout.model, 0, 0, head, pp),
        };
        let (own_head, heads, put_step) = if kind == GroupKind::Mamba {
            (layout.tp_rank, layout.tp_size, 1)
        } else {
            (
                layout.head_or_tp_rank(),
                layout.tp_size.min(layout.effective_kv_heads()),
                layout.put_step(),
            )
        };
        let own = Arc::new(namespace(own_head, layout.pp_rank)?);
        let mut all = Vec::with_capacity((heads * layout.pp_size) as usize);
        for pp in 0..layout.pp_size {
            for head in 0..heads {
                all.push(Arc::new(namespace(head, pp)?));
            }
        }
        Ok(RankKeys { own, all, put_step })
    }

    /// This rank's namespace.
    pub fn own(&self) -> &Arc<Namespace> {
        &self.own
    }

    /// This rank's key for a block.
    pub fn own_key(&self, hash: BlockHash) -> BlockKey {
        BlockKey::new(self.own.clone(), hash)
    }

    /// The namespaces of every rank that stores data, pipeline stage major.
    pub fn all(&self) -> &[Arc<Namespace>] {
        &self.all
    }

    /// How many consecutive tensor-parallel ranks share this group's keys (and split its saves).
    pub fn put_step(&self) -> u32 {
        self.put_step
    }
}

/// Layerwise mode's layer count per pipeline stage, once its requirements are checked: the
/// current key format, a model with one KV-cache group, and `stage_layers` from the engine.
///
/// # Errors
/// `ConfigInvalid` naming what does not hold.
pub(crate) fn layerwise_layers(layout: &EngineLayout) -> Result<&[u32]> {
    if layout.groups.len() > 1 {
        return Err(Error::config_invalid(format!(
            "`use_layerwise` with a hybrid model ({} KV-cache groups) is not supported; \
             remove `use_layerwise`",
            layout.groups.len()
        )));
    }
    let stages = &layout.stage_layers;
    if stages.len() != layout.pp_size as usize || stages.contains(&0) {
        return Err(Error::config_invalid(format!(
            "`use_layerwise` needs the KV-cache layer count of each of the {} pipeline stages \
             (engine layout `stage_layers`), got {stages:?}",
            layout.pp_size
        )));
    }
    Ok(stages)
}

/// Checks a configuration's layerwise options against the engine.
pub(crate) fn check_layerwise(config: &Config, layout: &EngineLayout) -> Result<()> {
    if !config.connector.use_layerwise {
        return Ok(());
    }
    if config.connector.key_format != KeyFormat::Current {
        return Err(Error::config_invalid(
            "`use_layerwise` keys one object per layer, which only the current `key_format` \
             spells; remove `key_format`",
        ));
    }
    layerwise_layers(layout).map(|_| ())
}
