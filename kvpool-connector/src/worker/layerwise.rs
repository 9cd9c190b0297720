//! Layerwise saving and loading (`use_layerwise`): a block's KV is stored as one object per
//! layer (`…@cache_family:{f}@layer_id:{L}@{hash}`), so the forward starts on layer 0 while
//! later layers still load, and a layer's save starts as soon as the forward has written it.
//!
//! Per-layer objects rather than whole-block objects filled layer by layer: no backend here
//! reads a byte range of a value or writes one in parts, so a whole-block object would make
//! layer 0 wait for every layer's bytes (no overlap at all) and its save wait for the last
//! layer. The price is one key per layer (`benches/benches/layerwise.rs` measures both paths).
//!
//! A layer's load is waited for by exactly that layer's `wait_for_layer_load`; loads of the
//! next `layerwise_prefetch_layers` layers run meanwhile, which bounds the bytes in flight.
//! A block any of whose layers failed to load is reported like a whole-block failure, and vLLM
//! recomputes it; a layer whose load the forward never waited for fails all of its blocks, so
//! a request never keeps KV of a layer that had not arrived.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kvpool_core::error::{Error, Result};
use kvpool_core::key::{BlockHash, BlockKey, Namespace};
use kvpool_core::size::ByteSize;
use tokio::task::JoinHandle;

use super::events::SaveEvents;
use super::{load_fully, lock, save_keys, save_reads, Blocks, WorkerConnector};
use crate::device::StreamHandle;
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

#[derive(Debug)]
enum LayerLoad {
    Idle,
    Running(JoinHandle<Vec<u32>>),
    Waited,
}

/// One save plan's share of this rank, kept for every layer of the step.
#[derive(Debug)]
struct StepSave {
    req_id: String,
    blocks: Vec<(u32, BlockHash)>,
    events: Option<Arc<SaveEvents>>,
}

#[derive(Debug)]
struct LayerStep {
    /// This step's loads: request, blocks and their hashes.
    loads: Vec<(String, Vec<(u32, BlockHash)>)>,
    /// Per layer; empty when the step loads nothing.
    layer_loads: Vec<LayerLoad>,
    /// Layers whose loads run ahead of the one waited for.
    depth: usize,
    /// One layer loads at a time, in layer order: the layer the forward needs next gets the
    /// backend and the copy engine to itself (on a host with few cores, concurrent layer
    /// loads also took the forward's core).
    in_order: Arc<tokio::sync::Semaphore>,
    /// This step's saves, taken from the plan when the first layer is saved.
    saves: Option<Vec<StepSave>>,
    saved: Vec<bool>,
}

impl Default for LayerStep {
    fn default() -> Self {
        LayerStep {
            loads: Vec::new(),
            layer_loads: Vec::new(),
            depth: 0,
            in_order: Arc::new(tokio::sync::Semaphore::new(1)),
            saves: None,
            saved: Vec::new(),
        }
    }
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
        blocks
            .iter()
            .map(|(b, h)| (*b, BlockKey::new(self.own[layer].clone(), *h)))
            .collect()
    }
}

impl WorkerConnector {
    fn layerwise(&self) -> Result<&Layerwise> {
        self.layerwise
            .as_ref()
            .ok_or_else(|| Error::invalid_argument("`use_layerwise` is off"))
    }

    /// `start_load_kv` in layerwise mode: starts the first layers' loads and returns.
    pub(super) fn start_layer_loads(&self, plans: Vec<LoadPlan>) -> Result<()> {
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
        let blocks: usize = loads.iter().map(|(_, b): &(String, Vec<_>)| b.len()).sum();
        let layer_bytes =
            (blocks * layouts.iter().map(|k| k.value_len()).max().unwrap_or(0)) as u64;
        let mut depth = lw.prefetch;
        if lw.max_bytes > 0 && layer_bytes > 0 {
            depth = depth.min((lw.max_bytes / layer_bytes).max(1) as usize);
        }
        let mut step = lock(&lw.step);
        self.settle_layer_loads(&mut step);
        step.loads = loads;
        step.depth = depth;
        step.in_order = Arc::new(tokio::sync::Semaphore::new(1));
        step.layer_loads = (0..lw.layers()).map(|_| LayerLoad::Idle).collect();
        for (l, kv) in layouts.iter().enumerate().take(depth) {
            self.start_layer_load(lw, &mut step, l, kv);
        }
        Ok(())
    }

    fn start_layer_load(&self, lw: &Layerwise, step: &mut LayerStep, l: usize, kv: &Arc<KvLayout>) {
        if !matches!(step.layer_loads.get(l), Some(LayerLoad::Idle)) {
            return;
        }
        let batch = if lw.max_blocks == 0 {
            usize::MAX
        } else {
            lw.max_blocks
        };
        let jobs: Vec<(String, Blocks)> = step
            .loads
            .iter()
            .map(|(req, blocks)| (req.clone(), lw.keys(l, blocks)))
            .collect();
        let shared = self.shared.clone();
        let kv = kv.clone();
        let staged = lock(&self.staged).clone();
        let in_order = step.in_order.clone();
        step.layer_loads[l] = LayerLoad::Running(self.runtime.spawn(async move {
            // Layers are started in order and the semaphore is fair: they load in order.
            let _turn = in_order.acquire_owned().await;
            let mut failed = Vec::new();
            for (req, keys) in jobs {
                for chunk in keys.chunks(batch) {
                    failed.extend(
                        load_fully(&shared, &kv, staged.as_deref(), &req, chunk.to_vec()).await,
                    );
                }
            }
            failed
        }));
    }

    /// vLLM's `wait_for_layer_load`: returns once `layer_name`'s KV of this step's loads is in
    /// the cache (failed blocks are reported by `get_block_ids_with_load_errors`), and starts
    /// the loads of the layers after it. A no-op outside layerwise mode and for layers kvpool
    /// did not register.
    pub fn wait_for_layer_load(&self, layer_name: &str) -> Result<()> {
        let Some(lw) = &self.layerwise else {
            return Ok(());
        };
        let Some((l, _)) = lw.layer(layer_name)? else {
            return Ok(());
        };
        let layouts = lw.layouts()?;
        let handle = {
            let mut step = lock(&lw.step);
            if step.layer_loads.is_empty() {
                return Ok(());
            }
            let end = (l + 1 + step.depth).min(lw.layers());
            for (next, kv) in layouts.iter().enumerate().take(end) {
                self.start_layer_load(lw, &mut step, next, kv);
            }
            match std::mem::replace(&mut step.layer_loads[l], LayerLoad::Waited) {
                LayerLoad::Running(h) => h,
                _ => return Ok(()),
            }
        };
        let failed = self.runtime.block_on(handle).unwrap_or_else(|e| {
            tracing::error!(layer = layer_name, error = %e, "a layer load task died");
            let step = lock(&lw.step);
            step.loads
                .iter()
                .flat_map(|(_, b)| b.iter().map(|(id, _)| *id))
                .collect()
        });
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
                let share = save_keys(&self.shared, &plan)?;
                let events = match &self.shared.events {
                    Some(_) => Some(Arc::new(SaveEvents::from_plan(&plan, block_size)?)),
                    None => None,
                };
                saves.push(StepSave {
                    req_id: plan.req_id,
                    blocks: share.into_iter().map(|(b, k)| (b, *k.hash())).collect(),
                    events,
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
                staged.engine.order_after(compute)?;
                ordered = true;
            }
            for save in saves {
                if save.blocks.is_empty() {
                    continue;
                }
                let keys = lw.keys(l, &save.blocks);
                // The block is in the pool once its last layer is: that save reports it.
                let events = if l == last { save.events.clone() } else { None };
                let (shared, kv, staged) =
                    (self.shared.clone(), layouts[l].clone(), staged.clone());
                let req_id = save.req_id.clone();
                self.spawn_save(
                    req_id.clone(),
                    async move {
                        let staged = staged.as_deref();
                        save_reads(&shared, &kv, staged, &req_id, keys, events.as_ref()).await
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

    /// Ends the step's loads: every load still running is waited for (it writes the cache),
    /// and the blocks of every layer the forward did not wait for count as failed.
    fn settle_layer_loads(&self, step: &mut LayerStep) {
        let mut unwaited = false;
        for load in std::mem::take(&mut step.layer_loads) {
            match load {
                LayerLoad::Waited => {}
                LayerLoad::Idle => unwaited = true,
                LayerLoad::Running(h) => {
                    unwaited = true;
                    let _ = self.runtime.block_on(h);
                }
            }
        }
        if unwaited {
            tracing::warn!("layerwise: the forward did not wait for every layer's load; recomputing its blocks");
            let blocks = step
                .loads
                .iter()
                .flat_map(|(_, b)| b.iter().map(|(id, _)| *id));
            self.shared.progress().load_errors.extend(blocks);
        }
        step.loads.clear();
    }
}
