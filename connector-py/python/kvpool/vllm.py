"""kvpool as a vLLM KV connector (vLLM 0.33, KV connector API v1).

Load it with::

    --kv-transfer-config '{"kv_connector": "KvPoolConnector",
                           "kv_connector_module_path": "kvpool.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"backend": "mooncake",
                                                         "lookup_rpc_port": "0"}}'

This module only translates: vLLM objects become plain values, tensors become (pointer,
shape, strides) descriptions, and every decision is taken in Rust (``kvpool._native``), with
the GIL released around anything that blocks.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Optional

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    SupportsHMA,
)

from kvpool import _native
from kvpool.device import current_stream, describe_kv_caches
from kvpool.events import KvPoolKVEvents, PendingEvents, group_spec_details, pool_events
from kvpool.stats import KvPoolConnectorStats, KvPoolPromMetrics

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger("kvpool")

__all__ = ["KvPoolConnector", "KvPoolConnectorMetadata"]


class KvPoolConnectorMetadata(KVConnectorMetadata):
    """One step's plan, encoded by the scheduler half and decoded by each worker."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


def _group_kind(index: int, spec: Any) -> dict:
    """One KV-cache group's spec as kvpool's engine layout spells it."""
    from vllm.v1.kv_cache_interface import (
        AttentionSpec,
        FullAttentionSpec,
        MambaSpec,
        SlidingWindowSpec,
        UniformTypeKVCacheSpecs,
    )

    if isinstance(spec, UniformTypeKVCacheSpecs):
        # Layers of one attention type with different shapes: the type is what matters.
        spec = next(iter(spec.kv_cache_specs.values()))
    block_size = int(spec.block_size)
    if isinstance(spec, SlidingWindowSpec):
        return {
            "kind": "sliding_window",
            "sliding_window": int(spec.sliding_window),
            "block_size": block_size,
        }
    if isinstance(spec, MambaSpec):
        return {"kind": "mamba", "block_size": block_size}
    if isinstance(spec, (FullAttentionSpec, AttentionSpec)):
        # Full attention and MLA; chunked local attention needs fewer blocks than this asks
        # for, so it is served (conservatively) as full attention.
        return {"kind": "full_attention", "block_size": block_size}
    raise _native.KvPoolError(
        f"KV-cache group {index} has a {type(spec).__name__}, which kvpool does not know how "
        "to save and load"
    )


def _kv_cache_groups(kv_cache_config: "Optional[KVCacheConfig]") -> list:
    """The engine's KV-cache groups; empty for one full-attention group (the common case,
    which then keys exactly as before hybrid support)."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    kinds = [_group_kind(i, g.kv_cache_spec) for i, g in enumerate(groups)]
    if len(kinds) == 1 and kinds[0]["kind"] == "full_attention":
        return []
    return kinds


def _engine_layout(
    vllm_config: "VllmConfig",
    role: KVConnectorRole,
    kv_cache_config: "Optional[KVCacheConfig]" = None,
) -> str:
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    tp_size = parallel.tensor_parallel_size
    pp_size = parallel.pipeline_parallel_size
    worker = role == KVConnectorRole.WORKER
    rank = parallel.rank if worker else 0
    return json.dumps(
        {
            "model": str(model.model),
            "block_size": vllm_config.cache_config.block_size,
            "tp_size": tp_size,
            "tp_rank": rank % tp_size,
            "pp_size": pp_size,
            "pp_rank": (rank // tp_size) % pp_size,
            "dp_rank": parallel.data_parallel_rank,
            "num_kv_heads": model.get_total_num_kv_heads(),
            "use_mla": bool(getattr(model, "use_mla", False)),
            "role": _role_name(vllm_config),
            "groups": _kv_cache_groups(kv_cache_config),
            "kv_events": _kv_events_enabled(vllm_config),
            "stage_layers": _stage_layers(vllm_config),
        }
    )


def _stage_layers(vllm_config: "VllmConfig") -> list:
    """KV-cache layers of each pipeline stage, as vLLM partitions the model's layers
    (layerwise keys name a stage's layers by their index within it)."""
    from vllm.distributed.utils import get_pp_indices

    total = vllm_config.model_config.get_total_num_hidden_layers()
    pp_size = vllm_config.parallel_config.pipeline_parallel_size
    return [end - start for start, end in (get_pp_indices(total, r, pp_size) for r in range(pp_size))]


def _forward_order(kv_caches: dict) -> dict:
    """The cache tensors in the order the forward runs their layers (layerwise keys and
    prefetching follow it)."""
    from vllm.model_executor.models.utils import extract_layer_index

    def index(name: str) -> int:
        try:
            return extract_layer_index(name)
        except Exception:  # a name without one layer index: keep vLLM's order
            return -1

    return dict(sorted(kv_caches.items(), key=lambda item: index(item[0])))


def _kv_events_enabled(vllm_config: "VllmConfig") -> bool:
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(events is not None and events.enable_kv_cache_events)


def _role_name(vllm_config: "VllmConfig") -> str:
    role = vllm_config.kv_transfer_config.kv_role
    return "kv_both" if role is None else str(role)


def _hashes(request: "Request") -> list:
    return [bytes(h) for h in request.block_hashes]


def _lora_name(request: Any) -> Optional[str]:
    lora = getattr(request, "lora_request", None)
    return None if lora is None else lora.lora_name


def _boundary_states(scheduler_output: "SchedulerOutput") -> list:
    """vLLM's exact Mamba state blocks handed to the connector in this step
    (``kv_connector_block_state.boundary_state_offloads``) as (req_id, group_id, block_id,
    boundary_tokens); Rust decides which are saved."""
    block_state = getattr(scheduler_output, "kv_connector_block_state", None)
    offloads = getattr(block_state, "boundary_state_offloads", None) or {}
    return [
        (req_id, int(group), int(block), int(tokens))
        for req_id, entries in offloads.items()
        for group, block, tokens in entries
    ]


def _per_group(block_ids: Any) -> list:
    """vLLM's per-group block ids (a tuple of lists) as plain lists."""
    return [list(ids) for ids in block_ids] if block_ids else []


class KvPoolConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector over a kvpool backend (Ascend Store's behaviour).

    It supports vLLM's hybrid KV-cache manager (``SupportsHMA``): every KV-cache group is
    saved and loaded (full attention, sliding window, Mamba state), each under its own keys,
    and a prefix hit is the longest one every group can serve."""

    def __init__(
        self,
        vllm_config: "VllmConfig",
        role: KVConnectorRole,
        kv_cache_config: "Optional[KVCacheConfig]" = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        config_json = json.dumps(dict(extra))
        layout_json = _engine_layout(vllm_config, role, kv_cache_config)
        effective = json.loads(_native.load_config(config_json, True))
        self._vllm_hashes = effective.get("hash_mode") == "vllm"
        self._layerwise = bool(effective.get("use_layerwise"))
        self._num_blocks = getattr(kv_cache_config, "num_blocks", None)
        # Layer name -> KV-cache group, for register_kv_caches.
        self._layer_groups = {
            name: g
            for g, group in enumerate(getattr(kv_cache_config, "kv_cache_groups", None) or ())
            for name in group.layer_names
        }
        # KV events: what the pool stores and loses, next to the GPU cache's own events.
        self._kv_events = _kv_events_enabled(vllm_config)
        self._events_medium = f"kvpool:{effective.get('backend', 'unknown')}"
        self._group_details = group_spec_details(kv_cache_config)
        # Scheduler side: reported events some rank has not reported yet.
        self._pending_events = PendingEvents()
        self._scheduler: Optional[_native.Scheduler] = None
        self._worker: Optional[_native.Worker] = None
        self._device = "cpu"
        # Scheduler side: requests seen in update_state_after_alloc, for their block hashes
        # and tokens when a step describes them only by id.
        self._requests: dict = {}
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = _native.Scheduler(config_json, layout_json)
        else:
            self._worker = _native.Worker(config_json, layout_json)
            logger.info("kvpool connector worker on %s", self._worker.backend_description())
            if self._worker.metrics_address():
                logger.info("kvpool metrics on http://%s/metrics", self._worker.metrics_address())

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: "VllmConfig") -> Optional[str]:
        """On CUDA, ask for block-outermost pages (BLHNC): a block's KV across all layers is
        then one contiguous run, one copy per block. The stored bytes do not depend on it
        (kvpool stores one canonical order), so vLLM may refuse it without harm."""
        from vllm.platforms import current_platform

        return "BLHNC" if current_platform.is_cuda() else None

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        """Layerwise hooks run between layers: a whole-forward CUDA graph would skip them."""
        value = (extra_config or {}).get("use_layerwise", False)
        if isinstance(value, str):
            # As kvpool's config reads it: Python configs and env vars carry strings.
            return value.strip().lower() in ("true", "1", "yes", "on")
        return bool(value)

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: Any = None) -> bool:
        # Sleep mode moves the KV cache; kvpool keeps its copy plans and staging for the
        # registered addresses until it learns to drop and rebuild them.
        return False

    # ---------------------------------------------------------------- scheduler side

    def get_num_new_matched_tokens(
        self, request: "Request", num_computed_tokens: int
    ) -> tuple[Optional[int], bool]:
        assert self._scheduler is not None
        prompt = request.prompt_token_ids
        if prompt is None:
            return 0, False
        return self._scheduler.get_num_new_matched_tokens(
            request.request_id,
            prompt,
            _hashes(request) if self._vllm_hashes else [],
            request.num_tokens,
            num_computed_tokens,
            _lora_name(request),
            request.cache_salt,
        )

    def update_state_after_alloc(
        self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int
    ) -> None:
        assert self._scheduler is not None
        self._requests[request.request_id] = request
        block_ids = _per_group(blocks.get_block_ids()) if num_external_tokens > 0 else []
        self._scheduler.update_state_after_alloc(
            request.request_id, block_ids, num_external_tokens
        )

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self._scheduler is not None
        scheduled = scheduler_output.num_scheduled_tokens
        new_requests = []
        for r in scheduler_output.scheduled_new_reqs:
            request = self._requests.get(r.req_id)
            new_requests.append(
                (
                    r.req_id,
                    r.prompt_token_ids or [],
                    _hashes(request) if self._vllm_hashes and request is not None else [],
                    _per_group(r.block_ids),
                    r.num_computed_tokens,
                    scheduled.get(r.req_id, 0),
                    _lora_name(r),
                    getattr(request, "cache_salt", None),
                )
            )
        cached = scheduler_output.scheduled_cached_reqs
        running = self._scheduler.needs_running_tokens()
        cached_requests = []
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            request = self._requests.get(req_id)
            tokens, hashes = [], []
            if running and request is not None:
                tokens = list(request.all_token_ids)
                hashes = _hashes(request) if self._vllm_hashes else []
            cached_requests.append(
                (
                    req_id,
                    req_id in cached.resumed_req_ids,
                    _per_group(new_ids),
                    cached.num_computed_tokens[i],
                    scheduled.get(req_id, 0),
                    tokens,
                    hashes,
                )
            )
        payload = self._scheduler.build_connector_meta(
            new_requests,
            cached_requests,
            list(scheduler_output.finished_req_ids),
            list(scheduler_output.preempted_req_ids or ()),
            _boundary_states(scheduler_output),
        )
        return KvPoolConnectorMetadata(payload)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(
            list(connector_output.finished_sending or ()),
            list(connector_output.finished_recving or ()),
            list(connector_output.invalid_block_ids or ()),
            list(connector_output.failed_recving or ()),
        )
        self._pending_events.add(connector_output.kv_cache_events)

    def take_events(self) -> list:
        """KV events every rank has reported since the last call (vLLM publishes them)."""
        return self._pending_events.take()

    def request_finished(
        self, request: "Request", block_ids: list
    ) -> tuple[bool, Optional[dict]]:
        assert self._scheduler is not None
        self._requests.pop(request.request_id, None)
        return self._scheduler.request_finished(request.request_id, len(block_ids)), None

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple
    ) -> tuple[bool, Optional[dict]]:
        """vLLM's finish hook for a connector that supports HMA (called instead of
        ``request_finished``, with the request's blocks per group)."""
        assert self._scheduler is not None
        self._requests.pop(request.request_id, None)
        delay = self._scheduler.request_finished_all_groups(
            request.request_id, _per_group(block_ids)
        )
        return delay, None

    def reset_cache(self) -> Optional[bool]:
        """vLLM's prefix-cache reset (``reset_prefix_cache(reset_connector=True)``): clears
        what belongs to this instance alone (a memory or rocksdb-ssd store, a tiered
        backend's local tiers); a shared pool only with ``reset_clears_shared_pool``. False
        when the pool could not be reset. The worker role has nothing of its own to reset."""
        if self._scheduler is None:
            return None
        self._pending_events.clear()
        return self._scheduler.reset_cache()

    # ------------------------------------------------------------------- worker side

    def register_kv_caches(self, kv_caches: dict) -> None:
        assert self._worker is not None
        if self._layerwise:
            kv_caches = _forward_order(kv_caches)
        tensors = describe_kv_caches(kv_caches, self._num_blocks, self._layer_groups)
        self._device = tensors[0][5] if tensors else "cpu"
        groups = [self._layer_groups.get(t[0], 0) for t in tensors]
        value_len = self._worker.register_kv_caches(tensors, kv_caches, groups)
        logger.info(
            "kvpool: %d cache tensors on %s, %d bytes per block",
            len(tensors),
            self._device,
            value_len,
        )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        assert self._worker is not None
        assert isinstance(connector_metadata, KvPoolConnectorMetadata)
        self._worker.bind_connector_metadata(connector_metadata.payload)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.clear_connector_metadata()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self._worker is not None
        if isinstance(kv_connector_metadata, KvPoolConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata.payload)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load_kv(current_stream(self._device))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layerwise: waits for this layer's loads. Otherwise loads complete in start_load_kv
        (sync) or before the request is scheduled (async)."""
        if self._layerwise and self._worker is not None:
            self._worker.wait_for_layer_load(layer_name, current_stream(self._device))

    def save_kv_layer(
        self,
        layer_name: str,
        kv_layer: "torch.Tensor",
        attn_metadata: Any,
        **kwargs: Any,
    ) -> None:
        """Layerwise: starts this layer's saves, after the forward's writes to it. Otherwise
        whole blocks are saved at the end of the step, in wait_for_save."""
        if self._layerwise and self._worker is not None:
            self._worker.save_kv_layer(layer_name, current_stream(self._device))

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.wait_for_save(current_stream(self._device))

    def get_finished(
        self, finished_req_ids: set
    ) -> tuple[Optional[set], Optional[set]]:
        results = self.get_transfer_results(finished_req_ids)
        return (results.finished_sending or None, results.finished_recving or None)

    def get_transfer_results(self, finished_req_ids: set) -> "KVConnectorTransferResults":
        """Finished saves and loads, and (hybrid models) loads that failed: vLLM recomputes
        those requests."""
        assert self._worker is not None
        sending, recving, failed = self._worker.get_finished(list(finished_req_ids))
        return KVConnectorTransferResults(
            finished_sending=set(sending),
            finished_recving=set(recving),
            failed_recving=set(failed),
        )

    def get_kv_connector_stats(self) -> Optional[KvPoolConnectorStats]:
        """This worker's loads and saves since the last call, for vLLM's stats."""
        if self._worker is None:
            return None
        records = self._worker.take_transfer_records()
        return KvPoolConnectorStats.from_records(records) if records else None

    def get_kv_connector_kv_cache_events(self) -> Optional[KvPoolKVEvents]:
        """What this worker's saves left in the pool and its loads found missing since the
        last call (KV events on); an empty container still counts this worker."""
        if self._worker is None or not self._kv_events:
            return None
        events = KvPoolKVEvents(num_workers=1, put_steps=self._worker.group_put_steps())
        records = self._worker.take_pool_events()
        if records:
            events.add_events(pool_events(records, self._events_medium, self._group_details))
        return events

    @classmethod
    def build_kv_connector_stats(
        cls, data: Optional[dict] = None
    ) -> Optional[KvPoolConnectorStats]:
        return KvPoolConnectorStats(data=data) if data is not None else KvPoolConnectorStats()

    @classmethod
    def build_prom_metrics(
        cls, vllm_config, metric_types, labelnames, per_engine_labelvalues
    ) -> KvPoolPromMetrics:
        return KvPoolPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def get_block_ids_with_load_errors(self) -> set:
        assert self._worker is not None
        return set(self._worker.get_block_ids_with_load_errors())

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(30.0)
