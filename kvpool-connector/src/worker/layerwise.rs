//! Layerwise saving and loading (`use_layerwise`): a block's KV is stored as one object per
//! layer (`…@cache_family:{f}@layer_id:{L}@{hash}`), so the forward starts on layer 0 while
//! later layers still load, and a layer's save starts as soon as the forward has written it.
//!
//! Per-layer objects rather than whole-block objects filled layer by layer: no backend here
//! reads a byte range of a value or writes one in parts, so a whole-block object would make
//! layer 0 wait for every layer's bytes (no overlap at all) and its save wait for the last
//! layer. The price is one key per layer: on the memory backend the same bytes move ~7%
//! slower as per-layer objects, through Mooncake over TCP ~1.5x (`benches/benches/layerwise.rs`
//! measures both paths; figures in the README).
//!
//! One loader task per step loads the layers in forward order, at most
//! `layerwise_prefetch_layers` layers ahead of the layer the forward waits for, which bounds
//! the bytes in flight. Within that task two layers' loads overlap ([`LAYERS_IN_FLIGHT`]); no
//! load is handed between tasks or threads on the critical path. A layer's load is waited for
//! by exactly that layer's `wait_for_layer_load`. Through staging, a layer's backend read
//! overlaps the copies to the device of the layer before it, and the wait does not block the
//! host on those copies: the compute stream waits for them, as it does for whole-block sync
//! loads.
//!
//! A block any of whose layers failed to load is reported like a whole-block failure, and vLLM
//! recomputes it; a layer whose load the forward never waited for fails all of its blocks, so
//! a request never keeps KV of a layer that had not arrived.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};

use futures_util::stream::{FuturesOrdered, StreamExt};

use kvpool_core::error::{Error, Result};
use kvpool_core::key::{BlockHash, BlockKey, Namespace};
use kvpool_core::size::ByteSize;
use tokio::task::JoinHandle;

use super::events::SaveEvents;
use super::staged::{self, Staged, Waiter};
use super::{
    direct, lock, save_hashes, save_reads, save_share, Blocks, Presence, Shared, WorkerConnector,
};
use crate::device::{Direction, Fence, StreamHandle};
use crate::layout::KvLayout;
use crate::meta::{decode_hashes, LoadPlan};

/// Layerwise state of a worker.
#[derive(Debug)]
pub(super) struct Layerwise {
    /// This rank's namespace of each local layer, in forward order.
    own: Vec<Arc<Namespace>>,
    prefetch: usize,
    /// Blocks per transfer batch within a layer (0: all of the layer's).
    max_blocks: usize,
    /// Bytes of layer loads in flight at once (0: only `prefetch` bounds them).
    max_bytes: u64,
    registered: Mutex<Option<Registered>>,
    step: Mutex<LayerStep>,
}

#[derive(Debug)]
struct Registered {
    /// Layer name to its local index.
    index: HashMap<String, usize>,
    /// One layout per layer: a layer's value is its own tensors' bytes.
    layouts: Vec<Arc<KvLayout>>,
}

/// Layer loads a step's loader runs at once, interleaved within its one task. A backend that
/// waits on a round trip per call (a master's replica lists, a server's reply: Mooncake spends
/// ~0.3 ms of a 64-block layer's ~1.5 ms there) hides it behind the previous layer's transfer;
/// one whose copies run inside the call (memory) finishes a layer in one poll, so nothing
/// changes for it, and its copies never compete with each other for the forward's cores.
const LAYERS_IN_FLIGHT: usize = 2;

/// One step's layer loads: the loader task's progress, shared with the forward's waits.
#[derive(Debug)]
struct LoadLane {
    state: Mutex<LaneState>,
    /// Signalled when a layer arrives.
    arrival: Condvar,
    /// Signalled when the window opens or the step ends.
    window: tokio::sync::Notify,
}

#[derive(Debug)]
struct LaneState {
    /// The loader may start the layers below this one.
    open_to: usize,
    /// The step has ended: the loader starts no further layer.
    stop: bool,
    /// Per layer: its load has ended (its copies to the device may still run).
    arrived: Vec<bool>,
    /// Per layer, once arrived: the blocks whose load failed, and its copies to the device.
    arrivals: Vec<Arrival>,
}

/// What a layer's load left for the forward.
#[derive(Debug, Default)]
struct Arrival {
    /// Blocks that failed (misses, backend errors, copies that could not be queued).
    failed: Vec<u32>,
    /// Staged: the copies to the device still in flight.
    copies: Option<LayerCopies>,
}

/// A layer's copies to the device, queued and not known to be done.
#[derive(Debug)]
struct LayerCopies {
    /// Completes after every one of them.
    fence: Arc<dyn Fence>,
    /// Resolve to the blocks whose copy failed.
    waiters: Vec<Waiter>,
}

impl LoadLane {
    fn new(layers: usize, open_to: usize) -> LoadLane {
        LoadLane {
            state: Mutex::new(LaneState {
                open_to,
                stop: false,
                arrived: vec![false; layers],
                arrivals: (0..layers).map(|_| Arrival::default()).collect(),
            }),
            arrival: Condvar::new(),
            window: tokio::sync::Notify::new(),
        }
    }

    /// Lets the loader start the layers below `to`.
    fn open(&self, to: usize) {
        let mut state = lock(&self.state);
        if to > state.open_to {
            state.open_to = to;
            self.window.notify_waiters();
        }
    }

    fn stop(&self) {
        lock(&self.state).stop = true;
        self.window.notify_waiters();
    }

    /// Waits until the loader may start `layer`; false once the step has ended.
    async fn may_start(&self, layer: usize) -> bool {
        loop {
            let notified = self.window.notified();
            tokio::pin!(notified);
            // Registered before the check: a wake between the check and the wait is not lost.
            notified.as_mut().enable();
            {
                let state = lock(&self.state);
                if state.stop {
                    return false;
                }
                if layer < state.open_to {
                    return true;
                }
            }
            notified.await;
        }
    }

    /// Records that `layer` has arrived.
    fn arrive(&self, layer: usize, arrival: Arrival) {
        let mut state = lock(&self.state);
        if !std::mem::replace(&mut state.arrived[layer], true) {
            state.arrivals[layer] = arrival;
            self.arrival.notify_all();
        }
    }

    /// Waits for `layer` to arrive and takes what it left.
    fn wait(&self, layer: usize) -> Arrival {
        let mut state = lock(&self.state);
        while !state.arrived[layer] {
            state = self.arrival.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        std::mem::take(&mut state.arrivals[layer])
    }

    /// The copies of every arrived layer nobody took.
    fn unclaimed_copies(&self) -> Vec<Waiter> {
        lock(&self.state)
            .arrivals
            .iter_mut()
            .filter_map(|a| a.copies.take())
            .flat_map(|c| c.waiters)
            .collect()
    }
}

/// Ends every layer the loader did not: a loader that returns early or dies leaves no forward
/// waiting, and those layers' blocks count as failed.
struct ArriveAll<'a> {
    lane: &'a LoadLane,
    blocks: Vec<u32>,
}

impl Drop for ArriveAll<'_> {
    fn drop(&mut self) {
        let layers = lock(&self.lane.state).arrived.len();
        for layer in 0..layers {
            let failed = self.blocks.clone();
            self.lane.arrive(
                layer,
                Arrival {
                    failed,
                    copies: None,
                },
            );
        }
    }
}

/// `blocks` keyed in a layer's namespace.
fn layer_keys(namespace: &Arc<Namespace>, blocks: &[(u32, BlockHash)]) -> Blocks {
    blocks
        .iter()
        .map(|(b, h)| (*b, BlockKey::new(namespace.clone(), *h)))
        .collect()
}

/// What the loader of one step needs.
struct LoaderJob {
    shared: Arc<Shared>,
    staged: Option<Arc<Staged>>,
    layouts: Vec<Arc<KvLayout>>,
    /// Per request: the request and its blocks with their hashes.
    loads: Vec<(String, Vec<(u32, BlockHash)>)>,
    /// Per layer: this rank's namespace (a layer's keys are built when it loads, off the
    /// forward's thread).
    namespaces: Vec<Arc<Namespace>>,
    /// Blocks per transfer batch.
    batch: usize,
}

/// Loads the layers of `job` in order, each once `lane` lets it start.
async fn run_loader(lane: Arc<LoadLane>, job: LoaderJob) {
    let all: Vec<u32> = job
        .loads
        .iter()
        .flat_map(|(_, blocks)| blocks.iter().map(|(b, _)| *b))
        .collect();
    let _guard = ArriveAll {
        lane: &lane,
        blocks: all,
    };
    let mut running = FuturesOrdered::new();
    for l in 0..job.layouts.len() {
        if running.len() >= LAYERS_IN_FLIGHT {
            running.next().await;
        }
        running.push_back(load_layer(&lane, &job, l));
    }
    while running.next().await.is_some() {}
}

/// Loads layer `l` once the window lets it start, and marks it arrived: direct, with its bytes
/// in place; staged, once its copies to the device are queued.
async fn load_layer(lane: &LoadLane, job: &LoaderJob, l: usize) {
    if !lane.may_start(l).await {
        return;
    }
    let reqs: Vec<(&str, Blocks)> = job
        .loads
        .iter()
        .map(|(req, blocks)| (req.as_str(), layer_keys(&job.namespaces[l], blocks)))
        .collect();
    let kv = &job.layouts[l];
    let mut failed = Vec::new();
    let Some(st) = &job.staged else {
        for (req, keys) in reqs {
            for chunk in keys.chunks(job.batch) {
                failed.extend(direct::load(&job.shared, kv, req, chunk.to_vec()).await);
            }
        }
        lane.arrive(
            l,
            Arrival {
                failed,
                copies: None,
            },
        );
        return;
    };
    let mut waiters = Vec::new();
    for (req, keys) in reqs {
        for chunk in keys.chunks(job.batch) {
            let (f, w) = staged::load(&job.shared, kv, st, req, chunk.to_vec()).await;
            failed.extend(f);
            waiters.extend(w);
        }
    }
    let copies = match st.engine.fence(Direction::ToDevice) {
        Ok(fence) => Some(LayerCopies { fence, waiters }),
        Err(e) => {
            // No fence for the forward to wait on: the layer arrives once its copies are done.
            tracing::warn!(layer = l, error = %e, "no fence for a layer's copies; waiting for them");
            failed.extend(staged::settle(waiters).await);
            None
        }
    };
    lane.arrive(l, Arrival { failed, copies });
}

/// One step's loads.
#[derive(Debug)]
struct StepLoads {
    lane: Arc<LoadLane>,
    loader: JoinHandle<()>,
    /// Every block of the step's loads.
    blocks: Vec<u32>,
    /// Per layer: the forward has waited for it.
    waited: Vec<bool>,
}

/// One save plan's share of this rank, kept for every layer of the step.
#[derive(Debug)]
struct StepSave {
    req_id: String,
    blocks: Vec<(u32, BlockHash)>,
    events: Option<Arc<SaveEvents>>,
    /// The blocks whose first and last layers the pool holds, asked once for the step by
    /// whichever layer's save comes first. A lookup counts exactly those blocks, so the
    /// layers between are not asked for again one `exists` per layer: a layer evicted on its
    /// own fails its block's load, which vLLM recomputes, never serves wrong bytes.
    held: Arc<tokio::sync::OnceCell<HashSet<u32>>>,
}

#[derive(Debug, Default)]
struct LayerStep {
    /// This step's loads, while they run.
    loads: Option<StepLoads>,
    /// Layers whose loads run ahead of the one waited for.
    depth: usize,
    /// This step's saves, taken from the plan when the first layer is saved.
    saves: Option<Vec<StepSave>>,
    saved: Vec<bool>,
}

impl Layerwise {
    /// `own` is this rank's namespace; `layers` the local layer count.
    pub(super) fn new(
        own: &Namespace,
        layers: u32,
        prefetch: u32,
        max_blocks: u32,
        max_bytes: ByteSize,
    ) -> Result<Layerwise> {
        let own = (0..layers)
            .map(|l| own.with_layer(l).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Layerwise {
            own,
            prefetch: prefetch.max(1) as usize,
            max_blocks: max_blocks as usize,
            max_bytes: max_bytes.0,
            registered: Mutex::new(None),
            step: Mutex::new(LayerStep::default()),
        })
    }

    pub(super) fn layers(&self) -> usize {
        self.own.len()
    }

    /// The layer of each tensor (in registration order), by its layer name.
    pub(super) fn layer_of_tensors(
        &self,
        names: &[&str],
    ) -> Result<(Vec<u32>, HashMap<String, usize>)> {
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut of = Vec::with_capacity(names.len());
        for name in names {
            let next = index.len();
            let l = *index.entry((*name).to_string()).or_insert(next);
            of.push(l as u32);
        }
        if index.len() != self.own.len() {
            return Err(Error::invalid_argument(format!(
                "layerwise: {} KV-cache layers registered on this worker, but the engine layout \
                 gives this pipeline stage {} (`stage_layers`); layer keys would not match \
                 other instances'",
                index.len(),
                self.own.len()
            )));
        }
        Ok((of, index))
    }

    pub(super) fn set_registered(
        &self,
        index: HashMap<String, usize>,
        layouts: Vec<Arc<KvLayout>>,
    ) {
        *lock(&self.registered) = Some(Registered { index, layouts });
    }

    fn layer(&self, name: &str) -> Result<Option<(usize, Arc<KvLayout>)>> {
        let registered = lock(&self.registered);
        let Some(r) = registered.as_ref() else {
            return Err(Error::invalid_argument(
                "register_kv_caches has not been called",
            ));
        };
        Ok(r.index.get(name).map(|&l| (l, r.layouts[l].clone())))
    }

    fn layouts(&self) -> Result<Vec<Arc<KvLayout>>> {
        lock(&self.registered)
            .as_ref()
            .map(|r| r.layouts.clone())
            .ok_or_else(|| Error::invalid_argument("register_kv_caches has not been called"))
    }

    fn keys(&self, layer: usize, blocks: &[(u32, BlockHash)]) -> Blocks {
        layer_keys(&self.own[layer], blocks)
    }
}

/// The blocks whose `first` and `last` layer keys the backend holds; none if it cannot say
/// (every layer is then written, and `put` leaves what it holds alone).
async fn held_blocks(shared: &Shared, first: Blocks, last: Blocks) -> HashSet<u32> {
    let keys: Vec<BlockKey> = first.iter().chain(&last).map(|(_, k)| k.clone()).collect();
    match shared.backend.exists(&keys).await {
        Ok(present) => {
            let (first_held, last_held) = present.split_at(first.len());
            first
                .iter()
                .zip(first_held.iter().zip(last_held))
                .filter(|(_, (a, b))| **a && **b)
                .map(|((block, _), _)| *block)
                .collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "layerwise save: could not ask which blocks the pool holds; writing every layer");
            HashSet::new()
        }
    }
}

impl WorkerConnector {
    fn layerwise(&self) -> Result<&Layerwise> {
        self.layerwise
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("`use_layerwise` is off"))
    }

    /// `start_load_kv` in layerwise mode: starts the first layers' loads and returns. Copies to
    /// the device run after the work queued on `compute` (vLLM may be zeroing the new blocks).
    pub(super) fn start_layer_loads(
        &self,
        plans: Vec<LoadPlan>,
        compute: StreamHandle,
    ) -> Result<()> {
        let lw = self.layerwise()?;
        let mut loads = Vec::with_capacity(plans.len());
        for plan in plans {
            if plan.groups.iter().any(|&g| g != 0) {
                return Err(Error::invalid_argument(format!(
                    "layerwise load of request {:?} names a KV-cache group other than 0",
                    plan.req_id
                )));
            }
            let hashes = decode_hashes(&plan.hashes, plan.block_ids.len(), &plan.req_id)?;
            loads.push((
                plan.req_id,
                plan.block_ids.into_iter().zip(hashes).collect(),
            ));
        }
        let layouts = lw.layouts()?;
        let block_ids: Vec<u32> = loads
            .iter()
            .flat_map(|(_, b): &(String, Vec<(u32, BlockHash)>)| b.iter().map(|(id, _)| *id))
            .collect();
        let layer_bytes =
            (block_ids.len() * layouts.iter().map(|k| k.value_len()).max().unwrap_or(0)) as u64;
        let mut depth = lw.prefetch;
        if lw.max_bytes > 0 && layer_bytes > 0 {
            depth = depth.min((lw.max_bytes / layer_bytes).max(1) as usize);
        }
        let batch = if lw.max_blocks == 0 {
            usize::MAX
        } else {
            lw.max_blocks
        };
        let staged = lock(&self.staged).clone();
        if let Some(staged) = &staged {
            staged.engine.order_after(Direction::ToDevice, compute)?;
        }
        let job = LoaderJob {
            shared: self.shared.clone(),
            staged,
            loads,
            namespaces: lw.own.clone(),
            layouts,
            batch,
        };
        let mut step = lock(&lw.step);
        self.settle_layer_loads(&mut step);
        let lane = Arc::new(LoadLane::new(lw.layers(), depth));
        let loader = self.runtime.spawn(run_loader(lane.clone(), job));
        step.depth = depth;
        step.loads = Some(StepLoads {
            lane,
            loader,
            blocks: block_ids,
            waited: vec![false; lw.layers()],
        });
        Ok(())
    }

    /// vLLM's `wait_for_layer_load`: returns once `layer_name`'s KV of this step's loads is in
    /// the cache, or, on a device, once the copies that put it there are queued and work
    /// queued on `compute` after this call waits for them (failed blocks are reported by
    /// `get_block_ids_with_load_errors`, copy failures once the copies are done); and lets the
    /// loads of the layers after it start. A no-op outside layerwise mode and for layers
    /// kvpool did not register.
    pub fn wait_for_layer_load(&self, layer_name: &str, compute: StreamHandle) -> Result<()> {
        let Some(lw) = &self.layerwise else {
            return Ok(());
        };
        let Some((l, _)) = lw.layer(layer_name)? else {
            return Ok(());
        };
        let lane = {
            let mut step = lock(&lw.step);
            let depth = step.depth;
            let Some(loads) = step.loads.as_mut() else {
                return Ok(());
            };
            if std::mem::replace(&mut loads.waited[l], true) {
                return Ok(());
            }
            loads.lane.open(l + 1 + depth);
            loads.lane.clone()
        };
        let Arrival { mut failed, copies } = lane.wait(l);
        if let Some(LayerCopies { fence, waiters }) = copies {
            let staged = lock(&self.staged).clone();
            let waited = staged
                .as_ref()
                .map(|st| st.engine.stream_wait(compute, &*fence));
            match waited {
                Some(Ok(())) => lock(&self.sync_waiters).extend(waiters),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(layer = layer_name, error = %e, "the compute stream cannot wait for a layer's copies; waiting here");
                    }
                    failed.extend(self.runtime.block_on(staged::settle(waiters)));
                }
            }
        }
        self.shared.progress().load_errors.extend(failed);
        Ok(())
    }

    /// vLLM's `save_kv_layer`: starts saving `layer_name`'s KV of this step's saves, after the
    /// work queued on `compute` (the forward that wrote it). A no-op outside layerwise mode.
    pub fn save_kv_layer(&self, layer_name: &str, compute: StreamHandle) -> Result<()> {
        let Some(lw) = &self.layerwise else {
            return Ok(());
        };
        if !self.saves {
            return Ok(());
        }
        let Some((l, _)) = lw.layer(layer_name)? else {
            return Ok(());
        };
        self.save_layers(lw, &[l], compute)
    }

    fn save_layers(&self, lw: &Layerwise, layers: &[usize], compute: StreamHandle) -> Result<()> {
        let layouts = lw.layouts()?;
        let mut step = lock(&lw.step);
        if step.saves.is_none() {
            let plans = self.take_plans(|m| std::mem::take(&mut m.saves));
            let block_size = self.layout.block_size;
            let mut saves = Vec::with_capacity(plans.len());
            for plan in plans {
                let hashes = save_hashes(&plan)?;
                let share = save_share(&self.shared, &plan, &hashes)?;
                let events = match &self.shared.events {
                    Some(_) => Some(Arc::new(SaveEvents::new(&plan, &hashes, block_size)?)),
                    None => None,
                };
                saves.push(StepSave {
                    req_id: plan.req_id,
                    blocks: share.into_iter().map(|(b, k)| (b, *k.hash())).collect(),
                    events,
                    held: Arc::default(),
                });
            }
            step.saves = Some(saves);
            step.saved = vec![false; lw.layers()];
        }
        let staged = lock(&self.staged).clone();
        let last = lw.layers().saturating_sub(1);
        let mut ordered = false;
        for &l in layers {
            if step.saved.get(l).copied().unwrap_or(true) {
                continue;
            }
            step.saved[l] = true;
            let saves = step.saves.as_ref().expect("taken above");
            if saves.is_empty() {
                continue;
            }
            if let (Some(staged), false) = (&staged, ordered) {
                staged.engine.order_after(Direction::ToHost, compute)?;
                ordered = true;
            }
            for save in saves {
                if save.blocks.is_empty() {
                    continue;
                }
                let keys = lw.keys(l, &save.blocks);
                // The block is in the pool once its last layer is: that save reports it, and
                // asks the backend itself, so a block already held is reported as such.
                let events = if l == last { save.events.clone() } else { None };
                let edges = (l != last).then(|| {
                    (
                        save.held.clone(),
                        lw.keys(0, &save.blocks),
                        lw.keys(last, &save.blocks),
                    )
                });
                let (shared, kv, staged) =
                    (self.shared.clone(), layouts[l].clone(), staged.clone());
                let req_id = save.req_id.clone();
                self.spawn_save(
                    req_id.clone(),
                    async move {
                        let staged = staged.as_deref();
                        let (keys, presence) = match edges {
                            None => (keys, Presence::Unknown),
                            Some((held, first, last)) => {
                                let held =
                                    held.get_or_init(|| held_blocks(&shared, first, last)).await;
                                let keys = keys
                                    .into_iter()
                                    .filter(|(b, _)| !held.contains(b))
                                    .collect();
                                (keys, Presence::Absent)
                            }
                        };
                        save_reads(
                            &shared,
                            &kv,
                            staged,
                            &req_id,
                            keys,
                            events.as_ref(),
                            presence,
                        )
                        .await
                    },
                    None,
                );
            }
        }
        Ok(())
    }

    /// `wait_for_save` in layerwise mode: saves the layers the forward did not hand over, and
    /// settles the step's loads (a layer the forward never waited for fails all its blocks).
    pub(super) fn finish_layer_step(&self, compute: StreamHandle) -> Result<()> {
        let lw = self.layerwise()?;
        if self.saves {
            let all: Vec<usize> = (0..lw.layers()).collect();
            self.save_layers(lw, &all, compute)?;
        }
        let mut step = lock(&lw.step);
        self.settle_layer_loads(&mut step);
        step.saves = None;
        step.saved.clear();
        Ok(())
    }

    /// Ends the step's loads: the loader starts no further layer and is waited for (a layer
    /// it started still writes the cache), and the blocks of every layer the forward did not
    /// wait for count as failed.
    fn settle_layer_loads(&self, step: &mut LayerStep) {
        let Some(loads) = step.loads.take() else {
            return;
        };
        loads.lane.stop();
        if let Err(e) = self.runtime.block_on(loads.loader) {
            tracing::error!(error = %e, "the layer loader died");
        }
        // Copies of layers the forward never waited for still write their blocks: done before
        // vLLM recomputes them.
        let unclaimed = loads.lane.unclaimed_copies();
        if !unclaimed.is_empty() {
            self.runtime.block_on(staged::settle(unclaimed));
        }
        if loads.waited.iter().any(|w| !w) {
            tracing::warn!("layerwise: the forward did not wait for every layer's load; recomputing its blocks");
            self.shared.progress().load_errors.extend(loads.blocks);
        }
    }
}
