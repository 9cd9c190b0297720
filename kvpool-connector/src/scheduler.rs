//! The scheduler half: hit lookup, load planning, save planning, delayed block free.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use crate::groups::{self, GroupKind, KvCacheGroup};
use crate::lookup::{socket_path_from_env, LookupClient};
use crate::meta::{LoadPlan, SavePlan, StepMeta};
use crate::EngineLayout;
use kvpool_core::config::{Config, HashingMode};
use kvpool_core::error::{Error, Result};
use kvpool_core::hash::extend_token_block_hashes;
use kvpool_core::key::BlockHash;

/// A waiting request, as `get_num_new_matched_tokens` sees it.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    /// vLLM's request id.
    pub req_id: &'a str,
    /// The prompt's token ids.
    pub prompt_token_ids: &'a [u32],
    /// vLLM's `request.block_hashes` (`hash_mode = "vllm"`; ignored in `tokens` mode).
    pub block_hashes: &'a [BlockHash],
    /// `request.num_tokens`: prompt plus tokens generated so far.
    pub num_tokens: usize,
    /// The LoRA adapter name, which enters every block hash in `tokens` mode.
    pub lora_name: Option<&'a str>,
    /// `request.cache_salt`, which enters the first block hash in `tokens` mode.
    pub cache_salt: Option<&'a str>,
}

/// A request scheduled for the first time in this step (`scheduled_new_reqs`).
#[derive(Debug, Clone, Default)]
pub struct NewRequest {
    pub req_id: String,
    pub prompt_token_ids: Vec<u32>,
    /// vLLM's block hashes (`hash_mode = "vllm"`).
    pub block_hashes: Vec<BlockHash>,
    /// The request's blocks, per KV-cache group (vLLM's null block, 0, where a group keeps
    /// none).
    pub block_ids: Vec<Vec<u32>>,
    pub num_computed_tokens: usize,
    pub num_scheduled_tokens: usize,
    pub lora_name: Option<String>,
    pub cache_salt: Option<String>,
}

/// A request that ran before (`scheduled_cached_reqs`).
#[derive(Debug, Clone, Default)]
pub struct CachedRequest {
    pub req_id: String,
    /// Resumed after preemption: `new_block_ids` is then its whole block list.
    pub resumed_from_preemption: bool,
    /// Blocks added in this step, per KV-cache group (empty if none).
    pub new_block_ids: Vec<Vec<u32>>,
    pub num_computed_tokens: usize,
    pub num_scheduled_tokens: usize,
    /// All token ids so far; needed only with `save_decode_cache`, else empty.
    pub all_token_ids: Vec<u32>,
    /// vLLM's block hashes so far (`hash_mode = "vllm"`), else empty.
    pub block_hashes: Vec<BlockHash>,
}

/// A state block vLLM hands the connector in a step: vLLM 0.33's
/// `SchedulerOutput.kv_connector_block_state.boundary_state_offloads`, one entry
/// `(group_id, block_id, boundary_tokens)` of a request. Only Mamba "align" groups have them:
/// block `block_id` holds the request's state after exactly `boundary_tokens` tokens once the
/// step's forward (and the copy-on-write copies vLLM queues before it) ran. That is not always
/// a block at the end of the step: vLLM's Mamba2 and GDN layers export the prompt's last
/// cacheable boundary from inside the final prefill chunk into a reserved block (a prefill
/// checkpoint). vLLM keeps the block only until the step ends (it may free or hand it on at
/// the next schedule), so it is read within the step, as every Mamba save is. The values are
/// as vLLM gave them; [`SchedulerConnector::build_connector_meta`] checks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoundaryState {
    pub req_id: String,
    /// vLLM's KV-cache group index.
    pub group: i64,
    pub block_id: i64,
    /// The tokens of the request the state is after.
    pub boundary_tokens: i64,
}

/// The parts of vLLM's `SchedulerOutput` the connector reads.
#[derive(Debug, Clone, Default)]
pub struct StepInput {
    pub new_requests: Vec<NewRequest>,
    pub cached_requests: Vec<CachedRequest>,
    pub finished_req_ids: Vec<String>,
    pub preempted_req_ids: Vec<String>,
    /// Boundary states vLLM hands over in this step (Mamba "align" groups).
    pub boundary_states: Vec<BoundaryState>,
}

#[derive(Debug, Clone)]
struct LoadSpec {
    /// Tokens the engine's own prefix cache already held.
    vllm_cached: usize,
    /// Tokens the pool holds (after the "compute the last token" rule).
    pool_cached: usize,
    /// Set once vLLM allocated the blocks.
    can_load: bool,
    /// Per KV-cache group.
    block_ids: Vec<Vec<u32>>,
    is_async: bool,
}

#[derive(Debug)]
struct Tracker {
    /// vLLM's block hashes (at the hash block size).
    hashes: Vec<BlockHash>,
    /// Per KV-cache group.
    block_ids: Vec<Vec<u32>>,
    prompt_len: usize,
    /// Tokens computed once the last step planned for the request ends.
    computed: usize,
    /// The request's tokens so far, kept only for KV events (their `token_ids`).
    token_ids: Vec<u32>,
    /// Per KV-cache group: blocks handed to the workers for saving (or found in the pool).
    saved_blocks: Vec<usize>,
    lora_name: Option<String>,
    cache_salt: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Hashes computed during lookup, kept until the request is tracked or finished.
    lookup_hashes: HashMap<String, Vec<BlockHash>>,
    load_specs: HashMap<String, LoadSpec>,
    trackers: HashMap<String, Tracker>,
    /// Requests with saves handed to workers: freeing their blocks waits for `finished_sending`.
    saving: HashSet<String>,
    /// Requests whose async load is in flight.
    loading: HashSet<String>,
    /// Destination blocks of each load handed to workers, until the request finishes.
    load_blocks: HashMap<String, Vec<u32>>,
    /// Requests with a failed load: they are computed, never offered the pool again (after a
    /// failed async load vLLM asks again, and offering the same blocks would loop).
    load_failed: HashSet<String>,
    /// Finished requests with saves whose free was not delayed, for the next plan's `forget`.
    forget: Vec<String>,
}

/// The scheduler half of the connector.
#[derive(Debug)]
pub struct SchedulerConnector {
    layout: EngineLayout,
    groups: Vec<KvCacheGroup>,
    hash_mode: HashingMode,
    load_async: bool,
    discard_partial_chunks: bool,
    save_decode_cache: bool,
    saves: bool,
    loads: bool,
    /// Save plans carry what vLLM's KV events need (parent hash, tokens, LoRA).
    kv_events: bool,
    lookup: Mutex<LookupClient>,
    state: Mutex<State>,
}

impl SchedulerConnector {
    /// The scheduler half for `config` and the engine `layout`.
    ///
    /// # Errors
    /// `ConfigInvalid` for a malformed layout, or `use_layerwise` where it cannot work (a
    /// hybrid model, the v0.18 key format, no layer counts).
    pub fn new(config: &Config, layout: EngineLayout) -> Result<SchedulerConnector> {
        layout.validate()?;
        let c = &config.connector;
        // Keys are checked here too, so a bad combination fails at start-up in the scheduler.
        crate::RankKeys::for_group(&layout, c.key_format, 0)?;
        crate::check_layerwise(config, &layout)?;
        let path = socket_path_from_env(c.lookup_rpc_port, layout.dp_rank);
        let timeout = Duration::from_millis(u64::from(c.lookup_timeout_ms.max(1)));
        Ok(SchedulerConnector {
            hash_mode: config.hash_mode,
            // Layerwise loads overlap the forward of their own step: never asynchronous.
            load_async: c.load_async && !c.use_layerwise,
            discard_partial_chunks: c.discard_partial_chunks,
            save_decode_cache: c.save_decode_cache,
            saves: layout.saves(c.consumer_is_to_put),
            loads: layout.loads(c.consumer_is_to_load),
            kv_events: layout.kv_events,
            lookup: Mutex::new(LookupClient::new(path, timeout)),
            state: Mutex::new(State::default()),
            groups: layout.kv_cache_groups(),
            layout,
        })
    }

    /// Whether the engine must pass `all_token_ids` (tokens mode) or the block hashes of
    /// running requests: only when decode blocks are saved too.
    pub fn needs_running_tokens(&self) -> bool {
        self.saves && self.save_decode_cache
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping the engine would; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hashes_for(&self, req: &RequestInfo<'_>, full_blocks: usize) -> Result<Vec<BlockHash>> {
        match self.hash_mode {
            HashingMode::Vllm => {
                if req.block_hashes.len() < full_blocks {
                    return Err(Error::invalid_argument(format!(
                        "request {:?} has {} block hashes for {full_blocks} full blocks; \
                         hash_mode \"vllm\" needs vLLM's prefix-caching hashes",
                        req.req_id,
                        req.block_hashes.len()
                    )));
                }
                let hashes = req.block_hashes[..full_blocks].to_vec();
                // Kept for an async load, whose plan is emitted when the request is not
                // scheduled (and so not described) in the step.
                self.lock()
                    .lookup_hashes
                    .insert(req.req_id.to_string(), hashes.clone());
                Ok(hashes)
            }
            HashingMode::Tokens => {
                let mut state = self.lock();
                let hashes = state
                    .lookup_hashes
                    .entry(req.req_id.to_string())
                    .or_default();
                extend_token_block_hashes(
                    hashes,
                    req.prompt_token_ids,
                    self.layout.hash_block_size_nz(),
                    req.lora_name,
                    req.cache_salt,
                );
                Ok(hashes[..full_blocks.min(hashes.len())].to_vec())
            }
        }
    }

    /// vLLM's `get_num_new_matched_tokens`: how many tokens beyond `num_computed_tokens` the
    /// pool can supply, and whether they load asynchronously.
    ///
    /// A lookup that fails or times out counts as a miss (and is logged): the request is
    /// computed, never stalled.
    pub fn get_num_new_matched_tokens(
        &self,
        req: &RequestInfo<'_>,
        num_computed_tokens: usize,
    ) -> (usize, bool) {
        if !self.loads || self.lock().load_failed.contains(req.req_id) {
            return (0, false);
        }
        let b = self.layout.hash_block_size();
        let prompt_len = req.prompt_token_ids.len();
        let mut token_len = if self.discard_partial_chunks {
            prompt_len / b * b
        } else {
            prompt_len
        };
        let align = groups::alignment_tokens(&self.groups);
        if self.layout.is_hybrid() || self.groups.iter().any(|g| g.blocks_are_volatile()) {
            // vLLM computes at least the last token, and every group's blocks must end where
            // the hit ends: Mamba state is exact only at its block's end, so "one token less
            // than a full hit" (below) would replay a token. Look up whole aligned blocks short
            // of the last token instead, as vLLM's own prefix cache does.
            token_len = token_len.min(req.num_tokens.saturating_sub(1)) / align * align;
        }
        if token_len < align.max(b) || num_computed_tokens >= token_len {
            return (0, false);
        }
        let hashes = match self.hashes_for(req, prompt_len / b) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(req = req.req_id, error = %e, "lookup skipped");
                return (0, false);
            }
        };
        let hashes = &hashes[..token_len.div_ceil(b).min(hashes.len())];
        let result = self
            .lookup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .lookup(token_len.min(hashes.len() * b), hashes);
        let mut hit = match result {
            Ok(hit) => hit.min(token_len),
            Err(e) => {
                tracing::warn!(req = req.req_id, error = %e, "lookup failed; treating as a miss");
                return (0, false);
            }
        };
        // vLLM must compute at least one token to produce logits.
        if hit == req.num_tokens {
            hit -= 1;
        }
        if hit <= num_computed_tokens {
            return (0, false);
        }
        let need = hit - num_computed_tokens;
        // vLLM 0.33 takes load failures of a model with several KV-cache groups only as
        // failed asynchronous receives (block ids do not name a request there), so hybrid
        // models always load asynchronously: a failed load is then recomputed, never used.
        let is_async = self.load_async || self.layout.is_hybrid();
        self.lock().load_specs.insert(
            req.req_id.to_string(),
            LoadSpec {
                vllm_cached: num_computed_tokens,
                pool_cached: hit,
                can_load: false,
                block_ids: Vec::new(),
                is_async,
            },
        );
        (need, is_async)
    }

    /// vLLM's `update_state_after_alloc`: the blocks the request got, and how many external
    /// tokens vLLM accepted.
    pub fn update_state_after_alloc(
        &self,
        req_id: &str,
        block_ids: Vec<Vec<u32>>,
        num_external_tokens: usize,
    ) {
        let mut state = self.lock();
        if num_external_tokens == 0 {
            // MultiConnector tells the children it did not choose with 0 tokens; an async
            // request is also told twice. Only a spec not yet armed is dropped.
            if state.load_specs.get(req_id).is_some_and(|s| !s.can_load) {
                state.load_specs.remove(req_id);
            }
            return;
        }
        let Some(spec) = state.load_specs.get_mut(req_id) else {
            tracing::warn!(
                req = req_id,
                "allocation for a load kvpool did not offer; ignored"
            );
            return;
        };
        if num_external_tokens != spec.pool_cached - spec.vllm_cached {
            tracing::warn!(
                req = req_id,
                offered = spec.pool_cached - spec.vllm_cached,
                accepted = num_external_tokens,
                "vLLM accepted a different number of external tokens; not loading"
            );
            state.load_specs.remove(req_id);
            return;
        }
        spec.can_load = true;
        spec.block_ids = block_ids;
    }

    /// One plan for every group's blocks of the hit that vLLM does not hold already: all of
    /// them for full attention, the window's blocks before the hit's end for sliding-window
    /// groups, the block at the end for Mamba. Null blocks (id 0) are never loaded.
    fn load_plan(&self, req_id: &str, spec: &LoadSpec, hashes: &[BlockHash]) -> Option<LoadPlan> {
        let hash_bs = self.layout.hash_block_size();
        let hybrid = self.layout.is_hybrid();
        let mut plan = LoadPlan {
            req_id: req_id.to_string(),
            block_ids: Vec::new(),
            hashes: String::new(),
            is_async: spec.is_async,
            groups: Vec::new(),
        };
        for (g, group) in self.groups.iter().enumerate() {
            let bs = group.block_size;
            let first = spec.vllm_cached / bs;
            let end = spec.pool_cached.div_ceil(bs);
            let covered = hashes.len() / group.hashes_per_block(hash_bs);
            let blocks = spec.block_ids.get(g).map_or(&[][..], Vec::as_slice);
            if end > covered || end > blocks.len() || first >= end {
                tracing::warn!(
                    req = req_id,
                    group = g,
                    "load plan does not match the request's blocks; skipped"
                );
                return None;
            }
            for i in group.load_range(first, end) {
                if blocks[i] == 0 {
                    continue;
                }
                let hash = group.key_hash(hashes, hash_bs, i)?;
                plan.block_ids.push(blocks[i]);
                plan.hashes.push_str(&hash.to_hex());
                if hybrid {
                    plan.groups.push(g as u32);
                }
            }
        }
        Some(plan)
    }

    /// An empty save plan of `req_id`'s blocks of group `g` from block `first` on, with the
    /// details KV events need.
    fn save_plan(&self, req_id: &str, t: &Tracker, g: usize, first: usize) -> SavePlan {
        let mut plan = SavePlan {
            req_id: req_id.to_string(),
            first_block: first as u32,
            group: g as u32,
            ..SavePlan::default()
        };
        if self.kv_events {
            let hash_bs = self.layout.hash_block_size();
            plan.parent = first
                .checked_sub(1)
                .and_then(|p| self.groups[g].key_hash(&t.hashes, hash_bs, p))
                .map(|h| h.to_hex());
            plan.lora_name = t.lora_name.clone();
        }
        plan
    }

    /// The save of a boundary state vLLM handed over (see [`BoundaryState`]): its exact block
    /// under the key of the block ending at its boundary, replacing this step's save of that
    /// block (a step ending there) if any. Not saved, and logged: a request this connector
    /// does not track (finished, preempted, resumed), vLLM's null block, a boundary past the
    /// prompt (as vLLM's `MooncakeStoreConnector`: the other groups are saved only up to it,
    /// unless `save_decode_cache`, which saves decode states at step ends) or past the tokens
    /// computed by this step, and one no hit of kvpool's ends on.
    fn boundary_save(&self, state: &mut State, saves: &mut Vec<SavePlan>, offer: &BoundaryState) {
        let req = offer.req_id.as_str();
        let skip = |why: &dyn std::fmt::Display| {
            tracing::debug!(
                req,
                group = offer.group,
                block = offer.block_id,
                boundary = offer.boundary_tokens,
                "boundary state not saved: {why}"
            );
        };
        let warn = |why: &dyn std::fmt::Display| {
            tracing::warn!(
                req,
                group = offer.group,
                block = offer.block_id,
                boundary = offer.boundary_tokens,
                "boundary state from vLLM not saved: {why}"
            );
        };
        let index =
            match groups::boundary_state_block(&self.groups, offer.group, offer.boundary_tokens) {
                Ok(i) => i,
                Err(
                    e @ (groups::BoundarySkip::OffBlock { .. }
                    | groups::BoundarySkip::Unaligned { .. }),
                ) => return skip(&e),
                Err(e) => return warn(&e),
            };
        let (g, boundary) = (offer.group as usize, offer.boundary_tokens as usize);
        let block_id = match u32::try_from(offer.block_id) {
            Ok(0) => return warn(&"it is vLLM's null block"),
            Ok(b) => b,
            Err(_) => return warn(&"the block id is not one of vLLM's"),
        };
        let Some(t) = state.trackers.get_mut(req) else {
            return skip(&"the request is not tracked (finished, preempted or resumed)");
        };
        if boundary > t.prompt_len {
            return skip(&format_args!("past the prompt's {} tokens", t.prompt_len));
        }
        if boundary > t.computed {
            return warn(&format_args!(
                "past the {} tokens computed by this step",
                t.computed
            ));
        }
        let hash_bs = self.layout.hash_block_size();
        let Some(hash) = self.groups[g].key_hash(&t.hashes, hash_bs, index) else {
            return warn(&format_args!("no block hash covers {boundary} tokens"));
        };
        let mut plan = self.save_plan(req, t, g, index);
        plan.block_ids.push(block_id);
        plan.hashes.push_str(&hash.to_hex());
        if self.kv_events {
            let bs = self.groups[g].block_size;
            if let Some(tokens) = t.token_ids.get(index * bs..(index + 1) * bs) {
                plan.token_ids.extend_from_slice(tokens);
            }
        }
        // Later positional saves of the group start past this block.
        t.saved_blocks[g] = t.saved_blocks[g].max(index + 1);
        let same_block = |p: &SavePlan| {
            p.req_id == req && p.group as usize == g && p.first_block as usize == index
        };
        if let Some(old) = saves.iter().find(|p| same_block(p)) {
            if old.block_ids != plan.block_ids {
                tracing::debug!(
                    req,
                    group = g,
                    index,
                    step_end = ?old.block_ids,
                    handed_over = block_id,
                    "boundary state replaces this step's save of the block"
                );
            }
        }
        saves.retain(|p| !same_block(p));
        saves.push(plan);
        state.saving.insert(offer.req_id.clone());
    }

    /// The blocks of every group completed since the last save plan, in runs of non-null
    /// blocks. Mamba groups save only the state block ending exactly at `token_len`: a block
    /// holds the state after its last token only at the end of the step that computed it.
    fn save_plans(&self, req_id: &str, t: &mut Tracker, token_len: usize) -> Vec<SavePlan> {
        let mut plans = Vec::new();
        if !self.saves {
            return plans;
        }
        let limit = if self.save_decode_cache {
            token_len
        } else {
            token_len.min(t.prompt_len)
        };
        let hash_bs = self.layout.hash_block_size();
        for (g, group) in self.groups.iter().enumerate() {
            let bs = group.block_size;
            let per_key = group.hashes_per_block(hash_bs);
            let ids = t.block_ids.get(g).map_or(&[][..], Vec::as_slice);
            let blocks = (limit / bs).min(t.hashes.len() / per_key).min(ids.len());
            let first = t.saved_blocks[g];
            if blocks <= first {
                continue;
            }
            t.saved_blocks[g] = blocks;
            let wanted = if group.kind == GroupKind::Mamba {
                let last = blocks - 1;
                if token_len % bs == 0 && token_len / bs == blocks {
                    last..blocks
                } else {
                    blocks..blocks
                }
            } else {
                first..blocks
            };
            let mut run: Option<SavePlan> = None;
            for i in wanted {
                if ids[i] == 0 {
                    plans.extend(run.take());
                    continue;
                }
                let plan = run.get_or_insert_with(|| self.save_plan(req_id, t, g, i));
                // `blocks` is bounded by the hashes, so every block here has one.
                let Some(hash) = group.key_hash(&t.hashes, hash_bs, i) else {
                    break;
                };
                plan.block_ids.push(ids[i]);
                plan.hashes.push_str(&hash.to_hex());
                if self.kv_events {
                    // All or nothing per plan, so the worker's slicing by block stays aligned.
                    match t.token_ids.get(i * bs..(i + 1) * bs) {
                        Some(tokens) if plan.token_ids.len() == (plan.block_ids.len() - 1) * bs => {
                            plan.token_ids.extend_from_slice(tokens)
                        }
                        _ => plan.token_ids.clear(),
                    }
                }
            }
            plans.extend(run);
        }
        plans
    }

    /// vLLM's `build_connector_meta`: this step's loads and saves, encoded for the workers.
    pub fn build_connector_meta(&self, step: StepInput) -> Vec<u8> {
        let mut meta = StepMeta::default();
        let mut state = self.lock();
        for id in &step.finished_req_ids {
            state.trackers.remove(id);
            state.load_specs.remove(id);
            state.lookup_hashes.remove(id);
        }
        for id in &step.preempted_req_ids {
            state.trackers.remove(id);
        }
        meta.preempted = step.preempted_req_ids.clone();
        meta.forget = std::mem::take(&mut state.forget);

        for req in step.new_requests {
            let hashes = match self.hash_mode {
                HashingMode::Vllm => req.block_hashes,
                HashingMode::Tokens => {
                    let mut h = state.lookup_hashes.remove(&req.req_id).unwrap_or_default();
                    extend_token_block_hashes(
                        &mut h,
                        &req.prompt_token_ids,
                        self.layout.hash_block_size_nz(),
                        req.lora_name.as_deref(),
                        req.cache_salt.as_deref(),
                    );
                    h
                }
            };
            // Blocks the lookup found are in the pool already: saving starts after them.
            let mut present_tokens = 0;
            let block_ids = self.per_group(req.block_ids);
            if let Some(spec) = state.load_specs.remove(&req.req_id) {
                if spec.can_load {
                    let spec = LoadSpec {
                        block_ids: block_ids.clone(),
                        ..spec
                    };
                    if let Some(plan) = self.load_plan(&req.req_id, &spec, &hashes) {
                        present_tokens = spec.pool_cached;
                        state
                            .load_blocks
                            .insert(req.req_id.clone(), plan.block_ids.clone());
                        meta.loads.push(plan);
                    }
                }
            }
            let token_len = req.num_computed_tokens + req.num_scheduled_tokens;
            let mut tracker = Tracker {
                hashes,
                block_ids,
                prompt_len: req.prompt_token_ids.len(),
                computed: token_len,
                token_ids: if self.kv_events {
                    req.prompt_token_ids.clone()
                } else {
                    Vec::new()
                },
                saved_blocks: self
                    .groups
                    .iter()
                    .map(|g| present_tokens / g.block_size)
                    .collect(),
                lora_name: req.lora_name,
                cache_salt: req.cache_salt,
            };
            let saves = self.save_plans(&req.req_id, &mut tracker, token_len);
            if !saves.is_empty() {
                state.saving.insert(req.req_id.clone());
                meta.saves.extend(saves);
            }
            state.trackers.insert(req.req_id, tracker);
        }

        for req in step.cached_requests {
            let token_len = req.num_computed_tokens + req.num_scheduled_tokens;
            let Some(tracker) = state.trackers.get_mut(&req.req_id) else {
                if req.resumed_from_preemption {
                    tracing::debug!(req = req.req_id.as_str(), "resumed request not re-tracked");
                }
                continue;
            };
            let new_block_ids = self.per_group(req.new_block_ids);
            tracker.computed = token_len;
            if req.resumed_from_preemption {
                tracker.block_ids = new_block_ids;
                tracker.saved_blocks.iter_mut().for_each(|n| *n = 0);
            } else {
                for (ids, new) in tracker.block_ids.iter_mut().zip(new_block_ids) {
                    ids.extend(new);
                }
            }
            match self.hash_mode {
                HashingMode::Vllm if req.block_hashes.len() > tracker.hashes.len() => {
                    tracker.hashes = req.block_hashes;
                }
                HashingMode::Tokens if !req.all_token_ids.is_empty() => {
                    let (lora, salt) = (tracker.lora_name.clone(), tracker.cache_salt.clone());
                    extend_token_block_hashes(
                        &mut tracker.hashes,
                        &req.all_token_ids,
                        self.layout.hash_block_size_nz(),
                        lora.as_deref(),
                        salt.as_deref(),
                    );
                }
                _ => {}
            }
            if self.kv_events && req.all_token_ids.len() > tracker.token_ids.len() {
                tracker.token_ids = req.all_token_ids;
            }
            let req_id = req.req_id;
            let saves = {
                let tracker = state.trackers.get_mut(&req_id).expect("looked up above");
                self.save_plans(&req_id, tracker, token_len)
            };
            if !saves.is_empty() {
                state.saving.insert(req_id);
                meta.saves.extend(saves);
            }
        }

        if self.saves {
            for offer in &step.boundary_states {
                self.boundary_save(&mut state, &mut meta.saves, offer);
            }
        }

        // Async loads: the request waits in WAITING_FOR_REMOTE_KVS and is not scheduled, so
        // its load is emitted from the armed spec.
        let armed: Vec<String> = state
            .load_specs
            .iter()
            .filter(|(_, s)| s.can_load && s.is_async)
            .map(|(id, _)| id.clone())
            .collect();
        for id in armed {
            let spec = state.load_specs.remove(&id).expect("listed above");
            let hashes = state.lookup_hashes.get(&id).cloned().unwrap_or_default();
            if let Some(plan) = self.load_plan(&id, &spec, &hashes) {
                state.load_blocks.insert(id.clone(), plan.block_ids.clone());
                state.loading.insert(id);
                meta.loads.push(plan);
            }
        }
        meta.encode()
    }

    /// Block ids per group as this connector keeps them: one list per group (vLLM passes a
    /// list per group; a missing group has no blocks).
    fn per_group(&self, mut block_ids: Vec<Vec<u32>>) -> Vec<Vec<u32>> {
        block_ids.resize(self.groups.len(), Vec::new());
        block_ids
    }

    /// vLLM's `request_finished_all_groups` (hybrid models; vLLM calls it instead of
    /// `request_finished` for a connector that supports HMA): as
    /// [`request_finished`](Self::request_finished), with the request's blocks per group
    /// (null blocks, id 0, are not the request's).
    pub fn request_finished_all_groups(&self, req_id: &str, block_ids: &[Vec<u32>]) -> bool {
        let held = block_ids.iter().flatten().filter(|&&b| b != 0).count();
        self.request_finished(req_id, held)
    }

    /// vLLM's `request_finished`: whether freeing the request's blocks must wait for the
    /// workers' `finished_sending` (a save of them may still be in flight).
    pub fn request_finished(&self, req_id: &str, num_blocks: usize) -> bool {
        let mut state = self.lock();
        state.load_specs.remove(req_id);
        state.lookup_hashes.remove(req_id);
        state.trackers.remove(req_id);
        state.loading.remove(req_id);
        state.load_blocks.remove(req_id);
        state.load_failed.remove(req_id);
        let delay = state.saving.contains(req_id) && num_blocks > 0;
        if !delay && state.saving.remove(req_id) {
            state.forget.push(req_id.to_string());
        }
        delay
    }

    /// vLLM's `update_connector_output`: transfers the workers finished, blocks whose load
    /// failed, and requests whose load failed (hybrid models).
    pub fn update_connector_output(
        &self,
        finished_sending: &[String],
        finished_recving: &[String],
        invalid_block_ids: &[u32],
        failed_recving: &[String],
    ) {
        let mut state = self.lock();
        for id in finished_sending {
            state.saving.remove(id);
        }
        for id in failed_recving {
            tracing::warn!(
                req = id.as_str(),
                "kvpool load failed; the request is recomputed"
            );
            state.load_blocks.remove(id);
            state.load_failed.insert(id.clone());
        }
        if !invalid_block_ids.is_empty() {
            let invalid: HashSet<u32> = invalid_block_ids.iter().copied().collect();
            let failed: Vec<String> = state
                .load_blocks
                .iter()
                .filter(|(_, blocks)| blocks.iter().any(|b| invalid.contains(b)))
                .map(|(id, _)| id.clone())
                .collect();
            for id in failed {
                tracing::warn!(
                    req = id.as_str(),
                    "kvpool load failed; the request is recomputed"
                );
                // vLLM recomputes from the first failed block: save from there again, so the
                // pool gets back what it lost.
                if let Some(t) = state.trackers.get_mut(&id) {
                    for (ids, saved) in t.block_ids.iter().zip(t.saved_blocks.iter_mut()) {
                        if let Some(first) = ids.iter().position(|b| invalid.contains(b)) {
                            *saved = (*saved).min(first);
                        }
                    }
                }
                state.load_blocks.remove(&id);
                state.load_failed.insert(id);
            }
        }
        for id in finished_recving {
            state.loading.remove(id);
        }
    }

    /// vLLM's `reset_cache`: asks worker rank 0 to clear the pool (what
    /// `reset_clears_shared_pool` puts in scope). vLLM calls it with generation paused; a load
    /// already planned of a block the reset removed fails and is recomputed, as any miss.
    /// `false` (vLLM then reports the reset failed) when the worker could not be reached or
    /// its backend could not be cleared.
    pub fn reset_cache(&self) -> bool {
        let result = self
            .lookup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reset();
        match result {
            Ok(cleared) => {
                tracing::info!(cleared, "kvpool reset the pool");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "kvpool could not reset the pool");
                false
            }
        }
    }

    /// Requests with any state held: the number must return to 0 once the engine is idle.
    pub fn tracked_requests(&self) -> usize {
        let state = self.lock();
        let mut ids: HashSet<&String> = state.trackers.keys().collect();
        ids.extend(state.load_specs.keys());
        ids.extend(state.lookup_hashes.keys());
        ids.extend(state.saving.iter());
        ids.extend(state.loading.iter());
        ids.extend(state.load_blocks.keys());
        ids.extend(state.load_failed.iter());
        ids.extend(state.forget.iter());
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use super::*;
    use crate::KvRole;
    use kvpool_core::hash::token_block_hashes;

    const BS: usize = 16;

    /// A scheduler half of a full-attention + Mamba model (16-token attention blocks).
    fn mamba_scheduler(mamba_block: usize, role: KvRole) -> SchedulerConnector {
        let json = serde_json::json!({"backend": "memory", "lookup_rpc_port": 7});
        let config = Config::from_extra_config(json).unwrap();
        let layout = EngineLayout {
            model: "/models/m".into(),
            block_size: BS,
            tp_size: 1,
            tp_rank: 0,
            pp_size: 1,
            pp_rank: 0,
            dp_rank: 0,
            num_kv_heads: 2,
            use_mla: false,
            role,
            groups: vec![
                KvCacheGroup::full_attention(BS),
                KvCacheGroup {
                    kind: GroupKind::Mamba,
                    block_size: mamba_block,
                },
            ],
            kv_events: false,
            stage_layers: vec![],
        };
        SchedulerConnector::new(&config, layout).unwrap()
    }

    fn tokens(n: u32) -> Vec<u32> {
        (0..n).map(|i| i * 37 % 40000 + 5).collect()
    }

    fn offer(req: &str, group: i64, block: i64, boundary: i64) -> BoundaryState {
        BoundaryState {
            req_id: req.into(),
            group,
            block_id: block,
            boundary_tokens: boundary,
        }
    }

    /// Request "a" scheduled for the first time: `computed..computed + scheduled` of `prompt`,
    /// with `mamba` as its Mamba block table.
    fn first_step(prompt: &[u32], scheduled: usize, mamba: Vec<u32>) -> NewRequest {
        NewRequest {
            req_id: "a".into(),
            prompt_token_ids: prompt.to_vec(),
            block_ids: vec![(1..=prompt.len().div_ceil(BS) as u32).collect(), mamba],
            num_computed_tokens: 0,
            num_scheduled_tokens: scheduled,
            ..NewRequest::default()
        }
    }

    /// The step's saves of group `g`: (first block, block ids, hashes).
    fn saves_of(meta: &[u8], g: u32) -> Vec<(u32, Vec<u32>, Vec<BlockHash>)> {
        let meta = StepMeta::decode(meta).unwrap();
        meta.saves
            .iter()
            .filter(|p| p.group == g)
            .map(|p| {
                let hashes = crate::meta::decode_hashes(&p.hashes, p.block_ids.len(), "a");
                (p.first_block, p.block_ids.clone(), hashes.unwrap())
            })
            .collect()
    }

    #[test]
    fn a_handed_over_state_is_saved_under_the_key_of_the_block_ending_at_it() {
        let sched = mamba_scheduler(BS, KvRole::Both);
        let prompt = tokens(160);
        let hashes = token_block_hashes(&prompt, NonZeroUsize::new(BS).unwrap(), None, None);
        // One 160-token step: the state after 160 tokens is at the step's end (block 12, index
        // 9); vLLM's prefill checkpoint puts the one after 144 into block 11 (index 8).
        let mut mamba = vec![0; 8];
        mamba.extend([11, 12]);
        let meta = sched.build_connector_meta(StepInput {
            new_requests: vec![first_step(&prompt, 160, mamba)],
            boundary_states: vec![offer("a", 1, 11, 144), offer("a", 1, 12, 160)],
            ..StepInput::default()
        });
        assert_eq!(saves_of(&meta, 0).len(), 1);
        assert_eq!(saves_of(&meta, 0)[0].1, (1..=10).collect::<Vec<u32>>());
        let mut mamba_saves = saves_of(&meta, 1);
        mamba_saves.sort();
        assert_eq!(
            mamba_saves,
            vec![
                (8, vec![11], vec![hashes[8]]),
                (9, vec![12], vec![hashes[9]])
            ],
            "the step's end and the checkpoint, each once"
        );
        // Freeing the request's blocks waits for the saves.
        assert!(sched.request_finished_all_groups("a", &[vec![1], vec![11, 12]]));
        sched.update_connector_output(&["a".into()], &[], &[], &[]);
        assert_eq!(sched.tracked_requests(), 0);
    }

    #[test]
    fn the_handed_over_block_replaces_a_positional_save_of_the_same_state() {
        let sched = mamba_scheduler(BS, KvRole::Both);
        let prompt = tokens(160);
        // A chunk ending at 64: the table says block 13 holds the state there, vLLM hands over
        // block 14 for it. vLLM's block is the one saved.
        let meta = sched.build_connector_meta(StepInput {
            new_requests: vec![first_step(&prompt, 64, vec![0, 0, 0, 13])],
            boundary_states: vec![offer("a", 1, 14, 64)],
            ..StepInput::default()
        });
        let saves = saves_of(&meta, 1);
        assert_eq!(saves.len(), 1);
        assert_eq!((saves[0].0, saves[0].1.clone()), (3, vec![14]));
        // A later step saves only the state at its own end.
        let meta = sched.build_connector_meta(StepInput {
            cached_requests: vec![CachedRequest {
                req_id: "a".into(),
                new_block_ids: vec![vec![], vec![15]],
                num_computed_tokens: 64,
                num_scheduled_tokens: 16,
                ..CachedRequest::default()
            }],
            ..StepInput::default()
        });
        let saves = saves_of(&meta, 1);
        assert_eq!(saves.len(), 1);
        assert_eq!((saves[0].0, saves[0].1.clone()), (4, vec![15]));
        sched.request_finished_all_groups("a", &[vec![1], vec![15]]);
    }

    #[test]
    fn states_no_hit_could_use_or_that_are_not_the_requests_are_not_saved() {
        let sched = mamba_scheduler(BS, KvRole::Both);
        let prompt = tokens(150);
        // A 64-token chunk of a 150-token prompt; its own step end (64) is saved.
        let new = first_step(&prompt, 64, vec![0, 0, 0, 13]);
        let offers = vec![
            offer("a", 1, 0, 48),       // vLLM's null block
            offer("a", 1, 20, 160),     // past the prompt (150 tokens)
            offer("a", 1, 21, 96),      // past what this step computed (64)
            offer("a", 1, 22, 40),      // not on a block boundary
            offer("a", 0, 23, 32),      // not a Mamba group
            offer("a", 2, 24, 32),      // no such group
            offer("a", -1, 25, 32),     // nor this
            offer("a", 1, 26, 0),       // no tokens
            offer("a", 1, 27, -16),     // nor this
            offer("a", 1, -5, 32),      // not a block id
            offer("a", 1, 1 << 40, 32), // nor this
            offer("b", 1, 28, 32),      // a request not tracked
        ];
        let meta = sched.build_connector_meta(StepInput {
            new_requests: vec![new],
            boundary_states: offers,
            ..StepInput::default()
        });
        let saves = saves_of(&meta, 1);
        assert_eq!(saves.len(), 1, "{saves:?}");
        assert_eq!((saves[0].0, saves[0].1.clone()), (3, vec![13]));
        assert_eq!(saves_of(&meta, 0).len(), 1);
        sched.request_finished_all_groups("a", &[vec![1], vec![13]]);
        sched.update_connector_output(&["a".into()], &[], &[], &[]);
        assert_eq!(sched.tracked_requests(), 0);
    }

    #[test]
    fn sub_block_states_are_not_saved_and_instances_that_do_not_save_ignore_them() {
        // 64-token Mamba blocks: vLLM's finer hashes hand over a state inside a block (144).
        let sched = mamba_scheduler(64, KvRole::Both);
        let prompt = tokens(160);
        let meta = sched.build_connector_meta(StepInput {
            new_requests: vec![first_step(&prompt, 144, vec![0, 11, 12])],
            boundary_states: vec![offer("a", 1, 13, 144), offer("a", 1, 11, 128)],
            ..StepInput::default()
        });
        let hashes = token_block_hashes(&prompt, NonZeroUsize::new(BS).unwrap(), None, None);
        let key = KvCacheGroup {
            kind: GroupKind::Mamba,
            block_size: 64,
        }
        .key_hash(&hashes, BS, 1)
        .unwrap();
        assert_eq!(saves_of(&meta, 1), vec![(1, vec![11], vec![key])]);
        sched.request_finished_all_groups("a", &[vec![], vec![]]);

        // A consumer that does not save takes nothing from vLLM's hand-offs.
        let consumer = mamba_scheduler(BS, KvRole::Consumer);
        let meta = consumer.build_connector_meta(StepInput {
            new_requests: vec![first_step(&prompt, 160, vec![0; 10])],
            boundary_states: vec![offer("a", 1, 11, 144)],
            ..StepInput::default()
        });
        assert!(StepMeta::decode(&meta).unwrap().saves.is_empty());
        consumer.request_finished_all_groups("a", &[vec![], vec![]]);
        assert_eq!(consumer.tracked_requests(), 0);
    }
}
