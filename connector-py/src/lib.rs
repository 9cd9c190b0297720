//! `kvpool._native`: the Rust side of the Python package.
//!
//! Everything here converts Python values to Rust ones and back, and releases the GIL around
//! every call that can block (backend I/O, lookups, waits). The logic lives in
//! `kvpool-connector` and the backends (linked through the `kvpool` facade).

use std::any::Any;
use std::num::NonZeroUsize;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use kvpool::config::{Config, ConfigSources};
use kvpool::hash::{token_block_hashes, vllm_block_hashes, VllmHashAlgo};
use kvpool::key::KeyFormat;
use kvpool::{BlockHash, BlockKey, Error, KvBackend, KvBackendExt, PutOutcome};
use kvpool_connector::{
    BoundaryState, CachedRequest, Device, EngineLayout, NewRequest, PoolEvent, RequestInfo,
    SchedulerConnector, StepInput, StreamHandle, TensorDesc, Transfer as BlockTransfer,
    WorkerConnector,
};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

create_exception!(
    _native,
    KvPoolError,
    PyException,
    "A kvpool error. `kind` names what went wrong (config_invalid, invalid_argument, \
     unavailable, timeout, no_space, corrupted, unsupported, closed, unexpected) and \
     `temporary` says whether retrying may help."
);

fn to_py(err: Error) -> PyErr {
    Python::with_gil(|py| {
        let e = KvPoolError::new_err(err.to_string());
        let value = e.value(py);
        let _ = value.setattr("kind", err.kind().as_str());
        let _ = value.setattr("temporary", err.is_temporary());
        e
    })
}

fn config_from_json(config_json: Option<&str>, use_env: bool) -> PyResult<Config> {
    let extra = match config_json {
        None => None,
        Some(text) => Some(serde_json::from_str(text).map_err(|e| {
            to_py(Error::config_invalid(format!(
                "kv_connector_extra_config is not valid JSON: {e}"
            )))
        })?),
    };
    let sources = ConfigSources {
        file: None,
        extra_config: extra,
        use_env,
    };
    Config::load(&sources).map_err(to_py)
}

fn layout_from_json(layout_json: &str) -> PyResult<EngineLayout> {
    let layout: EngineLayout = serde_json::from_str(layout_json)
        .map_err(|e| to_py(Error::invalid_argument(format!("engine layout: {e}"))))?;
    layout.validate().map_err(to_py)?;
    Ok(layout)
}

fn hashes_from_py(items: Vec<Vec<u8>>) -> PyResult<Vec<BlockHash>> {
    items
        .iter()
        .map(|b| BlockHash::from_slice(b).map_err(to_py))
        .collect()
}

fn runtime() -> PyResult<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvpool")
        .enable_all()
        .build()
        .map_err(|e| to_py(Error::new(kvpool::ErrorKind::Unexpected, e.to_string())))
}

/// A handle on the configured backend, for scripts and tools.
#[pyclass(module = "kvpool._native", frozen)]
struct Pool {
    backend: Arc<dyn KvBackend>,
    runtime: tokio::runtime::Runtime,
}

fn parse_key(key: &str) -> PyResult<BlockKey> {
    BlockKey::parse(key).map_err(to_py)
}

fn parse_keys(keys: &[String]) -> PyResult<Vec<BlockKey>> {
    keys.iter().map(|k| parse_key(k)).collect()
}

#[pymethods]
impl Pool {
    #[new]
    #[pyo3(signature = (config_json=None, use_env=true))]
    fn new(py: Python<'_>, config_json: Option<&str>, use_env: bool) -> PyResult<Self> {
        let config = config_from_json(config_json, use_env)?;
        let runtime = runtime()?;
        let backend = py
            .allow_threads(|| runtime.block_on(kvpool::open(&config)))
            .map_err(to_py)?;
        Ok(Pool { backend, runtime })
    }

    /// `{"scheme": ..., "description": ..., "capabilities": {...}}` as JSON.
    fn info(&self) -> String {
        serde_json::to_string(self.backend.info()).unwrap_or_default()
    }

    /// Stores `data` under `key`; returns "stored" or "exists" (the first value is kept).
    fn put(&self, py: Python<'_>, key: &str, data: Vec<u8>) -> PyResult<&'static str> {
        let key = parse_key(key)?;
        let outcome = py
            .allow_threads(|| {
                self.runtime
                    .block_on(self.backend.put_bytes(key, data.into()))
            })
            .map_err(to_py)?;
        match outcome {
            PutOutcome::Stored => Ok("stored"),
            PutOutcome::Exists => Ok("exists"),
            PutOutcome::Failed(e) => Err(to_py(e)),
        }
    }

    /// The value under `key`, or None on a miss.
    fn get<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = parse_key(key)?;
        let value = py
            .allow_threads(|| self.runtime.block_on(self.backend.get_bytes(&key)))
            .map_err(to_py)?;
        Ok(value.map(|v| PyBytes::new(py, &v)))
    }

    /// One bool per key, in order.
    fn exists(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<Vec<bool>> {
        let keys = parse_keys(&keys)?;
        py.allow_threads(|| self.runtime.block_on(self.backend.exists(&keys)))
            .map_err(to_py)
    }

    /// Removes the keys (absent keys are fine).
    fn remove(&self, py: Python<'_>, keys: Vec<String>) -> PyResult<()> {
        let keys = parse_keys(&keys)?;
        py.allow_threads(|| self.runtime.block_on(self.backend.remove(&keys)))
            .map_err(to_py)
    }

    fn close(&self, py: Python<'_>) -> PyResult<()> {
        py.allow_threads(|| self.runtime.block_on(self.backend.close()))
            .map_err(to_py)
    }
}

/// The scheduler half of the vLLM connector.
#[pyclass(module = "kvpool._native", frozen)]
struct Scheduler {
    inner: SchedulerConnector,
}

type NewReqTuple = (
    String,
    Vec<u32>,
    Vec<Vec<u8>>,
    Vec<Vec<u32>>,
    usize,
    usize,
    Option<String>,
    Option<String>,
);
/// (layer name, data pointer, shape, strides in elements, element size).
type TensorTuple = (String, usize, Vec<usize>, Vec<isize>, usize, String);
type CachedReqTuple = (
    String,
    bool,
    Vec<Vec<u32>>,
    usize,
    usize,
    Vec<u32>,
    Vec<Vec<u8>>,
);

#[pymethods]
impl Scheduler {
    #[new]
    fn new(config_json: &str, layout_json: &str) -> PyResult<Self> {
        let config = config_from_json(Some(config_json), true)?;
        let layout = layout_from_json(layout_json)?;
        Ok(Scheduler {
            inner: SchedulerConnector::new(&config, layout).map_err(to_py)?,
        })
    }

    /// Whether `build_connector_meta` needs running requests' tokens and hashes.
    fn needs_running_tokens(&self) -> bool {
        self.inner.needs_running_tokens()
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (req_id, prompt_token_ids, block_hashes, num_tokens, num_computed_tokens, lora_name=None, cache_salt=None))]
    fn get_num_new_matched_tokens(
        &self,
        py: Python<'_>,
        req_id: &str,
        prompt_token_ids: Vec<u32>,
        block_hashes: Vec<Vec<u8>>,
        num_tokens: usize,
        num_computed_tokens: usize,
        lora_name: Option<&str>,
        cache_salt: Option<&str>,
    ) -> PyResult<(usize, bool)> {
        let hashes = hashes_from_py(block_hashes)?;
        let info = RequestInfo {
            req_id,
            prompt_token_ids: &prompt_token_ids,
            block_hashes: &hashes,
            num_tokens,
            lora_name,
            cache_salt,
        };
        Ok(py.allow_threads(|| {
            self.inner
                .get_num_new_matched_tokens(&info, num_computed_tokens)
        }))
    }

    /// `block_ids`: the request's blocks per KV-cache group.
    fn update_state_after_alloc(
        &self,
        req_id: &str,
        block_ids: Vec<Vec<u32>>,
        num_external_tokens: usize,
    ) {
        self.inner
            .update_state_after_alloc(req_id, block_ids, num_external_tokens);
    }

    /// `new_requests`: (req_id, prompt_token_ids, block_hashes, block_ids per group,
    /// num_computed, num_scheduled, lora_name, cache_salt); `cached_requests`: (req_id,
    /// resumed, new_block_ids per group, num_computed, num_scheduled, all_token_ids,
    /// block_hashes); `boundary_states`: vLLM's boundary-state hand-offs as (req_id,
    /// group_id, block_id, boundary_tokens), checked in Rust.
    #[pyo3(signature = (new_requests, cached_requests, finished_req_ids, preempted_req_ids, boundary_states=Vec::new()))]
    fn build_connector_meta<'py>(
        &self,
        py: Python<'py>,
        new_requests: Vec<NewReqTuple>,
        cached_requests: Vec<CachedReqTuple>,
        finished_req_ids: Vec<String>,
        preempted_req_ids: Vec<String>,
        boundary_states: Vec<(String, i64, i64, i64)>,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let mut step = StepInput {
            finished_req_ids,
            preempted_req_ids,
            boundary_states: boundary_states
                .into_iter()
                .map(|(req_id, group, block_id, boundary_tokens)| BoundaryState {
                    req_id,
                    group,
                    block_id,
                    boundary_tokens,
                })
                .collect(),
            ..StepInput::default()
        };
        for (req_id, prompt, hashes, block_ids, computed, scheduled, lora, salt) in new_requests {
            step.new_requests.push(NewRequest {
                req_id,
                prompt_token_ids: prompt,
                block_hashes: hashes_from_py(hashes)?,
                block_ids,
                num_computed_tokens: computed,
                num_scheduled_tokens: scheduled,
                lora_name: lora,
                cache_salt: salt,
            });
        }
        for (req_id, resumed, new_block_ids, computed, scheduled, tokens, hashes) in cached_requests
        {
            step.cached_requests.push(CachedRequest {
                req_id,
                resumed_from_preemption: resumed,
                new_block_ids,
                num_computed_tokens: computed,
                num_scheduled_tokens: scheduled,
                all_token_ids: tokens,
                block_hashes: hashes_from_py(hashes)?,
            });
        }
        let bytes = py.allow_threads(|| self.inner.build_connector_meta(step));
        Ok(PyBytes::new(py, &bytes))
    }

    /// Whether freeing the request's blocks must wait for `finished_sending`.
    fn request_finished(&self, req_id: &str, num_blocks: usize) -> bool {
        self.inner.request_finished(req_id, num_blocks)
    }

    /// As `request_finished`, with the request's blocks per KV-cache group (hybrid models).
    fn request_finished_all_groups(&self, req_id: &str, block_ids: Vec<Vec<u32>>) -> bool {
        self.inner.request_finished_all_groups(req_id, &block_ids)
    }

    fn update_connector_output(
        &self,
        finished_sending: Vec<String>,
        finished_recving: Vec<String>,
        invalid_block_ids: Vec<u32>,
        failed_recving: Vec<String>,
    ) {
        self.inner.update_connector_output(
            &finished_sending,
            &finished_recving,
            &invalid_block_ids,
            &failed_recving,
        );
    }

    fn tracked_requests(&self) -> usize {
        self.inner.tracked_requests()
    }

    /// vLLM's `reset_cache`: whether the pool was reset (see `reset_clears_shared_pool`).
    fn reset_cache(&self, py: Python<'_>) -> bool {
        py.allow_threads(|| self.inner.reset_cache())
    }
}

/// The worker half of the vLLM connector.
#[pyclass(module = "kvpool._native", frozen)]
struct Worker {
    inner: WorkerConnector,
}

/// Keeps the Python objects that own the registered tensors alive as long as the regions.
struct PyOwner(#[allow(dead_code)] PyObject);

#[pymethods]
impl Worker {
    #[new]
    fn new(py: Python<'_>, config_json: &str, layout_json: &str) -> PyResult<Self> {
        let config = config_from_json(Some(config_json), true)?;
        let layout = layout_from_json(layout_json)?;
        let inner = py
            .allow_threads(|| WorkerConnector::open(&config, layout))
            .map_err(to_py)?;
        Ok(Worker { inner })
    }

    fn backend_description(&self) -> String {
        self.inner.backend_description()
    }

    /// `host:port` of the metrics endpoint when `metrics_port` is set.
    fn metrics_address(&self) -> Option<String> {
        self.inner.metrics_addr().map(|a| a.to_string())
    }

    /// `tensors`: (layer name, data pointer, shape, strides in elements, element size, device
    /// as torch spells it) for every cache tensor in registration order; `owner` keeps them
    /// alive.
    /// `groups`: the KV-cache group of each tensor (hybrid models); empty: all in group 0.
    #[pyo3(signature = (tensors, owner, groups=Vec::new()))]
    fn register_kv_caches(
        &self,
        py: Python<'_>,
        tensors: Vec<TensorTuple>,
        owner: PyObject,
        groups: Vec<u32>,
    ) -> PyResult<usize> {
        let descs: Vec<TensorDesc> = tensors
            .into_iter()
            .map(|(layer, ptr, shape, strides, elem_size, device)| {
                Ok(TensorDesc {
                    device: Device::from_str(&device).map_err(|e| {
                        Error::invalid_argument(format!("layer {layer:?}: {}", e.message()))
                    })?,
                    layer,
                    ptr,
                    shape,
                    strides,
                    elem_size,
                })
            })
            .collect::<Result<_, Error>>()
            .map_err(to_py)?;
        let owner: Arc<dyn Any + Send + Sync> = Arc::new(PyOwner(owner));
        // SAFETY: the descriptions come from live tensors, and `owner` (holding them) lives
        // as long as the regions, so the memory stays valid.
        py.allow_threads(|| unsafe {
            self.inner
                .register_kv_cache_groups(&descs, &groups, Some(owner))
        })
        .map_err(to_py)?;
        Ok(self.inner.value_len().unwrap_or(0))
    }

    fn bind_connector_metadata(&self, meta: &[u8]) -> PyResult<()> {
        self.inner.bind_connector_metadata(meta).map_err(to_py)
    }

    fn clear_connector_metadata(&self) {
        self.inner.clear_connector_metadata();
    }

    /// `stream`: the engine's current compute stream handle (0 for CPU KV).
    #[pyo3(signature = (stream=0))]
    fn start_load_kv(&self, py: Python<'_>, stream: u64) -> PyResult<()> {
        py.allow_threads(|| self.inner.start_load_kv(StreamHandle(stream)))
            .map_err(to_py)
    }

    #[pyo3(signature = (stream=0))]
    fn wait_for_save(&self, py: Python<'_>, stream: u64) -> PyResult<()> {
        py.allow_threads(|| self.inner.wait_for_save(StreamHandle(stream)))
            .map_err(to_py)
    }

    /// Layerwise: returns once `layer_name`'s KV of this step's loads is in the cache, or on
    /// a device once work queued on `stream` after the call waits for the copies that put it
    /// there.
    #[pyo3(signature = (layer_name, stream=0))]
    fn wait_for_layer_load(&self, py: Python<'_>, layer_name: &str, stream: u64) -> PyResult<()> {
        py.allow_threads(|| {
            self.inner
                .wait_for_layer_load(layer_name, StreamHandle(stream))
        })
        .map_err(to_py)
    }

    /// Layerwise: starts saving `layer_name`'s KV after the work queued on `stream`.
    #[pyo3(signature = (layer_name, stream=0))]
    fn save_kv_layer(&self, py: Python<'_>, layer_name: &str, stream: u64) -> PyResult<()> {
        py.allow_threads(|| self.inner.save_kv_layer(layer_name, StreamHandle(stream)))
            .map_err(to_py)
    }

    /// Saves `block_ids` under `keys` (vllm-ascend key strings), after the work queued on
    /// `stream`; returns a `Transfer`.
    #[pyo3(signature = (block_ids, keys, stream=0))]
    fn save_blocks(
        &self,
        py: Python<'_>,
        block_ids: Vec<u32>,
        keys: Vec<String>,
        stream: u64,
    ) -> PyResult<Transfer> {
        let keys = parse_keys(&keys)?;
        py.allow_threads(|| {
            self.inner
                .save_blocks(&block_ids, keys, StreamHandle(stream))
        })
        .map(|inner| Transfer { inner })
        .map_err(to_py)
    }

    /// Loads the values under `keys` into `block_ids`, after the work queued on `stream`;
    /// returns a `Transfer`.
    #[pyo3(signature = (block_ids, keys, stream=0))]
    fn load_blocks(
        &self,
        py: Python<'_>,
        block_ids: Vec<u32>,
        keys: Vec<String>,
        stream: u64,
    ) -> PyResult<Transfer> {
        let keys = parse_keys(&keys)?;
        py.allow_threads(|| {
            self.inner
                .load_blocks(&block_ids, keys, StreamHandle(stream))
        })
        .map(|inner| Transfer { inner })
        .map_err(to_py)
    }

    /// Free staging slots when the cache moves through staging, else None.
    fn free_staging_slots(&self) -> Option<usize> {
        self.inner.free_staging_slots()
    }

    fn handle_preemptions(&self, py: Python<'_>, meta: &[u8]) -> PyResult<()> {
        py.allow_threads(|| self.inner.handle_preemptions(meta))
            .map_err(to_py)
    }

    /// (finished sending, finished receiving, failed receiving) request ids.
    fn get_finished(
        &self,
        finished_req_ids: Vec<String>,
    ) -> (Vec<String>, Vec<String>, Vec<String>) {
        let done = self.inner.get_finished(&finished_req_ids);
        let failed = done.failed_recving.into_iter().map(|(id, _)| id).collect();
        (done.sending, done.recving, failed)
    }

    /// Loads and saves since the last call: (op, seconds, blocks, bytes, failed blocks).
    fn take_transfer_records(&self) -> Vec<(&'static str, f64, u64, u64, u64)> {
        self.inner
            .take_transfer_records()
            .into_iter()
            .map(|r| (r.op, r.seconds, r.blocks, r.bytes, r.failed))
            .collect()
    }

    fn get_block_ids_with_load_errors(&self) -> Vec<u32> {
        self.inner.get_block_ids_with_load_errors()
    }

    /// What the pool stored and lost since the last call (KV events on), each as
    /// ("stored", group, hash, parent hash or None, token ids, block size, LoRA name),
    /// ("removed", group, hash, None, [], 0, None) or ("cleared", 0, None, None, [], 0, None).
    #[allow(clippy::type_complexity)]
    fn take_pool_events<'py>(
        &self,
        py: Python<'py>,
    ) -> Vec<(
        &'static str,
        u32,
        Option<Bound<'py, PyBytes>>,
        Option<Bound<'py, PyBytes>>,
        Vec<u32>,
        u32,
        Option<String>,
    )> {
        let bytes = |h: &BlockHash| PyBytes::new(py, h.as_bytes());
        self.inner
            .take_pool_events()
            .into_iter()
            .map(|e| match e {
                PoolEvent::Stored(b) => (
                    "stored",
                    b.group,
                    Some(bytes(&b.hash)),
                    b.parent.as_ref().map(bytes),
                    b.token_ids,
                    b.block_size,
                    b.lora_name,
                ),
                PoolEvent::Removed { group, hash } => (
                    "removed",
                    group,
                    Some(bytes(&hash)),
                    None,
                    Vec::new(),
                    0,
                    None,
                ),
                PoolEvent::Cleared => ("cleared", 0, None, None, Vec::new(), 0, None),
            })
            .collect()
    }

    /// Per KV-cache group, how many tensor-parallel ranks split its blocks between them.
    fn group_put_steps(&self) -> Vec<u32> {
        self.inner.group_put_steps()
    }

    /// Blocks until the saves in flight are done, their backend writes from staging included,
    /// or `timeout_s` passes; True when done.
    fn wait_for_saves(&self, py: Python<'_>, timeout_s: f64) -> bool {
        py.allow_threads(|| self.inner.wait_for_saves(seconds(timeout_s)))
    }

    fn saves_in_flight(&self) -> usize {
        self.inner.saves_in_flight()
    }

    fn tracked_requests(&self) -> usize {
        self.inner.tracked_requests()
    }

    #[pyo3(signature = (timeout_s=30.0))]
    fn shutdown(&self, py: Python<'_>, timeout_s: f64) -> PyResult<()> {
        py.allow_threads(|| self.inner.shutdown(seconds(timeout_s)))
            .map_err(to_py)
    }
}

/// A timeout in seconds from Python: negative or NaN is no wait, too large to represent waits
/// without end (rather than panicking).
fn seconds(timeout_s: f64) -> Duration {
    if timeout_s.is_nan() || timeout_s <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(timeout_s).unwrap_or(Duration::MAX)
}

fn block_size(n: usize) -> PyResult<NonZeroUsize> {
    NonZeroUsize::new(n).ok_or_else(|| to_py(Error::invalid_argument("block_size must be > 0")))
}

/// kvpool's `tokens`-mode hashes of every full block (32 bytes each).
#[pyfunction]
#[pyo3(signature = (tokens, block_size, lora_name=None, cache_salt=None))]
fn token_hashes<'py>(
    py: Python<'py>,
    tokens: Vec<u32>,
    block_size: usize,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let bs = self::block_size(block_size)?;
    let hashes = py.allow_threads(|| token_block_hashes(&tokens, bs, lora_name, cache_salt));
    Ok(hashes
        .iter()
        .map(|h| PyBytes::new(py, h.as_bytes()))
        .collect())
}

/// vLLM's block hashes (`sha256` or `sha256_cbor`), reproduced in Rust; `seed` is
/// `PYTHONHASHSEED` (None = unset).
#[pyfunction]
#[pyo3(signature = (tokens, block_size, algo="sha256", seed=None, lora_name=None, cache_salt=None))]
fn vllm_hashes<'py>(
    py: Python<'py>,
    tokens: Vec<u32>,
    block_size: usize,
    algo: &str,
    seed: Option<&str>,
    lora_name: Option<&str>,
    cache_salt: Option<&str>,
) -> PyResult<Vec<Bound<'py, PyBytes>>> {
    let bs = self::block_size(block_size)?;
    let algo = VllmHashAlgo::from_str(algo).map_err(to_py)?;
    let seed = seed
        .map(str::to_string)
        .unwrap_or_else(kvpool::hash::none_hash_seed_from_env);
    let hashes = vllm_block_hashes(algo, &seed, &tokens, bs, lora_name, cache_salt);
    Ok(hashes
        .iter()
        .map(|h| PyBytes::new(py, h.as_bytes()))
        .collect())
}

/// The vllm-ascend string key of a block. `key_format` `"current"` (Ascend Store v0.20.2 and
/// later, as the connector writes by default):
/// `{model}@pcp0@dcp0@head_or_tp_rank:{h}@pp_rank:{p}@group:{g}@cache_role:kv@cache_family:{f}@{hex}`;
/// `"v0.18"`: `{model}@pcp0@dcp0@head_or_tp_rank:{h}@pp_rank:{p}@{hex}`.
#[pyfunction]
#[pyo3(signature = (model, block_hash, head_or_tp_rank=0, pp_rank=0, key_format="current", group=0, cache_family="default"))]
fn block_key(
    model: &str,
    block_hash: Vec<u8>,
    head_or_tp_rank: u32,
    pp_rank: u32,
    key_format: &str,
    group: u32,
    cache_family: &str,
) -> PyResult<String> {
    let hash = BlockHash::from_slice(&block_hash).map_err(to_py)?;
    let ns = match key_format.parse::<KeyFormat>().map_err(to_py)? {
        KeyFormat::Current => {
            kvpool::Namespace::current(model, 0, 0, head_or_tp_rank, pp_rank, group, cache_family)
        }
        KeyFormat::V018 => kvpool::Namespace::new(model, 0, 0, head_or_tp_rank, pp_rank),
    }
    .map_err(to_py)?;
    Ok(BlockKey::new(Arc::new(ns), hash).to_key_string())
}

/// The effective configuration for `config_json` as JSON (secrets redacted by each backend).
#[pyfunction]
#[pyo3(signature = (config_json=None, use_env=true))]
fn load_config(config_json: Option<&str>, use_env: bool) -> PyResult<String> {
    let config = config_from_json(config_json, use_env)?;
    Ok(config.to_json().to_string())
}

/// Prometheus text of every metric in this process.
#[pyfunction]
fn metrics_text() -> String {
    kvpool::metrics::global().encode()
}

/// The backends this build can open, as the registry knows them (sorted).
#[pyfunction]
fn backends() -> Vec<&'static str> {
    kvpool::registered_schemes()
}

/// A save or load started by `Worker.save_blocks` / `Worker.load_blocks`.
#[pyclass(module = "kvpool._native", frozen)]
struct Transfer {
    inner: BlockTransfer,
}

#[pymethods]
impl Transfer {
    /// Whether it has completed.
    fn is_done(&self) -> bool {
        self.inner.is_done()
    }

    /// Waits up to `timeout_s`; the block ids that failed, or None if still running.
    #[pyo3(signature = (timeout_s=60.0))]
    fn wait(&self, py: Python<'_>, timeout_s: f64) -> Option<Vec<u32>> {
        py.allow_threads(|| self.inner.wait(seconds(timeout_s)))
    }
}

/// The log filter without `KVPOOL_LOG`: kvpool's own start-up and reset lines (a handful per
/// process) and every warning.
const DEFAULT_LOG_FILTER: &str = "warn,kvpool=info";

/// Writes kvpool's log events to stderr, filtered by `KVPOOL_LOG` (tracing's env-filter
/// syntax, e.g. `debug` or `warn,kvpool_connector=debug`).
///
/// Events are written by the thread that emits them, never through Python's `logging`: a
/// Tokio worker that had to take the GIL to log could deadlock against a Python thread that
/// holds the GIL while it waits for that worker. A process that already installed a tracing
/// subscriber keeps its own.
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let requested = std::env::var("KVPOOL_LOG").ok();
    let (filter, rejected) = match requested.as_deref().map(EnvFilter::try_new) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (EnvFilter::new(DEFAULT_LOG_FILTER), Some(e)),
        None => (EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .is_ok();
    if let (true, Some(e)) = (installed, rejected) {
        tracing::warn!(
            target: "kvpool",
            "KVPOOL_LOG={:?} is not a valid log filter ({e}); using {DEFAULT_LOG_FILTER:?}",
            requested.unwrap_or_default()
        );
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    init_logging();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("KvPoolError", m.py().get_type::<KvPoolError>())?;
    m.add_class::<Pool>()?;
    m.add_class::<Scheduler>()?;
    m.add_class::<Worker>()?;
    m.add_class::<Transfer>()?;
    m.add_function(wrap_pyfunction!(token_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(vllm_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(block_key, m)?)?;
    m.add_function(wrap_pyfunction!(load_config, m)?)?;
    m.add_function(wrap_pyfunction!(metrics_text, m)?)?;
    m.add_function(wrap_pyfunction!(backends, m)?)?;
    Ok(())
}
