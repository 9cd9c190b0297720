//! The worker half: registration, loads before the forward, saves after it, completions.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use crate::layout::{KvLayout, TensorDesc};
use crate::lookup::{socket_path_from_env, LookupHandler, LookupServer};
use crate::meta::{decode_hashes, LoadPlan, SavePlan, StepMeta};
use crate::metrics_server::MetricsServer;
use crate::{EngineLayout, RankKeys};
use kvpool_core::backend::{GetOutcome, KvBackend, PutOutcome};
use kvpool_core::config::Config;
use kvpool_core::error::{Error, ErrorKind, Result};
use kvpool_core::key::{BlockHash, BlockKey, Namespace};
use kvpool_core::metrics;

const METRICS_LABEL: &str = "connector";

/// What `get_finished` reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FinishedTransfers {
    /// Finished requests whose saves are all done: vLLM may free their blocks now.
    pub sending: Vec<String>,
    /// Requests whose async load is done (successfully or not; failures are in
    /// `get_block_ids_with_load_errors`).
    pub recving: Vec<String>,
}

#[derive(Debug, Default)]
struct Progress {
    /// Save jobs in flight per request.
    inflight: HashMap<String, usize>,
    /// Requests that had saves planned and are not yet reported as finished sending.
    saving: HashSet<String>,
    /// Of those, the ones vLLM reported finished.
    finished: HashSet<String>,
    /// Async loads done since the last `get_finished`.
    done_recving: Vec<String>,
    /// Blocks whose load failed since the last `get_block_ids_with_load_errors`.
    load_errors: HashSet<u32>,
}

#[derive(Debug)]
struct Shared {
    backend: Arc<dyn KvBackend>,
    keys: RankKeys,
    put_step: u32,
    tp_rank: u32,
    max_batch: usize,
    progress: Mutex<Progress>,
    saves_done: Notify,
}

impl Shared {
    fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The worker half of the connector: one per worker process.
#[derive(Debug)]
pub struct WorkerConnector {
    layout: EngineLayout,
    shared: Arc<Shared>,
    kv: Mutex<Option<Arc<KvLayout>>>,
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
        if config.connector.use_layerwise {
            return Err(Error::config_invalid(
                "`use_layerwise` is not supported by kvpool; remove the key",
            ));
        }
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
        let keys = RankKeys::new(&layout)?;
        let max_batch = backend
            .info()
            .capabilities
            .max_batch
            .unwrap_or(usize::MAX)
            .max(1);
        let shared = Arc::new(Shared {
            backend,
            put_step: layout.put_step(),
            tp_rank: layout.tp_rank,
            max_batch,
            keys,
            progress: Mutex::new(Progress::default()),
            saves_done: Notify::new(),
        });
        let c = &config.connector;
        let lookup = if layout.tp_rank == 0 && layout.pp_rank == 0 {
            let path = socket_path_from_env(c.lookup_rpc_port, layout.dp_rank);
            let handler = Arc::new(PoolLookup {
                shared: shared.clone(),
                block_size: layout.block_size,
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
            Some(MetricsServer::bind(port)?)
        } else {
            None
        };
        Ok(WorkerConnector {
            saves: layout.saves(c.consumer_is_to_put),
            loads: layout.loads(c.consumer_is_to_load),
            layout,
            shared,
            kv: Mutex::new(None),
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

    /// vLLM's `register_kv_caches`: plans every block's bytes and registers the memory.
    ///
    /// # Safety
    /// The tensors' memory must stay valid while this connector lives; `owner` is kept with
    /// the regions and should hold the tensors.
    pub unsafe fn register_kv_caches(
        &self,
        tensors: &[TensorDesc],
        owner: Option<Arc<dyn Any + Send + Sync>>,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        let kv = unsafe { KvLayout::new(tensors, owner)? };
        if let Some(max) = self.shared.backend.info().capabilities.max_value_size {
            if kv.value_len() > max {
                return Err(Error::invalid_argument(format!(
                    "one block's KV on this rank is {} bytes, more than the {} backend's \
                     largest value ({max} bytes)",
                    kv.value_len(),
                    self.shared.backend.info().scheme
                )));
            }
        }
        for region in kv.regions() {
            self.runtime
                .block_on(self.shared.backend.register(region))?;
        }
        tracing::info!(
            blocks = kv.num_blocks(),
            value_bytes = kv.value_len(),
            regions = kv.regions().len(),
            "kvpool registered the KV cache"
        );
        *self.kv.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(kv));
        Ok(())
    }

    /// Bytes of one block's value on this rank, once registered.
    pub fn value_len(&self) -> Option<usize> {
        self.kv_layout().ok().map(|kv| kv.value_len())
    }

    fn kv_layout(&self) -> Result<Arc<KvLayout>> {
        self.kv
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Error::invalid_argument("register_kv_caches has not been called"))
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

    /// vLLM's `start_load_kv`: runs this step's synchronous loads to completion and starts the
    /// asynchronous ones. A block that cannot be loaded (a miss, a corrupt value, a backend
    /// error) is reported by [`get_block_ids_with_load_errors`](Self::get_block_ids_with_load_errors),
    /// so vLLM recomputes it.
    pub fn start_load_kv(&self) -> Result<()> {
        let loads = self.take_plans(|m| std::mem::take(&mut m.loads));
        if loads.is_empty() {
            return Ok(());
        }
        if !self.loads {
            tracing::warn!("load planned for a worker that does not load; ignored");
        }
        let kv = self.kv_layout()?;
        let mut sync_jobs = Vec::new();
        for plan in loads {
            let shared = self.shared.clone();
            let kv = kv.clone();
            if plan.is_async {
                self.runtime.spawn(async move {
                    let req_id = plan.req_id.clone();
                    let failed = load(&shared, &kv, plan).await;
                    let mut p = shared.progress();
                    p.load_errors.extend(failed);
                    p.done_recving.push(req_id);
                });
            } else {
                sync_jobs.push(async move {
                    let failed = load(&shared, &kv, plan).await;
                    shared.progress().load_errors.extend(failed);
                });
            }
        }
        if !sync_jobs.is_empty() {
            self.runtime.block_on(futures_join_all(sync_jobs));
        }
        Ok(())
    }

    /// vLLM's `wait_for_save`: hands this step's saves to the background and returns. The
    /// blocks stay untouched until the save is done: vLLM delays freeing a finished request's
    /// blocks until `get_finished` reports it, and [`handle_preemptions`](Self::handle_preemptions)
    /// waits for a preempted request's saves.
    pub fn wait_for_save(&self) -> Result<()> {
        let saves = self.take_plans(|m| std::mem::take(&mut m.saves));
        if saves.is_empty() || !self.saves {
            return Ok(());
        }
        let kv = self.kv_layout()?;
        for plan in saves {
            self.shared
                .progress()
                .inflight
                .entry(plan.req_id.clone())
                .and_modify(|n| *n += 1)
                .or_insert(1);
            let shared = self.shared.clone();
            let kv = kv.clone();
            self.runtime.spawn(async move {
                let req_id = plan.req_id.clone();
                if let Err(e) = save(&shared, &kv, plan).await {
                    tracing::warn!(req = req_id.as_str(), error = %e, "kvpool save failed");
                }
                {
                    let mut p = shared.progress();
                    if let Some(n) = p.inflight.get_mut(&req_id) {
                        *n -= 1;
                        if *n == 0 {
                            p.inflight.remove(&req_id);
                        }
                    }
                }
                shared.saves_done.notify_waiters();
            });
        }
        Ok(())
    }

    /// Blocks until every save in flight for `req_ids` is done (their blocks are about to be
    /// reused), or `timeout` passes.
    pub fn wait_for_requests(&self, req_ids: &[String], timeout: Duration) -> bool {
        let shared = self.shared.clone();
        let pending = |p: &Progress| req_ids.iter().any(|id| p.inflight.contains_key(id));
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                loop {
                    let notified = shared.saves_done.notified();
                    if !pending(&shared.progress()) {
                        return;
                    }
                    notified.await;
                }
            })
            .await
            .is_ok()
        })
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
        }
    }

    /// vLLM's `get_block_ids_with_load_errors`: blocks whose load failed since the last call.
    pub fn get_block_ids_with_load_errors(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.shared.progress().load_errors.drain().collect();
        ids.sort_unstable();
        ids
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

    /// Waits for every save in flight (up to `timeout`) and closes the backend.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        let ids: Vec<String> = self.shared.progress().inflight.keys().cloned().collect();
        if !self.wait_for_requests(&ids, timeout) {
            tracing::warn!("kvpool shutdown: saves still running after {timeout:?}");
        }
        self.runtime.block_on(self.shared.backend.close())
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

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(jobs: Vec<F>) {
    let handles: Vec<_> = jobs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

/// Loads one plan; returns the block ids that could not be loaded.
async fn load(shared: &Shared, kv: &KvLayout, plan: LoadPlan) -> Vec<u32> {
    let hashes = match decode_hashes(&plan.hashes, plan.block_ids.len(), &plan.req_id) {
        Ok(h) => h,
        Err(_) => return plan.block_ids,
    };
    let mut items = Vec::with_capacity(hashes.len());
    for (&block, hash) in plan.block_ids.iter().zip(&hashes) {
        match kv.scatter(block) {
            Ok(iov) => items.push((block, shared.keys.own_key(*hash), iov)),
            Err(_) => return plan.block_ids,
        }
    }
    // Ranks start at different blocks, so they read from different places first.
    if !items.is_empty() {
        let shift = shared.tp_rank as usize % items.len();
        items.rotate_left(shift);
    }
    let mut failed = Vec::new();
    let mut bytes = 0u64;
    let mut hits = 0u64;
    for chunk in items.chunks(shared.max_batch) {
        let batch: Vec<_> = chunk
            .iter()
            .map(|(_, k, iov)| (k.clone(), iov.clone()))
            .collect();
        match shared.backend.get_into(batch).await {
            Ok(outcomes) => {
                for ((block, _, iov), outcome) in chunk.iter().zip(outcomes) {
                    match outcome {
                        GetOutcome::Hit => {
                            hits += 1;
                            bytes += iov.len() as u64;
                        }
                        GetOutcome::Miss => failed.push(*block),
                        GetOutcome::Failed(e) => {
                            tracing::warn!(req = plan.req_id.as_str(), block, error = %e, "load failed");
                            failed.push(*block);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(req = plan.req_id.as_str(), error = %e, "load failed");
                failed.extend(chunk.iter().map(|(b, _, _)| *b));
            }
        }
    }
    let m = metrics::global();
    m.add_keys(METRICS_LABEL, "load", "hit", hits);
    m.add_keys(METRICS_LABEL, "load", "failed", failed.len() as u64);
    m.add_bytes(METRICS_LABEL, "load", bytes);
    failed
}

/// Saves this rank's share of one plan: `exists` first, then `put` of the missing keys.
async fn save(shared: &Shared, kv: &KvLayout, plan: SavePlan) -> Result<()> {
    let hashes = decode_hashes(&plan.hashes, plan.block_ids.len(), &plan.req_id)?;
    let step = shared.put_step as usize;
    let mine = shared.tp_rank as usize % step;
    let share: Vec<(u32, BlockKey)> = plan
        .block_ids
        .iter()
        .zip(&hashes)
        .enumerate()
        .filter(|(i, _)| (plan.first_block as usize + i) % step == mine)
        .map(|(_, (&block, hash))| (block, shared.keys.own_key(*hash)))
        .collect();
    let (mut stored, mut existed, mut failed, mut bytes) = (0u64, 0u64, 0u64, 0u64);
    for chunk in share.chunks(shared.max_batch) {
        let keys: Vec<BlockKey> = chunk.iter().map(|(_, k)| k.clone()).collect();
        let present = shared.backend.exists(&keys).await?;
        let mut items = Vec::new();
        for ((block, key), present) in chunk.iter().zip(present) {
            if present {
                existed += 1;
            } else {
                items.push((key.clone(), kv.gather(*block)?));
            }
        }
        if items.is_empty() {
            continue;
        }
        let lens: Vec<usize> = items.iter().map(|(_, iov)| iov.len()).collect();
        for (outcome, len) in shared.backend.put(items).await?.into_iter().zip(lens) {
            match outcome {
                PutOutcome::Stored => {
                    stored += 1;
                    bytes += len as u64;
                }
                PutOutcome::Exists => existed += 1,
                PutOutcome::Failed(e) => {
                    failed += 1;
                    tracing::debug!(req = plan.req_id.as_str(), error = %e, "block not saved");
                }
            }
        }
    }
    let m = metrics::global();
    m.add_keys(METRICS_LABEL, "save", "stored", stored);
    m.add_keys(METRICS_LABEL, "save", "exists", existed);
    m.add_keys(METRICS_LABEL, "save", "failed", failed);
    m.add_bytes(METRICS_LABEL, "save", bytes);
    Ok(())
}

/// Answers the scheduler's lookups on worker rank 0.
struct PoolLookup {
    shared: Arc<Shared>,
    block_size: usize,
}

#[async_trait]
impl LookupHandler for PoolLookup {
    async fn lookup(&self, token_len: usize, hashes: &[BlockHash]) -> Result<usize> {
        let blocks = token_len.div_ceil(self.block_size).min(hashes.len());
        if blocks == 0 {
            return Ok(0);
        }
        let ranks: &[Arc<Namespace>] = self.shared.keys.all();
        let keys: Vec<BlockKey> = ranks
            .iter()
            .flat_map(|ns| {
                hashes[..blocks]
                    .iter()
                    .map(move |h| BlockKey::new(ns.clone(), *h))
            })
            .collect();
        let mut present = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.shared.max_batch) {
            present.extend(self.shared.backend.exists(chunk).await?);
        }
        // The first block missing on any rank ends the prefix.
        let prefix = (0..blocks)
            .find(|&i| (0..ranks.len()).any(|r| !present[r * blocks + i]))
            .unwrap_or(blocks);
        let hit = if prefix == blocks {
            token_len
        } else {
            prefix * self.block_size
        };
        let m = metrics::global();
        m.add_keys(METRICS_LABEL, "lookup", "hit", prefix as u64);
        m.add_keys(METRICS_LABEL, "lookup", "miss", (blocks - prefix) as u64);
        Ok(hit)
    }
}

impl std::fmt::Debug for PoolLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolLookup").finish_non_exhaustive()
    }
}
