//! The worker half: registration, loads before the forward, saves after it, completions.
//!
//! Host KV moves straight between the cache and the backend ([`direct`]); device KV (and host
//! KV with `stage_host_kv`) through pinned staging and a copy engine ([`staged`]).

mod blocks;
mod direct;
mod events;
mod layerwise;
mod staged;
mod tally;

use events::{EventLog, SaveEvents};
use layerwise::Layerwise;
use tally::{load_keys, save_hashes, save_share, LoadTally, Presence, SaveTally};

pub use blocks::Transfer;
pub use events::{PoolEvent, StoredBlock};

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use crate::device::{self, CopyEngine, Direction, StreamHandle};
use crate::groups::{self, GroupKind, KvCacheGroup};
use crate::layout::{KvLayout, TensorDesc};
use crate::lookup::{socket_path_from_env, LookupHandler, LookupServer};
use crate::meta::StepMeta;
use crate::metrics_server::MetricsServer;
use crate::staging::Staging;
use crate::{EngineLayout, RankKeys};
use kvpool_core::backend::{ClearScope, KvBackend};
use kvpool_core::config::Config;
use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::key::{BlockHash, BlockKey, Namespace};
use kvpool_core::metrics;
use staged::{Staged, Waiter};

const METRICS_LABEL: &str = "connector";

/// One load or save as vLLM's connector stats report it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    /// `"load"` or `"save"`.
    pub op: &'static str,
    /// From its start to its last backend reply.
    pub seconds: f64,
    /// Blocks it covered (a save's blocks the pool held already included).
    pub blocks: u64,
    /// Bytes moved to or from the backend.
    pub bytes: u64,
    /// Blocks that failed.
    pub failed: u64,
}

/// Records kept for vLLM's stats between two collections; beyond it, records of one kind
/// are merged into one, so an engine that never collects does not grow the worker.
const MAX_TRANSFER_RECORDS: usize = 4096;

/// What `get_finished` reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinishedTransfers {
    /// Finished requests whose saves are all done: vLLM may free their blocks now.
    pub sending: Vec<String>,
    /// Requests whose async load is done (successfully or not; failures are in
    /// `get_block_ids_with_load_errors`, or in `failed_recving` for hybrid models).
    pub recving: Vec<String>,
    /// Hybrid models: requests whose async load failed, with the blocks that failed (vLLM
    /// 0.33 cannot map block ids back to requests when there are several KV-cache groups, so
    /// it takes failed requests, which it recomputes whole).
    pub failed_recving: Vec<(String, Vec<u32>)>,
}

#[derive(Debug, Default)]
struct Progress {
    /// Save jobs in flight per request, until they no longer read the request's blocks.
    inflight: HashMap<String, usize>,
    /// Backend writes from staging still running (their blocks are already free).
    staged_puts: usize,
    /// Requests that had saves planned and are not yet reported as finished sending.
    saving: HashSet<String>,
    /// Of those, the ones vLLM reported finished.
    finished: HashSet<String>,
    /// Async loads done since the last `get_finished`.
    done_recving: Vec<String>,
    /// Of those, the hybrid model's that failed, with their failed blocks.
    failed_recving: Vec<(String, Vec<u32>)>,
    /// Blocks whose load failed since the last `get_block_ids_with_load_errors`.
    load_errors: HashSet<u32>,
}

impl Progress {
    /// No save reads blocks and no backend write from staging is running.
    fn saves_settled(&self) -> bool {
        self.inflight.is_empty() && self.staged_puts == 0
    }
}

#[derive(Debug)]
struct Shared {
    backend: Arc<dyn KvBackend>,
    /// What a reset of the engine's prefix cache clears.
    reset_scope: ClearScope,
    /// Keys of each KV-cache group.
    keys: Vec<RankKeys>,
    tp_rank: u32,
    max_batch: usize,
    progress: Mutex<Progress>,
    saves_done: Notify,
    /// Loads and saves since the last [`WorkerConnector::take_transfer_records`].
    records: Mutex<Vec<TransferRecord>>,
    /// With KV events on: what the pool gained and lost since the last
    /// [`WorkerConnector::take_pool_events`].
    events: Option<EventLog>,
    /// Layerwise mode: the namespaces a lookup checks for group 0 instead of the whole-block
    /// ones (every rank's first and last layer: saves go layer by layer, so a block whose last
    /// layer is there was saved whole; a layer lost on its own fails its load, recomputed).
    layer_lookup: Option<Vec<Arc<Namespace>>>,
}

impl Shared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, r: TransferRecord) {
        let mut records = lock(&self.records);
        if records.len() < MAX_TRANSFER_RECORDS {
            records.push(r);
        } else if let Some(last) = records.iter_mut().rev().find(|x| x.op == r.op) {
            last.seconds += r.seconds;
            last.blocks += r.blocks;
            last.bytes += r.bytes;
            last.failed += r.failed;
        }
    }

    fn group_keys(&self, group: usize, req_id: &str) -> Result<&RankKeys> {
        self.keys.get(group).ok_or_else(|| {
            Error::invalid_argument(format!(
                "connector metadata for request {req_id:?} names KV-cache group {group}, but \
                 the engine has {}",
                self.keys.len()
            ))
        })
    }
}

/// The worker half of the connector: one per worker process.
#[derive(Debug)]
pub struct WorkerConnector {
    layout: EngineLayout,
    shared: Arc<Shared>,
    /// The registered cache, one layout per KV-cache group; empty until registered.
    kv: Mutex<Vec<Arc<KvLayout>>>,
    staged: Mutex<Option<Arc<Staged>>>,
    /// Copies to the device of this step's sync loads, until their failures are collected.
    sync_waiters: Mutex<Vec<Waiter>>,
    /// A copy engine to use instead of the device's own (tests).
    engine_override: Mutex<Option<Arc<dyn CopyEngine>>>,
    staging_bytes: u64,
    stage_host_kv: bool,
    /// Layerwise mode (`use_layerwise`).
    layerwise: Option<Layerwise>,
    meta: Mutex<Option<StepMeta>>,
    saves: bool,
    loads: bool,
    _lookup: Option<LookupServer>,
    metrics: Option<MetricsServer>,
    // Declared last: dropped after everything that spawned tasks on it.
    runtime: Runtime,
}

impl WorkerConnector {
    /// Opens the configured backend and, on worker rank 0 (`tp_rank` and `pp_rank` 0), starts
    /// the lookup service the scheduler queries.
    ///
    /// # Errors
    /// Configuration errors, the backend's open errors, and a lookup socket already served by
    /// another instance (`lookup_rpc_port` must differ between instances on one host).
    pub fn open(config: &Config, layout: EngineLayout) -> Result<WorkerConnector> {
        layout.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvpool-connector")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(ErrorKind::Unexpected, "cannot start a runtime").set_source(e)
            })?;
        let backend = runtime.block_on(kvpool_core::registry::open(config))?;
        Self::with_backend(config, layout, backend, runtime)
    }

    /// As [`open`](Self::open), with a backend the caller built, on `runtime`.
    pub fn with_backend(
        config: &Config,
        layout: EngineLayout,
        backend: Arc<dyn KvBackend>,
        runtime: Runtime,
    ) -> Result<WorkerConnector> {
        layout.validate()?;
        crate::check_layerwise(config, &layout)?;
        let keys = (0..layout.kv_cache_groups().len() as u32)
            .map(|g| RankKeys::for_group(&layout, config.connector.key_format, g))
            .collect::<Result<Vec<_>>>()?;
        let max_batch = backend
            .info()
            .capabilities
            .max_batch
            .unwrap_or(usize::MAX)
            .max(1);
        let layer_lookup = match config.connector.use_layerwise {
            true => Some(layer_lookup_namespaces(&layout, &keys)?),
            false => None,
        };
        let shared = Arc::new(Shared {
            backend,
            reset_scope: if config.connector.reset_clears_shared_pool {
                ClearScope::All
            } else {
                ClearScope::Local
            },
            tp_rank: layout.tp_rank,
            max_batch,
            keys,
            progress: Mutex::new(Progress::default()),
            saves_done: Notify::new(),
            records: Mutex::new(Vec::new()),
            events: layout.kv_events.then(EventLog::default),
            layer_lookup,
        });
        let c = &config.connector;
        let layerwise = match c.use_layerwise {
            true => Some(Layerwise::new(
                shared.keys[0].own(),
                crate::layerwise_layers(&layout)?[layout.pp_rank as usize],
                c.layerwise_prefetch_layers,
                c.layerwise_max_transfer_blocks,
                c.layerwise_max_transfer_bytes,
            )?),
            false => None,
        };
        let lookup = if layout.tp_rank == 0 && layout.pp_rank == 0 {
            let path = socket_path_from_env(c.lookup_rpc_port, layout.dp_rank);
            let handler = Arc::new(PoolLookup {
                shared: shared.clone(),
                groups: layout.kv_cache_groups(),
                hash_block_size: layout.hash_block_size(),
            });
            let _guard = runtime.enter();
            Some(LookupServer::bind(&path, handler)?)
        } else {
            None
        };
        let metrics = if c.metrics_port != 0 {
            let rank = layout.pp_rank * layout.tp_size + layout.tp_rank;
            let port = u16::try_from(c.metrics_port + rank).map_err(|_| {
                Error::config_invalid(format!(
                    "`metrics_port` {} plus rank {rank} is not a TCP port",
                    c.metrics_port
                ))
            })?;
            let _guard = runtime.enter();
            Some(MetricsServer::bind(c.metrics_host, port)?)
        } else {
            None
        };
        Ok(WorkerConnector {
            saves: layout.saves(c.consumer_is_to_put),
            loads: layout.loads(c.consumer_is_to_load),
            layout,
            shared,
            kv: Mutex::new(Vec::new()),
            staged: Mutex::new(None),
            sync_waiters: Mutex::new(Vec::new()),
            engine_override: Mutex::new(None),
            staging_bytes: c.device_staging_bytes.as_u64(),
            stage_host_kv: c.stage_host_kv,
            layerwise,
            meta: Mutex::new(None),
            _lookup: lookup,
            metrics,
            runtime,
        })
    }

    /// The backend's description, for logs.
    pub fn backend_description(&self) -> String {
        let info = self.shared.backend.info();
        format!("{} ({})", info.scheme, info.description)
    }

    /// Uses `engine` for the KV's device instead of the one [`device::engine_for`] would open.
    /// Call before [`register_kv_caches`](Self::register_kv_caches); for tests.
    pub fn use_copy_engine(&self, engine: Arc<dyn CopyEngine>) {
        *lock(&self.engine_override) = Some(engine);
    }

    /// vLLM's `register_kv_caches`: plans every block's bytes and registers memory with the
    /// backend — the cache itself when it is in host memory, otherwise pinned staging.
    ///
    /// # Safety
    /// The tensors' memory must stay valid while this connector lives; `owner` is kept with
    /// the regions and should hold the tensors.
    ///
    /// # Errors
    /// Malformed tensor descriptions; a block larger than the backend's largest value; a
    /// device this build or machine cannot reach (named, with what to install); a staging
    /// budget below two blocks.
    pub unsafe fn register_kv_caches(
        &self,
        tensors: &[TensorDesc],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.register_kv_cache_groups(tensors, &[], owner) }
    }

    /// As [`register_kv_caches`](Self::register_kv_caches) for a hybrid model: `groups[i]` is
    /// the KV-cache group of `tensors[i]` (vLLM's `kv_cache_config.kv_cache_groups`); a
    /// group's block value is its own tensors' bytes.
    ///
    /// # Safety
    /// As for [`register_kv_caches`](Self::register_kv_caches).
    ///
    /// # Errors
    /// As for [`register_kv_caches`](Self::register_kv_caches); also groups that do not match
    /// the engine layout's.
    pub unsafe fn register_kv_cache_groups(
        &self,
        tensors: &[TensorDesc],
        groups: &[u32],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<()> {
        let owner_again = owner.clone();
        // SAFETY: forwarded from the caller.
        let kvs = unsafe { KvLayout::grouped(tensors, groups, owner)? };
        if kvs.len() != self.shared.keys.len() {
            return Err(Error::invalid_argument(format!(
                "the KV-cache tensors belong to {} groups but the engine layout has {}",
                kvs.len(),
                self.shared.keys.len()
            )));
        }
        let kv = &kvs[0];
        let mut value_len = kvs.iter().map(|k| k.value_len()).max().unwrap_or(0);
        // Layerwise: one layout per layer, whose regions are the ones backends address.
        let layer_layouts = match &self.layerwise {
            Some(lw) => {
                let names: Vec<&str> = tensors.iter().map(|t| t.layer.as_str()).collect();
                let (of, index) = lw.layer_of_tensors(&names)?;
                // SAFETY: forwarded from the caller; `owner` keeps the same tensors alive.
                let layouts: Vec<Arc<KvLayout>> =
                    unsafe { KvLayout::grouped(tensors, &of, owner_again)? }
                        .into_iter()
                        .map(Arc::new)
                        .collect();
                Some((index, layouts))
            }
            None => None,
        };
        if let Some((_, layouts)) = &layer_layouts {
            // Staging slots hold one transfer's value: a layer's, here.
            value_len = layouts.iter().map(|k| k.value_len()).max().unwrap_or(0);
        }
        let info = self.shared.backend.info();
        if let Some(max) = info.capabilities.max_value_size {
            if value_len > max {
                return Err(Error::invalid_argument(format!(
                    "one block's KV on this rank is {value_len} bytes, more than the {} \
                     backend's largest value ({max} bytes)",
                    info.scheme
                )));
            }
        }
        let staged = if kv.device().is_host() && !self.stage_host_kv {
            // Every group's layout shares the same regions: register them once.
            let regions = match &layer_layouts {
                Some((_, layouts)) => layouts[0].regions(),
                None => kv.regions(),
            };
            for region in regions {
                self.runtime
                    .block_on(self.shared.backend.register(region))?;
            }
            None
        } else {
            let engine = match lock(&self.engine_override).clone() {
                Some(engine) => engine,
                None => device::engine_for(kv.device())?,
            };
            for t in tensors {
                engine.check_device_memory(t.ptr as u64).map_err(|e| {
                    Error::invalid_argument(format!("layer {:?}: {}", t.layer, e.message()))
                })?;
            }
            if engine.device() != kv.device() {
                return Err(Error::invalid_argument(format!(
                    "the KV cache is on {} but the copy engine moves {}",
                    kv.device(),
                    engine.device()
                )));
            }
            let staging = Staging::new(engine.clone(), value_len, self.staging_bytes)?;
            self.runtime
                .block_on(self.shared.backend.register(staging.region()))?;
            Some(Arc::new(Staged::new(
                engine,
                staging,
                self.shared.max_batch,
            )))
        };
        tracing::info!(
            device = %kv.device(),
            groups = kvs.len(),
            blocks = kv.num_blocks(),
            value_bytes = value_len,
            regions = kv.regions().len(),
            staging_slots = staged.as_ref().map_or(0, |s| s.staging.slots()),
            reordered = kv.needs_reorder(),
            "kvpool registered the KV cache"
        );
        *lock(&self.staged) = staged;
        *lock(&self.kv) = kvs.into_iter().map(Arc::new).collect();
        if let (Some(lw), Some((index, layouts))) = (&self.layerwise, layer_layouts) {
            lw.set_registered(index, layouts);
        }
        Ok(())
    }

    /// Staging slots free right now, once registered through staging (tests: none may leak).
    pub fn free_staging_slots(&self) -> Option<usize> {
        lock(&self.staged).as_ref().map(|s| s.staging.free_slots())
    }

    /// Bytes of one block's value on this rank, once registered.
    pub fn value_len(&self) -> Option<usize> {
        self.kv_layout().ok().map(|kv| kv.value_len())
    }

    /// The layout of KV-cache group 0 (the only one of a model that is not hybrid).
    fn kv_layout(&self) -> Result<Arc<KvLayout>> {
        self.kv_layouts()?
            .into_iter()
            .next()
            .ok_or_else(|| Error::invalid_argument("register_kv_caches has not been called"))
    }

    /// The layout of every KV-cache group.
    fn kv_layouts(&self) -> Result<Vec<Arc<KvLayout>>> {
        let kvs = lock(&self.kv).clone();
        if kvs.is_empty() {
            return Err(Error::invalid_argument(
                "register_kv_caches has not been called",
            ));
        }
        Ok(kvs)
    }

    /// vLLM's `bind_connector_metadata`, with the bytes the scheduler's
    /// `build_connector_meta` produced.
    pub fn bind_connector_metadata(&self, bytes: &[u8]) -> Result<()> {
        let meta = StepMeta::decode(bytes)?;
        {
            let mut p = self.shared.progress();
            for save in &meta.saves {
                p.saving.insert(save.req_id.clone());
            }
            for id in &meta.forget {
                p.saving.remove(id);
                p.finished.remove(id);
            }
        }
        *self.meta.lock().unwrap_or_else(|e| e.into_inner()) = Some(meta);
        Ok(())
    }

    /// vLLM's `clear_connector_metadata`.
    pub fn clear_connector_metadata(&self) {
        *self.meta.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn take_plans<T>(&self, pick: impl FnOnce(&mut StepMeta) -> Vec<T>) -> Vec<T> {
        self.meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(pick)
            .unwrap_or_default()
    }

    /// vLLM's `start_load_kv`: runs this step's synchronous loads and starts the asynchronous
    /// ones. `compute` is the engine's current stream (0 for host KV): copies to the device
    /// start after the work queued on it (vLLM may be zeroing the new blocks), and a sync load's
    /// copies are finished before later work on it runs — the call returns without waiting for
    /// the device. A block that cannot be loaded (a miss, a corrupt value, a backend or copy
    /// error) is reported by
    /// [`get_block_ids_with_load_errors`](Self::get_block_ids_with_load_errors), so vLLM
    /// recomputes it.
    pub fn start_load_kv(&self, compute: StreamHandle) -> Result<()> {
        let loads = self.take_plans(|m| std::mem::take(&mut m.loads));
        if loads.is_empty() {
            return Ok(());
        }
        if !self.loads {
            tracing::warn!("load planned for a worker that does not load; ignored");
        }
        if self.layerwise.is_some() {
            return self.start_layer_loads(loads, compute);
        }
        let kvs = self.kv_layouts()?;
        let staged = lock(&self.staged).clone();
        if let Some(staged) = &staged {
            staged.engine.order_after(Direction::ToDevice, compute)?;
        }
        let mut sync_jobs = Vec::new();
        let hybrid = self.layout.is_hybrid();
        for plan in loads {
            let shared = self.shared.clone();
            let kvs = kvs.clone();
            let staged = staged.clone();
            if plan.is_async {
                self.runtime.spawn(async move {
                    let mut failed = Vec::new();
                    match load_keys(&shared, &plan) {
                        Ok(groups) => {
                            for (g, keys) in groups {
                                let Some(kv) = kvs.get(g) else {
                                    failed.extend(keys.iter().map(|(b, _)| *b));
                                    continue;
                                };
                                let req = &plan.req_id;
                                failed.extend(
                                    load_fully(&shared, kv, staged.as_deref(), req, keys).await,
                                );
                            }
                        }
                        Err(_) => failed = plan.block_ids,
                    };
                    let mut p = shared.progress();
                    if hybrid && !failed.is_empty() {
                        failed.sort_unstable();
                        tracing::warn!(
                            req = plan.req_id.as_str(),
                            blocks = ?failed,
                            "kvpool load failed; vLLM recomputes the request"
                        );
                        p.failed_recving.push((plan.req_id.clone(), failed));
                    } else {
                        p.load_errors.extend(failed);
                    }
                    p.done_recving.push(plan.req_id);
                });
            } else {
                sync_jobs.push(async move {
                    let groups = match load_keys(&shared, &plan) {
                        Ok(groups) => groups,
                        Err(_) => {
                            shared.progress().load_errors.extend(plan.block_ids);
                            return Vec::new();
                        }
                    };
                    let mut all_waiters = Vec::new();
                    for (g, keys) in groups {
                        let Some(kv) = kvs.get(g) else {
                            shared
                                .progress()
                                .load_errors
                                .extend(keys.iter().map(|(b, _)| *b));
                            continue;
                        };
                        let (failed, waiters) = match &staged {
                            None => (
                                direct::load(&shared, kv, &plan.req_id, keys).await,
                                Vec::new(),
                            ),
                            Some(staged) => {
                                staged::load(&shared, kv, staged, &plan.req_id, keys).await
                            }
                        };
                        shared.progress().load_errors.extend(failed);
                        all_waiters.extend(waiters);
                    }
                    all_waiters
                });
            }
        }
        if sync_jobs.is_empty() {
            return Ok(());
        }
        let waiters: Vec<Waiter> = self
            .runtime
            .block_on(join_all(sync_jobs))
            .into_iter()
            .flatten()
            .collect();
        if let Some(staged) = &staged {
            if !waiters.is_empty() {
                // Copies complete in submission order: one fence after them all covers every
                // sync load, and the forward waits for it on the device, not here.
                let fence = staged.engine.fence(Direction::ToDevice)?;
                staged.engine.stream_wait(compute, &*fence)?;
                lock(&self.sync_waiters).extend(waiters);
            }
        }
        Ok(())
    }

    /// vLLM's `wait_for_save`: hands this step's saves to the background and returns. The
    /// blocks stay untouched until the save no longer reads them: vLLM delays freeing a
    /// finished request's blocks until `get_finished` reports it, and
    /// [`handle_preemptions`](Self::handle_preemptions) waits for a preempted request's saves.
    /// `compute` is the engine's current stream (0 for host KV): device KV is read only after
    /// the work queued on it, the forward that writes it.
    pub fn wait_for_save(&self, compute: StreamHandle) -> Result<()> {
        if self.layerwise.is_some() {
            return self.finish_layer_step(compute);
        }
        let saves = self.take_plans(|m| std::mem::take(&mut m.saves));
        if saves.is_empty() || !self.saves {
            return Ok(());
        }
        let kvs = self.kv_layouts()?;
        let groups = self.layout.kv_cache_groups();
        let staged = lock(&self.staged).clone();
        if let Some(staged) = &staged {
            staged.engine.order_after(Direction::ToHost, compute)?;
        }
        // Saves of blocks vLLM may free or rewrite while the request runs (sliding window,
        // Mamba state): this step waits until they no longer read the cache.
        let mut volatile_reads = Vec::new();
        for plan in saves {
            let group = plan.group as usize;
            let Some(kv) = kvs.get(group).cloned() else {
                tracing::warn!(
                    req = plan.req_id.as_str(),
                    group,
                    "save planned for a KV-cache group this worker does not have; skipped"
                );
                continue;
            };
            let reads_done = if groups.get(group).is_some_and(|g| g.blocks_are_volatile()) {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                volatile_reads.push(rx);
                Some(tx)
            } else {
                None
            };
            let shared = self.shared.clone();
            let staged = staged.clone();
            let block_size = groups.get(group).map_or(0, |g| g.block_size);
            let req_id = plan.req_id.clone();
            self.spawn_save(
                req_id.clone(),
                async move {
                    let hashes = save_hashes(&plan)?;
                    let events = match &shared.events {
                        Some(_) => Some(Arc::new(SaveEvents::new(&plan, &hashes, block_size)?)),
                        None => None,
                    };
                    let keys = save_share(&shared, &plan, &hashes)?;
                    let staged = staged.as_deref();
                    save_reads(
                        &shared,
                        &kv,
                        staged,
                        &req_id,
                        keys,
                        events.as_ref(),
                        Presence::Unknown,
                    )
                    .await
                },
                reads_done,
            );
        }
        if !volatile_reads.is_empty() {
            self.runtime.block_on(async {
                for rx in volatile_reads {
                    // A dropped sender means the task ended (or died) without reading more.
                    let _ = rx.await;
                }
            });
        }
        Ok(())
    }

    /// Runs `save` (of `req_id`'s blocks) in the background, counted in flight until it no
    /// longer reads the blocks; the backend writes it returns (from staging) are awaited after.
    /// `reads_done` is told when the blocks are no longer read.
    fn spawn_save<F>(
        &self,
        req_id: String,
        save: F,
        reads_done: Option<tokio::sync::oneshot::Sender<()>>,
    ) where
        F: std::future::Future<Output = Result<Vec<tokio::task::JoinHandle<()>>>> + Send + 'static,
    {
        self.shared
            .progress()
            .inflight
            .entry(req_id.clone())
            .and_modify(|n| *n += 1)
            .or_insert(1);
        let shared = self.shared.clone();
        self.runtime.spawn(async move {
            let puts = save.await;
            if let Some(tx) = reads_done {
                let _ = tx.send(());
            }
            let puts = puts.unwrap_or_else(|e| {
                tracing::warn!(req = req_id.as_str(), error = %e, "kvpool save failed");
                Vec::new()
            });
            {
                let mut p = shared.progress();
                if let Some(n) = p.inflight.get_mut(&req_id) {
                    *n -= 1;
                    if *n == 0 {
                        p.inflight.remove(&req_id);
                    }
                }
                p.staged_puts += puts.len();
            }
            shared.saves_done.notify_waiters();
            for put in puts {
                let _ = put.await;
                shared.progress().staged_puts -= 1;
            }
            shared.saves_done.notify_waiters();
        });
    }

    /// Blocks until every save in flight for `req_ids` is done (their blocks are about to be
    /// reused), or `timeout` passes. Backend writes from staging may still be running: they
    /// no longer read the requests' blocks.
    pub fn wait_for_requests(&self, req_ids: &[String], timeout: Duration) -> bool {
        self.wait_for_progress(timeout, |p| {
            !req_ids.iter().any(|id| p.inflight.contains_key(id))
        })
    }

    /// Blocks until no save is in flight, backend writes from staging included, or `timeout`
    /// passes; true when none is. Once it returns true, every block saved so far is in the
    /// backend (or its failure was counted).
    pub fn wait_for_saves(&self, timeout: Duration) -> bool {
        self.wait_for_progress(timeout, Progress::saves_settled)
    }

    fn wait_for_progress(&self, timeout: Duration, done: impl Fn(&Progress) -> bool) -> bool {
        let reached = progress_reaches(&self.shared, done);
        self.runtime
            .block_on(async { tokio::time::timeout(timeout, reached).await })
            .is_ok()
    }

    /// vLLM's `handle_preemptions`, called with the step's metadata before it is bound:
    /// waits for the saves of the requests preempted in this step, whose blocks vLLM is about
    /// to hand to others.
    pub fn handle_preemptions(&self, meta: &[u8]) -> Result<()> {
        let preempted = StepMeta::decode(meta)?.preempted;
        if !preempted.is_empty() && !self.wait_for_requests(&preempted, Duration::from_secs(60)) {
            tracing::error!(
                ?preempted,
                "saves of preempted requests still running after 60 s"
            );
        }
        Ok(())
    }

    /// vLLM's `get_finished`.
    pub fn get_finished(&self, finished_req_ids: &[String]) -> FinishedTransfers {
        let mut p = self.shared.progress();
        for id in finished_req_ids {
            if p.saving.contains(id) {
                p.finished.insert(id.clone());
            }
        }
        let ready: Vec<String> = p
            .finished
            .iter()
            .filter(|id| !p.inflight.contains_key(*id))
            .cloned()
            .collect();
        for id in &ready {
            p.finished.remove(id);
            p.saving.remove(id);
        }
        FinishedTransfers {
            sending: ready,
            recving: std::mem::take(&mut p.done_recving),
            failed_recving: std::mem::take(&mut p.failed_recving),
        }
    }

    /// vLLM's `get_block_ids_with_load_errors`: blocks whose load failed since the last call.
    /// Waits for the copies of the last sync loads to the device, whose failures are known only
    /// then; vLLM calls it after launching the forward, which already waits for those copies.
    pub fn get_block_ids_with_load_errors(&self) -> Vec<u32> {
        let waiters = std::mem::take(&mut *lock(&self.sync_waiters));
        if !waiters.is_empty() {
            let failed = self.runtime.block_on(staged::settle(waiters));
            self.shared.progress().load_errors.extend(failed);
        }
        let mut ids: Vec<u32> = self.shared.progress().load_errors.drain().collect();
        ids.sort_unstable();
        ids
    }

    /// The loads and saves finished since the last call, for vLLM's connector stats
    /// (`get_kv_connector_stats`).
    pub fn take_transfer_records(&self) -> Vec<TransferRecord> {
        std::mem::take(&mut *lock(&self.shared.records))
    }

    /// What the pool stored and lost since the last call, for vLLM's KV events
    /// (`get_kv_connector_kv_cache_events`); always empty unless the layout enables
    /// `kv_events`.
    pub fn take_pool_events(&self) -> Vec<PoolEvent> {
        self.shared
            .events
            .as_ref()
            .map(EventLog::take)
            .unwrap_or_default()
    }

    /// Per KV-cache group, how many tensor-parallel ranks split its blocks between them (each
    /// block is saved by one of them): a block counts as stored when the ranks that saved it,
    /// times this, make up every rank.
    pub fn group_put_steps(&self) -> Vec<u32> {
        self.shared
            .keys
            .iter()
            .map(|k| k.put_step().max(1))
            .collect()
    }

    /// Saves in flight, for tests and shutdown.
    pub fn saves_in_flight(&self) -> usize {
        self.shared.progress().inflight.values().sum()
    }

    /// Requests with any worker state held: 0 once the engine is idle and drained.
    pub fn tracked_requests(&self) -> usize {
        let p = self.shared.progress();
        let mut ids: HashSet<&String> = p.inflight.keys().collect();
        ids.extend(p.saving.iter());
        ids.extend(p.finished.iter());
        ids.len()
    }

    /// Backend writes from staging still running, for tests and shutdown.
    pub fn staged_puts_in_flight(&self) -> usize {
        self.shared.progress().staged_puts
    }

    /// Waits for every save in flight, backend writes from staging included (up to
    /// `timeout`), and closes the backend.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        let drained = self.wait_for_saves(timeout);
        if !drained {
            tracing::warn!("kvpool shutdown: saves still running after {timeout:?}");
        }
        let waiters = std::mem::take(&mut *lock(&self.sync_waiters));
        self.runtime.block_on(staged::settle(waiters));
        self.runtime.block_on(self.shared.backend.close())
    }

    /// vLLM's `reset_cache` (of this worker's pool; the scheduler's reaches rank 0 through the
    /// lookup socket): waits for the saves in flight, then clears what `reset_clears_shared_pool`
    /// puts in scope. Whether anything was in scope.
    ///
    /// # Errors
    /// The backend's, when it cannot be cleared.
    pub fn reset_cache(&self) -> Result<bool> {
        let shared = self.shared.clone();
        self.runtime.block_on(reset(&shared))
    }

    /// Where metrics are served (`metrics_port` set), for logs and tests.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::addr)
    }

    /// The engine layout this worker was built for.
    pub fn layout(&self) -> &EngineLayout {
        &self.layout
    }
}

/// Blocks and the keys they are saved under or loaded from.
type Blocks = Vec<(u32, BlockKey)>;

/// Loads `keys` and waits until the bytes are in their blocks; returns the blocks that failed.
async fn load_fully(
    shared: &Shared,
    kv: &KvLayout,
    staged: Option<&Staged>,
    req_id: &str,
    keys: Blocks,
) -> Vec<u32> {
    match staged {
        None => direct::load(shared, kv, req_id, keys).await,
        Some(staged) => {
            let (mut failed, waiters) = staged::load(shared, kv, staged, req_id, keys).await;
            failed.extend(staged::settle(waiters).await);
            failed
        }
    }
}

/// Saves `keys` until nothing reads the blocks any more; returns the backend writes from
/// staging that are still running.
async fn save_reads(
    shared: &Arc<Shared>,
    kv: &Arc<KvLayout>,
    staged: Option<&Staged>,
    req_id: &str,
    keys: Blocks,
    events: Option<&Arc<SaveEvents>>,
    presence: Presence,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    match staged {
        None => direct::save(shared, kv, req_id, keys, events, presence)
            .await
            .map(|()| Vec::new()),
        Some(staged) => staged::save(shared, kv, staged, req_id, keys, events, presence).await,
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `jobs` concurrently; a job that panicked gives `T::default()`.
async fn join_all<T, F>(jobs: Vec<F>) -> Vec<T>
where
    T: Default + Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let handles: Vec<_> = jobs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or_default());
    }
    out
}

/// Layerwise: the namespaces whose keys show a block saved by every rank — each rank's first
/// and last layer.
fn layer_lookup_namespaces(
    layout: &EngineLayout,
    keys: &[RankKeys],
) -> Result<Vec<Arc<Namespace>>> {
    let stages = crate::layerwise_layers(layout)?;
    let mut out = Vec::new();
    for ns in keys[0].all() {
        let n = stages[ns.pp_rank() as usize];
        out.push(Arc::new(ns.with_layer(0)?));
        if n > 1 {
            out.push(Arc::new(ns.with_layer(n - 1)?));
        }
    }
    Ok(out)
}

/// Clears the pool after the saves in flight (a save finishing after the reset would bring
/// back a block the reset meant to drop).
/// Resolves once the worker's save progress satisfies `done`.
async fn progress_reaches(shared: &Shared, done: impl Fn(&Progress) -> bool) {
    loop {
        let notified = shared.saves_done.notified();
        if done(&shared.progress()) {
            return;
        }
        notified.await;
    }
}

async fn reset(shared: &Shared) -> Result<bool> {
    let drained = tokio::time::timeout(
        Duration::from_secs(60),
        progress_reaches(shared, Progress::saves_settled),
    )
    .await;
    if drained.is_err() {
        tracing::warn!("kvpool reset: saves still running after 60 s; clearing anyway");
    }
    let cleared = shared.backend.clear(shared.reset_scope).await?;
    tracing::info!(scope = ?shared.reset_scope, cleared, "kvpool pool reset");
    if let (true, Some(events)) = (cleared, &shared.events) {
        events.push([PoolEvent::Cleared]);
    }
    Ok(cleared)
}

/// Answers the scheduler's lookups on worker rank 0.
struct PoolLookup {
    shared: Arc<Shared>,
    groups: Vec<KvCacheGroup>,
    hash_block_size: usize,
}

/// Blocks before a full-attention hit's end, beyond the ones a group needs there, that a
/// lookup checks for the other groups: a Mamba state saved up to this many blocks back (a long
/// chunked-prefill step) is found; a sliding window may end up to its own length further back.
/// Anything further is not found, which costs hits, never correctness.
const MAMBA_LOOKBACK_BLOCKS: usize = 256;

impl PoolLookup {
    /// Which of blocks `range` of group `g` every rank holds, as a vector over blocks
    /// `0..range.end` (blocks outside `range` count as missing).
    async fn present(
        &self,
        g: usize,
        range: std::ops::Range<usize>,
        hashes: &[BlockHash],
    ) -> Result<Vec<bool>> {
        let group = &self.groups[g];
        let per_key = group.hashes_per_block(self.hash_block_size);
        let fine = &hashes[range.start * per_key..range.end * per_key];
        let key_hashes = group.key_hashes(fine, self.hash_block_size);
        let ranks: &[Arc<Namespace>] = match (&self.shared.layer_lookup, g) {
            (Some(layers), 0) => layers,
            _ => self.shared.keys[g].all(),
        };
        let keys: Vec<BlockKey> = ranks
            .iter()
            .flat_map(|ns| key_hashes.iter().map(|h| BlockKey::new(ns.clone(), *h)))
            .collect();
        let mut found = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.shared.max_batch) {
            // The hit is loaded a step later: the lookup holds what it found until then, so
            // eviction in between does not turn a promised block into a recompute.
            found.extend(
                self.shared
                    .backend
                    .exists_for_load(chunk, kvpool_core::backend::DEFAULT_LOAD_HOLD)
                    .await?,
            );
        }
        let n = key_hashes.len();
        let mut present = vec![false; range.end];
        for (i, p) in present[range.start..].iter_mut().enumerate() {
            *p = (0..ranks.len()).all(|r| found[r * n + i]);
        }
        Ok(present)
    }
}

#[async_trait]
impl LookupHandler for PoolLookup {
    /// A block counts as present only if every rank holds it, and the hit is the longest
    /// prefix every group can serve ([`groups::longest_common_hit`]). Full-attention groups
    /// are checked first, whole; the others only near the end that leaves, since they need
    /// only blocks at a hit's end (half the keys of a full + sliding-window model).
    async fn lookup(&self, token_len: usize, hashes: &[BlockHash]) -> Result<usize> {
        let blocks_of = |g: &KvCacheGroup| {
            let per_key = g.hashes_per_block(self.hash_block_size);
            (token_len / g.block_size.max(1)).min(hashes.len() / per_key)
        };
        let mut present: Vec<Vec<bool>> = vec![Vec::new(); self.groups.len()];
        let mut bound = token_len;
        for (g, group) in self.groups.iter().enumerate() {
            if group.blocks_needed_at_end().is_none() {
                present[g] = self.present(g, 0..blocks_of(group), hashes).await?;
                let prefix = present[g]
                    .iter()
                    .position(|p| !p)
                    .unwrap_or(present[g].len());
                bound = bound.min(prefix * group.block_size);
            }
        }
        for (g, group) in self.groups.iter().enumerate() {
            if let Some(need) = group.blocks_needed_at_end() {
                let end = (bound / group.block_size.max(1)).min(blocks_of(group));
                let lookback = match group.kind {
                    GroupKind::Mamba => MAMBA_LOOKBACK_BLOCKS,
                    _ => need.max(16),
                };
                let start = end.saturating_sub(need + lookback);
                if end > 0 {
                    present[g] = self.present(g, start..end, hashes).await?;
                }
            }
        }
        let hit = groups::longest_common_hit(&self.groups, &present, token_len);
        let (checked, served) = self
            .groups
            .iter()
            .zip(&present)
            .fold((0, 0), |(c, s), (g, p)| {
                (c + p.len(), s + (hit / g.block_size.max(1)).min(p.len()))
            });
        let m = metrics::global();
        m.add_keys(METRICS_LABEL, "lookup", "hit", served as u64);
        m.add_keys(METRICS_LABEL, "lookup", "miss", (checked - served) as u64);
        Ok(hit)
    }

    async fn reset(&self) -> Result<bool> {
        reset(&self.shared).await
    }
}

impl std::fmt::Debug for PoolLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolLookup").finish_non_exhaustive()
    }
}
