"""Drive a KV connector with vLLM 0.33's real scheduler and worker plumbing, on CPU.

Why: a connector is only correct if it survives the call sequence vLLM really makes.
Mocks of that sequence drift from vLLM; so these helpers build vLLM's own objects
(VllmConfig, v1 Scheduler, Request, KV-cache tensors from vLLM's allocator) and run the
worker half through vLLM's own hooks (set_forward_context,
KVConnectorModelRunnerMixin._get_kv_connector_output, @maybe_transfer_kv_layer). Only
the model is fake: "attention" writes deterministic K/V values for the scheduled
tokens, so a test can say exactly which bytes each block must hold.

Written for vLLM 0.33.0 (pinned; the connector API is experimental). Our own code,
modelled on what vLLM's tests/v1/kv_connector/unit/utils.py does, much smaller.

Typical use::

    cfg = make_vllm_config("ExampleConnector", None, {"shared_storage_path": d})
    sched = make_scheduler(cfg, num_blocks=64)
    rig = WorkerRig(cfg, sched.kv_cache_config)
    sched.add_request(make_request("a", list(range(40)), max_tokens=2))
    run_until_finished(sched, rig)
    assert_scheduler_empty(sched)

KV-cache layout handed to register_kv_caches (kv_format "fused", the default): exactly
what vLLM 0.33's GPU model runner passes, because it comes from vLLM's own
get_kv_cache_config_from_groups + allocate_kv_cache:
- {layer_name: tensor}, one tensor per layer, each the standardized logical view
  [num_blocks, num_kv_heads, block_size, 2 * head_size] (RFC #42082), dtype float16
  for the tiny model; all layers are views into ONE int8 backing buffer
  (kv_cache_config.kv_cache_tensors[0]: size, layer_stride, block_stride in bytes).
- Physical order = the cache layout, default "LBNHC" (vLLM's unit tests and the
  flash backend): layer l, block i occupy the contiguous byte range
  [l * layer_stride + i * block_stride, ... + page), page = block_stride =
  block_size * num_kv_heads * 2 * head_size * elem_size (tiny model:
  16 * 4 * 32 * 2 = 4096 B; layer_stride = num_blocks * 4096). Inside a page the
  order is [token n][head h][c], c < head_size is K, c >= head_size is V
  (flash semantics: kv.transpose(1, 2).split(head_size, -1); vLLM's CPU attention
  backend reads C differently, so treat a page as opaque bytes). The logical view is
  therefore NOT contiguous (strides (2048, 32, 128, 1) in elements): take block
  addresses from strides / data_ptr(), never from .contiguous().
- Other layouts can be asked for (make_vllm_config(kv_cache_layout=...)): "LBHNC"
  (page order [h][n][c]), "BLHNC"/"BLNHC" (block-outermost: block i holds every
  layer's page side by side, so layer_stride = page, block_stride = L * page);
  "LHBNC"/"BHLNC" split a block into per-head runs.

Hybrid models (vLLM's hybrid KV-cache manager, "HMA"; several KV-cache groups):
make_hybrid_kv_cache_config builds group 0 = full attention, group 1 = sliding
window with vLLM's planner; make_scheduler then runs vLLM's HybridKVCacheCoordinator
(needs a SupportsHMA connector, see make_vllm_config(hybrid=...)), and WorkerRig keeps
one block table per group. What vLLM 0.33 does there, observed with this harness:
- Block ids are per-group lists everywhere (KVCacheBlocks.get_block_ids(),
  NewRequestData.block_ids, CachedRequestData.new_block_ids[i], the block_ids of
  request_finished_all_groups). All groups draw from one BlockPool, so at any moment
  a non-null id belongs to one group, and the groups' layers alias the same bytes:
  block b of a full-attention layer and block b of a sliding-window layer are the
  same memory.
- A sliding-window group holds vLLM's null block (id 0) for every block wholly
  before the window: with num_computed tokens, blocks [0, (num_computed - window + 1)
  // block_size) are 0. At admission (local or external hit) they are 0 already;
  while a request runs, the scheduler nulls and FREES them at its next schedule()
  (remove_skipped_blocks), and may hand them to another group in that same step.
  CachedRequestData only carries new blocks, so a table built by appending (the
  worker's, WorkerRig's) keeps those stale ids: never read a sliding-window block
  below the window through it.
- invalid_block_ids is rejected for more than one group (RuntimeError in
  Scheduler._handle_invalid_blocks); failed_recving only acts on async loads.

Mamba (make_mamba_hybrid_kv_cache_config: group 0 = full attention, group 1 =
MambaSpec, mamba_cache_mode "align"), observed with this harness:
- allocate_kv_cache gives a Mamba layer the raw state view [num_blocks, 1, 1,
  state_bytes] int8 (state_bytes = MambaSpec.state_content_size_bytes, strides
  (page, ..., 1): block b's state is the first state_bytes of the layer's page b,
  the padding after it belongs to nobody). This is what register_kv_caches gets.
- The scheduler clips prefill chunks so that they end on block boundaries and
  never run past the last cacheable boundary, floor((prompt - 1) / bs) * bs
  (Scheduler._mamba_block_aligned_split).
- A Mamba block table is position-indexed, mostly null: the state after T
  tokens lives in the block at index ceil(T / bs) - 1; older state blocks are
  nulled and freed at the next schedule() once two steps old.
- WorkerRig fakes the state update: after each step, for each scheduled request
  with T = num_computed + num_scheduled tokens, every Mamba layer's block at index
  ceil(T / bs) - 1 gets expected_state(layer, tokens, T), which depends on the
  layer, on T and on ALL of tokens[:T]. Mamba layers do not call the connector's
  per-layer hooks (vLLM only wraps attention with @maybe_transfer_kv_layer).
- Prefill checkpoints (make_mamba_hybrid_kv_cache_config(num_prefill_checkpoint_
  blocks=1, prefill_checkpoint_alignment=1), what vLLM's Mamba2 mixer declares):
  the final prefill chunk is not split at the last cacheable boundary C =
  floor((prompt - 1) / bs) * bs; the state after C goes into a reserved block at
  table column cdiv(T, bs) - 2 (WorkerRig writes it there, placed by vLLM's own
  compute_mamba_prefill_checkpoints). Only the state at C is retained by default
  (cache_config.prefix_cache_retention_interval = 0).
- SchedulerOutput.kv_connector_block_state.boundary_state_offloads hands the
  connector {req_id: [(group, block_id, tokens)]}: the exact block holding the
  state after `tokens` (the checkpoint, retained step ends; with a hash unit finer
  than the Mamba block also a copy-on-write copy of the prompt's partial tail,
  which WorkerRig fills from SchedulerOutput.kv_cache_block_copies). vLLM sets
  the field to None after build_connector_meta: read it there.

kv_format "kv_pair": {layer_name: (k_cache, v_cache)}, each a contiguous
[num_blocks, block_size, num_kv_heads, head_size] tensor: the Ascend-NPU shape that
Ascend Store receives. vLLM itself never produces it; it exists so a connector can be
tested on both shapes. vLLM's ExampleConnector only understands "fused". With
several groups, the k-th layer of every group shares one (K, V) pair, mirroring the
aliasing of the fused layout.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vllm import SamplingParams
from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
)
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention.kv_transfer_utils import (
    maybe_transfer_kv_layer,
)
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_planning import (
    get_global_kv_cache_groups,
    get_kv_cache_config_from_groups,
    kv_cache_groups_tp_replicas,
)
from vllm.v1.core.kv_cache_utils import (
    get_request_block_hasher,
    init_none_hash,
    resolve_cache_hit_alignment_tokens,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import (
    AttentionSpec,
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MambaSpec,
    SlidingWindowSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import (
    KVConnectorModelRunnerMixin,
)
from vllm.model_executor.layers.mamba.checkpoint import (
    compute_mamba_prefill_checkpoints,
)
from vllm.v1.worker.utils import allocate_kv_cache, copy_kv_cache_blocks_inplace

TINY_OPT = Path(__file__).resolve().parent / "data" / "tiny-opt"

# What the fake sampler always "generates". Not the EOS id (the tiny OPT's eos is 2),
# so requests end by max_tokens unless a test asks for EOS.
SAMPLED_TOKEN_ID = 7
EOS_TOKEN_ID = 2


# --------------------------------------------------------------------------- config


def make_vllm_config(
    connector: str,
    module_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
    *,
    kv_role: str = "kv_both",
    block_size: int = 16,
    model_dir: str | Path = TINY_OPT,
    load_failure_policy: str = "recompute",
    kv_cache_layout: str = "LBNHC",
    hash_algo: str = "sha256",
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    max_model_len: int = 2048,
    enable_prefix_caching: bool = True,
    engine_id: str | None = None,
    hybrid: bool | None = None,
    num_layers: int | None = None,
    mamba_cache_mode: str | None = None,
    kv_events_config: Any = None,
) -> VllmConfig:
    """A real VllmConfig for a config-only local model dir, with a KV connector.

    `connector`/`module_path` are kv_connector/kv_connector_module_path exactly as a
    user writes them (module_path None for connectors vLLM registers itself).
    load_failure_policy defaults to "recompute" (vLLM's own default is "fail", which
    turns a failed load into a failed request): recompute is what production uses
    with a cache pool. kv_cache_layout is fixed here because the engine core normally
    resolves it before connectors are built.

    Hybrid models (several KV-cache groups, see make_hybrid_kv_cache_config):
    `hybrid` is vLLM's hybrid KV-cache manager ("HMA") switch,
    scheduler_config.disable_hybrid_kv_cache_manager:
    - None (default, no flag): VllmConfig decides. HMA stays ON iff the connector
      class is a SupportsHMA subclass (KVConnectorFactory.supports_hma_config);
      otherwise VllmConfig turns it OFF and logs the warning "Turning off hybrid
      kv cache manager because `--kv-transfer-config` selects a KV connector that
      does not support it. ..." (no error).
    - True (--enable-hybrid-kv-cache-manager): HMA forced ON. VllmConfig accepts
      this whatever the connector; with a connector that is not SupportsHMA,
      creating it (make_scheduler / WorkerRig) raises ValueError "Connector X does
      not support HMA but HMA is enabled. Please set
      `--disable-hybrid-kv-cache-manager`."
    - False (--disable-hybrid-kv-cache-manager): HMA OFF; vLLM's planner then
      merges sliding-window layers into one full-attention group.
    `num_layers` overrides the model's num_hidden_layers (the tiny OPT has 2).
    `mamba_cache_mode` sets cache_config.mamba_cache_mode (for
    make_mamba_hybrid_kv_cache_config: "align").
    `kv_events_config` is vLLM's KVEventsConfig (--kv-events-config): the scheduler then
    publishes its block pool's and the connector's KV events.
    """
    model_config = ModelConfig(
        model=str(model_dir),
        tokenizer=str(model_dir),
        skip_tokenizer_init=True,
        dtype="float16",
        seed=42,
        max_model_len=max_model_len,
        **(
            {"hf_overrides": {"num_hidden_layers": num_layers}}
            if num_layers is not None
            else {}
        ),
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=model_config.is_encoder_decoder,
        async_scheduling=False,
        **(
            {"disable_hybrid_kv_cache_manager": not hybrid}
            if hybrid is not None
            else {}
        ),
    )
    cache_config = CacheConfig(
        block_size=block_size,
        cache_dtype="auto",
        enable_prefix_caching=enable_prefix_caching,
        prefix_caching_hash_algo=hash_algo,
        **({"mamba_cache_mode": mamba_cache_mode} if mamba_cache_mode else {}),
    )
    cache_config.kv_cache_layout = kv_cache_layout
    kv_transfer_config = KVTransferConfig(
        kv_connector=connector,
        kv_connector_module_path=module_path,
        kv_role=kv_role,
        kv_connector_extra_config=dict(extra_config or {}),
        kv_load_failure_policy=load_failure_policy,
        **({"engine_id": engine_id} if engine_id is not None else {}),
    )
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        kv_transfer_config=kv_transfer_config,
        device_config=DeviceConfig("cpu"),
        **({"kv_events_config": kv_events_config} if kv_events_config else {}),
    )


def layer_names(vllm_config: VllmConfig) -> list[str]:
    """Attention layer names as vLLM's OPT model registers them."""
    n = vllm_config.model_config.hf_config.num_hidden_layers
    return [f"model.decoder.layers.{i}.self_attn.attn" for i in range(n)]


def make_kv_cache_config(vllm_config: VllmConfig, num_blocks: int) -> KVCacheConfig:
    """The KVCacheConfig the engine core would hand to scheduler and workers.

    One full-attention group over all layers; heads, head size and dtype come from
    the model config; tensor placement comes from vLLM's own planner for the
    configured layout, so allocate_kv_cache reproduces vLLM's real per-layer views.
    """
    mc = vllm_config.model_config
    spec = FullAttentionSpec(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )
    groups = [KVCacheGroupSpec(layer_names(vllm_config), spec)]
    vllm_config.cache_config.num_gpu_blocks_override = num_blocks
    kv_cache_config = get_kv_cache_config_from_groups(
        vllm_config, groups, available_memory=0
    )
    kv_cache_config.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    kv_cache_config.hash_block_size = vllm_config.cache_config.block_size
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return kv_cache_config


def _layer_name_set(
    vllm_config: VllmConfig, layers: Iterable[int | str] | None, default_odd: bool
) -> set[str]:
    names = layer_names(vllm_config)
    if layers is None:
        return {n for i, n in enumerate(names) if (i % 2 == 1) == default_odd}
    out = {names[x] if isinstance(x, int) else x for x in layers}
    unknown = out - set(names)
    assert not unknown, f"not layers of this model: {sorted(unknown)}"
    return out


def _plan_multi_group(
    vllm_config: VllmConfig,
    specs: dict[str, Any],
    num_blocks: int,
    allow_unified: bool,
) -> KVCacheConfig:
    """Group `specs` and place them with vLLM's own planner, then resolve what the
    engine core resolves (EngineCore._initialize_kv_caches in 0.33)."""
    hma_off = vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    if hma_off and not allow_unified:
        raise ValueError(
            "the hybrid KV-cache manager is OFF in this VllmConfig (connector not "
            "SupportsHMA, or hybrid=False), so vLLM would merge every layer into ONE "
            "full-attention group; pass allow_unified=True to get that config"
        )
    # Same grouping call as the engine (get_global_kv_cache_groups: registry check,
    # SWA extra_retained_tokens tagging, unify_hybrid_kv_cache_specs when HMA is off,
    # _get_kv_cache_groups_uniform_page_size otherwise).
    groups = get_global_kv_cache_groups(vllm_config, [dict(specs)])
    vllm_config.cache_config.num_gpu_blocks_override = num_blocks
    kv_cache_config = get_kv_cache_config_from_groups(
        vllm_config, groups, available_memory=0
    )
    kv_cache_config.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    kv_cache_config.kv_tp_replicas = kv_cache_groups_tp_replicas(
        kv_cache_config.kv_cache_groups,
        vllm_config.parallel_config.tensor_parallel_size,
        vllm_config.parallel_config.decode_context_parallel_size,
    )
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    cacheable = [
        g.kv_cache_spec.block_size
        for g in kv_cache_config.kv_cache_groups
        if g.kv_cache_spec.prefix_cacheable
    ]
    vllm_config.cache_config.block_size = min(
        cacheable
        or [g.kv_cache_spec.block_size for g in kv_cache_config.kv_cache_groups]
    )
    sched_bs, hash_bs = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    kv_cache_config.hash_block_size = hash_bs
    kv_cache_config.cache_hit_alignment_tokens = resolve_cache_hit_alignment_tokens(
        kv_cache_config, vllm_config, sched_bs, hash_bs
    )
    return kv_cache_config


def make_hybrid_kv_cache_config(
    vllm_config: VllmConfig,
    num_blocks: int,
    sliding_window: int,
    swa_layers: Iterable[int | str] | None = None,
    *,
    allow_unified: bool = False,
) -> KVCacheConfig:
    """A two-group KVCacheConfig for a "hybrid" tiny model, from vLLM's planner.

    Layers in `swa_layers` (indices or names; default: the odd layers) get a
    SlidingWindowSpec(sliding_window), the others a FullAttentionSpec; block size,
    heads, head size and dtype are the same for both, so the page sizes match and
    vLLM's _get_kv_cache_groups_uniform_page_size makes one group per type, in the
    order the types first appear in the model: with layer 0 not in swa_layers (the
    default), group 0 = full attention, group 1 = sliding window. With the tiny
    OPT (2 layers): group 0 = [layer 0], group 1 = [layer 1]; make_vllm_config(
    num_layers=4) gives two layers per group (equal counts avoid padding layers).

    Groups ALIAS the same memory, as in vLLM: every group's KVCacheTensor starts at
    byte 0 of the one backing buffer, so layer k of group 0 and layer k of group 1
    share bytes for a block id. Block ids come from ONE BlockPool and a block
    belongs to one group at a time, so nothing collides; a connector that writes
    a block through the wrong group's layer overwrites the other group's data.

    Needs HMA on: a SupportsHMA connector (make_vllm_config's default hybrid=None
    keeps it on for one; hybrid=True with any other connector fails when the
    connector is created). With HMA off vLLM merges every layer into one
    full-attention group (FullAttentionSpec, sliding_window=<window> on it), which
    this returns only with allow_unified=True. Sets what make_kv_cache_config sets,
    plus hash_block_size/cache_hit_alignment_tokens as the engine resolves them.
    The scheduler then runs vLLM's HybridKVCacheCoordinator (make_scheduler).
    """
    mc = vllm_config.model_config
    common = dict(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )
    swa = _layer_name_set(vllm_config, swa_layers, default_odd=True)
    specs = {
        name: SlidingWindowSpec(sliding_window=sliding_window, **common)
        if name in swa
        else FullAttentionSpec(**common)
        for name in layer_names(vllm_config)
    }
    return _plan_multi_group(vllm_config, specs, num_blocks, allow_unified)


def make_mamba_hybrid_kv_cache_config(
    vllm_config: VllmConfig,
    num_blocks: int,
    mamba_layers: Iterable[int | str] | None = None,
    *,
    state_shapes: tuple[tuple[int, ...], ...] = ((3, 64), (4, 16, 16)),
    mamba_block_size: int | None = None,
    num_prefill_checkpoint_blocks: int = 0,
    prefill_checkpoint_alignment: int | None = None,
    allow_unified: bool = False,
) -> KVCacheConfig:
    """Full attention + one MambaSpec group (mamba_cache_mode "align").

    `mamba_layers` (default: the odd layers) get MambaSpec(shapes=state_shapes,
    dtypes=model dtype, block_size=mamba_block_size or the attention block size,
    mamba_cache_mode=cache_config.mamba_cache_mode, which must be "align":
    make_vllm_config(mamba_cache_mode="align")), padded (page_size_padded) to the
    attention page so the planner can use one page size, as vLLM pads real hybrid
    models. WorkerRig runs it (kv_format "fused" only): Mamba layers get a fake
    state update, see WorkerRig.expected_state and the harness notes.

    `num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1` is what vLLM
    0.33's Mamba2 mixer declares (MambaMixer2.get_kv_cache_spec): the prompt's last
    cacheable boundary state is exported from inside the final prefill chunk into a
    reserved block (column cdiv(T, bs) - 2) instead of the scheduler splitting the
    chunk there; WorkerRig then writes that state too.
    """
    cc = vllm_config.cache_config
    assert cc.mamba_cache_mode == "align", (
        "make_vllm_config(mamba_cache_mode='align') first"
    )
    mc = vllm_config.model_config
    attn = FullAttentionSpec(
        block_size=cc.block_size,
        num_kv_heads=mc.get_num_kv_heads(vllm_config.parallel_config),
        head_size=mc.get_head_size(),
        dtype=mc.dtype,
    )
    mamba_names = _layer_name_set(vllm_config, mamba_layers, default_odd=True)
    mamba = MambaSpec(
        block_size=mamba_block_size or cc.block_size,
        shapes=tuple(state_shapes),
        dtypes=tuple(mc.dtype for _ in state_shapes),
        page_size_padded=attn.page_size_bytes,
        mamba_cache_mode=cc.mamba_cache_mode,
        num_prefill_checkpoint_blocks=num_prefill_checkpoint_blocks,
        prefill_checkpoint_alignment=prefill_checkpoint_alignment,
    )
    assert mamba.state_content_size_bytes <= attn.page_size_bytes, (
        "state larger than an attention page; shrink state_shapes"
    )
    specs = {
        name: mamba if name in mamba_names else attn
        for name in layer_names(vllm_config)
    }
    return _plan_multi_group(vllm_config, specs, num_blocks, allow_unified)


def make_scheduler(
    vllm_config: VllmConfig,
    num_blocks: int = 64,
    kv_cache_config: KVCacheConfig | None = None,
) -> Scheduler:
    """vLLM's real v1 Scheduler, which builds the SCHEDULER-role connector itself.

    Block 0 is vLLM's null block, so num_blocks - 1 are usable. The scheduler keeps
    the KVCacheConfig as `scheduler.kv_cache_config`: give the same one to WorkerRig.
    """
    if kv_cache_config is None:
        kv_cache_config = make_kv_cache_config(vllm_config, num_blocks)
    block_size = vllm_config.cache_config.block_size
    hash_block_size = block_size
    if len(kv_cache_config.kv_cache_groups) > 1:
        # As EngineCore: scheduler block size = lcm of the group block sizes,
        # hash block size = their gcd (prefix-cacheable groups).
        block_size, hash_block_size = resolve_kv_cache_block_sizes(
            kv_cache_config, vllm_config
        )
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=hash_block_size,
        log_stats=True,
    )


# --------------------------------------------------------------------------- requests


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    max_tokens: int = 1,
    block_size: int = 16,
    hash_algo: str = "sha256",
    kv_transfer_params: dict[str, Any] | None = None,
    *,
    vllm_config: VllmConfig | None = None,
) -> Request:
    """A real Request whose block_hashes are computed the way EngineCore does.

    EngineCore: fn = get_hash_fn_by_name(cache_config.prefix_caching_hash_algo);
    init_none_hash(fn); Request(..., block_hasher=get_request_block_hasher(
    hash_block_size, fn)). request.block_hashes then holds one hash per FULL block of
    the prompt, chained: h_i = fn((h_{i-1} or NONE_HASH, tuple(block_tokens), None)),
    with NONE_HASH = fn(PYTHONHASHSEED or "vllm-none-hash") for sha256/sha256_cbor;
    more hashes are appended as generated tokens fill blocks. block_size and
    hash_algo must match the config's; pass `vllm_config` to take them from it.
    """
    if vllm_config is not None:
        block_size = vllm_config.cache_config.block_size
        hash_algo = vllm_config.cache_config.prefix_caching_hash_algo
    hash_fn = get_hash_fn_by_name(hash_algo)
    # Global in vLLM; cheap; re-run so the seed follows the algorithm in use.
    init_none_hash(hash_fn)
    params = SamplingParams(max_tokens=max_tokens)
    params.update_from_generation_config({}, EOS_TOKEN_ID)
    req = Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=params,
        pooling_params=None,
        block_hasher=get_request_block_hasher(block_size, hash_fn),
    )
    req.kv_transfer_params = kv_transfer_params
    return req


def model_runner_output(
    scheduler_output: SchedulerOutput,
    kv_connector_output: KVConnectorOutput | None = None,
    *,
    scheduler: Scheduler | None = None,
    finished_sending: set[str] | None = None,
    finished_recving: set[str] | None = None,
    invalid_block_ids: set[int] | None = None,
    failed_recving: set[str] | None = None,
    use_eos: bool = False,
) -> ModelRunnerOutput:
    """What a model runner returns for `scheduler_output`.

    A request samples SAMPLED_TOKEN_ID (EOS_TOKEN_ID if use_eos) when this step
    reached the end of its known tokens; one still mid-prefill (chunked) samples
    nothing, as in the real runner. That needs the request's length: pass the
    `scheduler` (call after schedule(), which already advanced num_computed_tokens);
    without it, new requests are judged by prompt length and running ones sample.
    The KV part is `kv_connector_output` (from WorkerRig.step) or, for
    scheduler-only tests, one built from the keyword sets. With several KV-cache
    groups vLLM 0.33 raises RuntimeError on any non-empty invalid_block_ids ("not
    supported for models with multiple KV cache groups"); only failed_recving of an
    async load is handled there.
    """
    token = EOS_TOKEN_ID if use_eos else SAMPLED_TOKEN_ID
    new = {r.req_id: r for r in scheduler_output.scheduled_new_reqs}
    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for req_id in req_ids:
        if scheduler is not None and req_id in scheduler.requests:
            req = scheduler.requests[req_id]
            mid_prefill = req.num_computed_tokens < req.num_tokens
        elif req_id in new:
            r = new[req_id]
            end = r.num_computed_tokens + scheduler_output.num_scheduled_tokens[req_id]
            mid_prefill = end < len(r.prompt_token_ids or [])
        else:
            mid_prefill = False
        sampled.append([] if mid_prefill else [token])
    if kv_connector_output is None and any(
        x is not None
        for x in (finished_sending, finished_recving, invalid_block_ids, failed_recving)
    ):
        kv_connector_output = KVConnectorOutput(
            finished_sending=finished_sending,
            finished_recving=finished_recving,
            invalid_block_ids=set(invalid_block_ids or ()),
            failed_recving=set(failed_recving or ()),
        )
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=None,
        kv_connector_output=kv_connector_output,
    )


# --------------------------------------------------------------------------- worker


def _exact_modulus(dtype: torch.dtype) -> int:
    # Values must be exact integers in the cache dtype, or a round trip could not be
    # compared bit for bit: float16 has 11 significant bits, bfloat16 8.
    mantissa_bits = round(-math.log2(torch.finfo(dtype).eps))
    return 2 ** (mantissa_bits + 1) - 1


def expected_kv(
    token_ids: list[int],
    positions: Iterable[int],
    layer: int,
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K and V the fake attention writes for `positions` of a sequence.

    Each is [len(positions), num_kv_heads, head_size]; every value is a nonzero
    integer exact in `dtype`, depending on token id, position, layer, head, channel
    and K/V, so a block copied to the wrong place, layer or half shows up.
    """
    pos = torch.tensor(list(positions), dtype=torch.int64)
    tok = torch.tensor([token_ids[p] for p in pos.tolist()], dtype=torch.int64)
    base = (tok * 1009 + pos * 131 + layer * 17).view(-1, 1, 1)
    h = torch.arange(num_kv_heads).view(1, -1, 1) * 7
    c = torch.arange(head_size).view(1, 1, -1) * 3
    m = _exact_modulus(dtype)
    k = (base + h + c) % m + 1
    v = (base + h + c + 1021) % m + 1
    return k.to(dtype), v.to(dtype)


@maybe_transfer_kv_layer
def _fake_attention(write_kv, layer_name: str) -> None:
    """Stands in for vLLM's unified attention op. The real decorator around it calls
    connector.wait_for_layer_load(layer) before and
    connector.save_kv_layer(layer, kv_cache, attn_metadata) after, exactly as for
    real attention; in between this writes this step's K/V into the paged cache."""
    write_kv()


class WorkerRig:
    """One worker: the WORKER-role connector, its CPU KV cache, and a step function.

    Creates the connector through KVConnectorFactory (as ensure_kv_transfer_initialized
    does), allocates the KV cache the way vLLM's model runner does, calls
    register_kv_caches, and binds fake attention layers (objects with .kv_cache) into
    vllm_config.compilation_config.static_forward_context, which is where vLLM's
    forward context finds layers (ExampleConnector walks them).

    It tracks each request's block table and token ids from the scheduler outputs it
    is given, like the model runner's input batch. One vllm_config per rig: two rigs
    (two "instances") need two configs.

    Several KV-cache groups (make_hybrid_kv_cache_config): the rig keeps one block
    table per group (NewRequestData.block_ids / CachedRequestData.new_block_ids are
    per-group tuples; a resumed request's lists REPLACE its tables), and the fake
    attention of a layer writes into its own group's blocks through that group's
    slot mapping (attn_metadata[layer].slot_mapping differs per group). A
    sliding-window group's table keeps vLLM's null block (id 0) where vLLM left or
    put it (blocks before the window); newly computed tokens never land there
    (asserted). `layer_names` lists every layer in model order, `layer_groups[g]`
    the layers of group g, `layer_group[name]` the group of a layer.

    Mamba groups (make_mamba_hybrid_kv_cache_config, kv_format "fused" only): a Mamba
    layer's cache is vLLM's raw state view, dim 0 = block id (`state_views`); no slot
    mapping. After each step the rig writes, for each scheduled request, the state
    after T = num_computed + num_scheduled tokens into the block at index
    ceil(T / bs) - 1 of its Mamba table (where align mode keeps it):
    expected_state(layer, tokens, T); read it back with read_state. `mamba_groups`
    lists the Mamba group ids, `attention_groups` the others. A MambaSpec with
    prefill checkpoint blocks also gets, where vLLM's own
    compute_mamba_prefill_checkpoints places one, the state at the checkpoint
    position in its block column. Before each step the rig applies the scheduler's
    copy-on-write block copies (SchedulerOutput.kv_cache_block_copies), as vLLM's
    model runner does before the forward.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        kv_format: str = "fused",
    ) -> None:
        assert kv_format in ("fused", "kv_pair"), kv_format
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.kv_format = kv_format
        groups = kv_cache_config.kv_cache_groups
        self.layer_groups: list[list[str]] = [list(g.layer_names) for g in groups]
        self.layer_group: dict[str, int] = {
            name: gid for gid, names in enumerate(self.layer_groups) for name in names
        }
        self.group_specs: list[Any] = [g.kv_cache_spec for g in groups]
        self.attention_groups: list[int] = []
        self.mamba_groups: list[int] = []
        for gid, spec in enumerate(self.group_specs):
            if isinstance(spec, AttentionSpec):
                self.attention_groups.append(gid)
            elif isinstance(spec, MambaSpec):
                self.mamba_groups.append(gid)
            else:
                raise NotImplementedError(
                    f"group {gid} is {type(spec).__name__}: WorkerRig only runs "
                    "attention groups (full / sliding window) and Mamba groups"
                )
        if not self.attention_groups:
            raise NotImplementedError("WorkerRig needs at least one attention group")
        if self.mamba_groups and kv_format != "fused":
            raise NotImplementedError(
                "Mamba groups only with kv_format 'fused' (vLLM's own allocation)"
            )
        # Every layer, in model order (model layer index = position here; the fake
        # K/V depends on it). One group: exactly that group's layer list.
        model_order = {n: i for i, n in enumerate(layer_names(vllm_config))}
        self.layer_names: list[str] = sorted(
            self.layer_group, key=lambda n: (model_order.get(n, len(model_order)), n)
        ) if len(groups) > 1 else list(self.layer_groups[0])
        spec = self.group_specs[self.attention_groups[0]]
        self.block_size: int = spec.block_size
        self.num_kv_heads: int = spec.num_kv_heads
        self.head_size: int = spec.head_size
        self.dtype: torch.dtype = spec.dtype
        for s in (self.group_specs[g] for g in self.attention_groups[1:]):
            assert (s.num_kv_heads, s.head_size, s.dtype) == (
                self.num_kv_heads,
                self.head_size,
                self.dtype,
            ), "all attention groups must share heads, head size and dtype"
        self.num_blocks: int = kv_cache_config.num_blocks

        self.connector: KVConnectorBase_V1 = KVConnectorFactory.create_connector(
            vllm_config, KVConnectorRole.WORKER, kv_cache_config
        )
        self.kv_caches: dict[str, Any] = self._allocate()
        self.connector.register_kv_caches(self.kv_caches)
        ctx = vllm_config.compilation_config.static_forward_context
        ctx.clear()
        for name in self.layer_names:
            ctx[name] = SimpleNamespace(kv_cache=self.kv_caches[name], layer_name=name)

        # Per request, what the model runner's input batch would hold:
        # one block table per KV-cache group.
        self._block_table: dict[str, list[list[int]]] = {}
        self._tokens: dict[str, list[int]] = {}

    @property
    def num_groups(self) -> int:
        return len(self.layer_groups)

    def group_block_size(self, group: int) -> int:
        return self.group_specs[group].block_size

    # ---- KV cache

    def _allocate(self) -> dict[str, Any]:
        if self.kv_format == "fused":
            layout = self.vllm_config.cache_config.get_resolved_kv_cache_layout()
            return allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), layout)
        shape = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_size)
        if self.num_groups == 1:
            return {
                name: (
                    torch.zeros(shape, dtype=self.dtype),
                    torch.zeros(shape, dtype=self.dtype),
                )
                for name in self.layer_names
            }
        # Groups alias memory as in vLLM: the k-th layer of every group shares one
        # (K, V) pair (block ids are unique across groups).
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        out = {}
        for names in self.layer_groups:
            for k, name in enumerate(names):
                if k == len(pairs):
                    pairs.append(
                        (
                            torch.zeros(shape, dtype=self.dtype),
                            torch.zeros(shape, dtype=self.dtype),
                        )
                    )
                out[name] = pairs[k]
        return out

    def is_mamba_layer(self, layer_name: str) -> bool:
        return self.layer_group[layer_name] in self.mamba_groups

    def _kv_views(self, layer_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_blocks, block_size, num_kv_heads, head_size]
        views (writable, sharing memory with the registered cache)."""
        assert not self.is_mamba_layer(layer_name), f"{layer_name} is a Mamba layer"
        kv = self.kv_caches[layer_name]
        if self.kv_format == "kv_pair":
            return kv[0], kv[1]
        # [B, H, N, 2D] logical view -> [B, N, H, 2D] -> split K | V on the last dim.
        k, v = kv.transpose(1, 2).split(self.head_size, dim=-1)
        return k, v

    def read_block(self, layer_name: str, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of (K, V) held in one block of one layer, each
        [block_size, num_kv_heads, head_size]."""
        k, v = self._kv_views(layer_name)
        return k[block_id].clone(), v[block_id].clone()

    def zero_cache(self) -> None:
        """Wipe every layer, so that anything a later load puts there is observable."""
        for name in self.layer_names:
            if self.is_mamba_layer(name):
                self.state_views(name).zero_()
                continue
            for t in self._kv_views(name):
                t.zero_()

    # ---- Mamba state

    def state_views(self, layer_name: str) -> torch.Tensor:
        """A Mamba layer's state as a writable [num_blocks, state_bytes] uint8 view of
        the registered cache (row b = block b's state; the page padding after it is
        not part of the view)."""
        assert self.is_mamba_layer(layer_name), f"{layer_name} is not a Mamba layer"
        t = self.kv_caches[layer_name]
        assert t.shape[0] == self.num_blocks, (t.shape, self.num_blocks)
        rows = t.view(torch.uint8) if t.element_size() == 1 else t
        try:
            rows = rows.view(t.shape[0], -1)
        except RuntimeError:
            # Not expressible as a view: the state must still be dense in each block,
            # as vLLM's runner assumes when it splits a page into conv / ssm states.
            n = rows[0].numel()
            assert rows[0].is_contiguous(), "a block's state is not one dense run"
            rows = rows.as_strided((t.shape[0], n), (rows.stride(0), 1))
        return rows.view(torch.uint8)

    def state_bytes(self, layer_name: str) -> int:
        return self.state_views(layer_name).shape[1]

    def read_state(self, layer_name: str, block_id: int) -> torch.Tensor:
        """A copy of the state held in one block of a Mamba layer ([state_bytes]
        uint8)."""
        return self.state_views(layer_name)[block_id].clone()

    def expected_state(self, layer_name: str, token_ids: list[int], T: int) -> torch.Tensor:
        """The state the fake Mamba layer holds after the first T tokens of a sequence
        ([state_bytes] uint8): sha256 of (layer index, T, token_ids[:T]) repeated.
        Depends on every one of those tokens, so a state saved or loaded for another
        prefix, layer or length shows up."""
        assert 0 < T <= len(token_ids), (T, len(token_ids))
        return self._state_for(
            self.layer_names.index(layer_name), token_ids[:T], self.state_bytes(layer_name)
        )

    @staticmethod
    def _state_for(layer_idx: int, tokens: list[int], n: int) -> torch.Tensor:
        h = hashlib.sha256(struct.pack("<QQ", layer_idx, len(tokens)))
        h.update(struct.pack(f"<{len(tokens)}Q", *tokens))
        digest = h.digest()
        data = (digest * (n // len(digest) + 1))[:n]
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def expected_block(
        self, layer_name: str, token_ids: list[int], block_index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (K, V) the fake model computes for the `block_index`-th block of a
        sequence with these token ids: [n, num_kv_heads, head_size] each, n = the
        tokens of that block present in token_ids (block_size unless it is the last,
        partial block); compare with read_block(...)[:n]. Block size = that of the
        layer's group."""
        bs = self.group_block_size(self.layer_group[layer_name])
        start = block_index * bs
        end = min(start + bs, len(token_ids))
        assert end > start, f"block {block_index} is past {len(token_ids)} tokens"
        return expected_kv(
            token_ids,
            range(start, end),
            self.layer_names.index(layer_name),
            self.num_kv_heads,
            self.head_size,
            self.dtype,
        )

    def block_ids(self, req_id: str, group: int = 0) -> list[int]:
        """The block table the worker currently holds for a request, for one
        KV-cache group (0 = the only / the first group). A sliding-window group's
        table can hold 0 (vLLM's null block) for blocks before the window."""
        return list(self._block_table[req_id][group])

    # ---- one engine step

    def _update_states(self, so: SchedulerOutput) -> list[tuple[str, int, int]]:
        """Apply the scheduler output to our input batch, as the model runner's
        _update_states does; return (req_id, first position, count) to compute."""
        for req_id in so.finished_req_ids:
            self._block_table.pop(req_id, None)
            self._tokens.pop(req_id, None)
        if so.kv_cache_block_copies:
            # As GPUModelRunner._update_states: CoW copies run before the forward.
            tensors = [
                t
                for v in self.kv_caches.values()
                for t in (v if isinstance(v, tuple) else (v,))
            ]
            copy_kv_cache_blocks_inplace(tensors, self.num_blocks, so.kv_cache_block_copies)
        work = []
        for r in so.scheduled_new_reqs:
            assert len(r.block_ids) == self.num_groups, r.block_ids
            self._block_table[r.req_id] = [list(ids) for ids in r.block_ids]
            self._tokens[r.req_id] = list(r.prompt_token_ids or [])
            work.append((r.req_id, r.num_computed_tokens, so.num_scheduled_tokens[r.req_id]))
        c = so.scheduled_cached_reqs
        for i, req_id in enumerate(c.req_ids):
            new_ids = c.new_block_ids[i]
            if req_id in c.resumed_req_ids:
                # A resumed (preempted) request gets its whole block tables again.
                assert new_ids is not None
                self._block_table[req_id] = [list(ids) for ids in new_ids]
                if req_id in c.all_token_ids:
                    self._tokens[req_id] = list(c.all_token_ids[req_id])
            elif new_ids is not None:
                for table, ids in zip(self._block_table[req_id], new_ids, strict=True):
                    table.extend(ids)
            work.append((req_id, c.num_computed_tokens[i], so.num_scheduled_tokens[req_id]))
        return work

    def _token_at(self, req_id: str, pos: int) -> int:
        toks = self._tokens[req_id]
        # Positions past what we were told are tokens our fake sampler produced.
        return toks[pos] if pos < len(toks) else SAMPLED_TOKEN_ID

    def step(self, scheduler_output: SchedulerOutput) -> KVConnectorOutput:
        """Run one model step for `scheduler_output` through vLLM's worker hooks.

        Same structure as GPUModelRunner.execute_model in 0.33: handle_preemptions,
        then, if nothing is scheduled, kv_connector_no_forward (forward context with
        attn_metadata None); otherwise set_forward_context + _get_kv_connector_output
        around the layers' attention calls. Returns the KVConnectorOutput the runner
        would put in its ModelRunnerOutput.
        """
        so = scheduler_output
        with self._installed():
            self.connector.handle_preemptions(so.kv_connector_metadata)
            work = self._update_states(so)
            if not so.total_num_scheduled_tokens:
                mro = KVConnectorModelRunnerMixin.kv_connector_no_forward(
                    so, self.vllm_config
                )
                return mro.kv_connector_output or KVConnectorOutput()

            slots, writes = self._plan_writes(work)
            layer_slots = {
                name: slots[self.layer_group[name]]
                for name in self.layer_names
                if not self.is_mamba_layer(name)
            }
            attn_metadata: dict[str, Any] = {
                name: SimpleNamespace(slot_mapping=s, num_actual_tokens=len(s))
                for name, s in layer_slots.items()
            }
            for name in self.layer_names:
                if self.is_mamba_layer(name):
                    gw = writes[self.layer_group[name]]
                    attn_metadata[name] = SimpleNamespace(
                        state_block_ids=torch.tensor([b for b, _, _ in gw]),
                        num_actual_tokens=sum(c for _, _, c in work),
                    )
            with (
                set_forward_context(
                    attn_metadata,
                    self.vllm_config,
                    slot_mapping=layer_slots,
                ),
                KVConnectorModelRunnerMixin._get_kv_connector_output(so) as out,
            ):
                for li, name in enumerate(self.layer_names):
                    gw = writes[self.layer_group[name]]
                    if self.is_mamba_layer(name):
                        # vLLM's Mamba mixers call no per-layer connector hook.
                        self._write_state(li, name, gw)
                        continue
                    _fake_attention(
                        lambda li=li, name=name, gw=gw: self._write(li, name, gw), name
                    )
            return out

    def _plan_writes(self, work):
        """Per group: the slot mapping tensor and the writes
        (block_ids, offsets, token_ids_of_seq, positions) of each request; for a
        Mamba group no slots, and per request (state block id, token ids, T)."""
        all_slots = []
        all_writes = []
        for gid in range(self.num_groups):
            bs = self.group_block_size(gid)
            slots: list[int] = []
            writes = []
            if gid in self.mamba_groups:
                for req_id, start, count in work:
                    table = self._block_table[req_id][gid]
                    end = start + count
                    idx = math.ceil(end / bs) - 1
                    assert idx < len(table) and table[idx] != 0, (
                        f"{req_id}: Mamba group {gid} has no state block at index "
                        f"{idx} for the state after {end} tokens (table {table})"
                    )
                    toks = [self._token_at(req_id, p) for p in range(end)]
                    writes.append((table[idx], toks, end))
                    spec = self.group_specs[gid]
                    if spec.num_prefill_checkpoint_blocks > 0:
                        # Where vLLM's Mamba backends export a prefill checkpoint.
                        offsets, cols = compute_mamba_prefill_checkpoints(
                            [end],
                            [count],
                            hash_block_size=self.kv_cache_config.hash_block_size,
                            mamba_block_size=bs,
                            checkpoint_alignment=spec.prefill_checkpoint_alignment,
                            drop_eagle_block=False,
                            cache_hit_alignment_tokens=(
                                self.kv_cache_config.cache_hit_alignment_tokens
                            ),
                        )
                        # A chunk that does not end the prefill has no block reserved
                        # there (vLLM's state index is then the null block): nothing kept.
                        if cols[0] >= 0 and table[cols[0]] != 0:
                            pos = start + offsets[0]
                            writes.append((table[cols[0]], toks[:pos], pos))
                all_slots.append(torch.tensor([], dtype=torch.int64))
                all_writes.append(writes)
                continue
            for req_id, start, count in work:
                table = self._block_table[req_id][gid]
                positions = list(range(start, start + count))
                blocks = [table[p // bs] for p in positions]
                assert 0 not in blocks, (
                    f"{req_id}: group {gid} puts a newly computed token into the null "
                    f"block (positions {start}..{start + count}, table {table})"
                )
                offsets = [p % bs for p in positions]
                slots += [b * bs + o for b, o in zip(blocks, offsets)]
                toks = [self._token_at(req_id, p) for p in range(start + count)]
                writes.append((blocks, offsets, toks, positions))
            all_slots.append(torch.tensor(slots, dtype=torch.int64))
            all_writes.append(writes)
        return all_slots, all_writes

    def _write_state(self, layer_idx: int, layer_name: str, writes) -> None:
        rows = self.state_views(layer_name)
        for block_id, toks, end in writes:
            rows[block_id] = self._state_for(layer_idx, toks, rows.shape[1])

    def _write(self, layer_idx: int, layer_name: str, writes) -> None:
        k_cache, v_cache = self._kv_views(layer_name)
        for blocks, offsets, toks, positions in writes:
            k, v = expected_kv(
                toks, positions, layer_idx, self.num_kv_heads, self.head_size, self.dtype
            )
            b = torch.tensor(blocks)
            o = torch.tensor(offsets)
            k_cache[b, o] = k
            v_cache[b, o] = v

    @contextlib.contextmanager
    def _installed(self) -> Iterator[None]:
        """Make our connector vLLM's global worker connector for one step.

        ensure_kv_transfer_initialized would set it once per process (it needs a TP
        group); swapping it per step lets one test run two workers ("instances").
        """
        prev = kv_transfer_state._KV_CONNECTOR_AGENT
        kv_transfer_state._KV_CONNECTOR_AGENT = self.connector
        try:
            yield
        finally:
            kv_transfer_state._KV_CONNECTOR_AGENT = prev

    def shutdown(self) -> None:
        self.connector.shutdown()


# --------------------------------------------------------------------------- loop


def engine_step(
    scheduler: Scheduler, rig: WorkerRig, *, use_eos: bool = False
) -> tuple[SchedulerOutput, KVConnectorOutput, dict]:
    """One EngineCore.step: schedule -> worker step -> update_from_output.
    Returns (scheduler_output, kv_connector_output, engine_core_outputs)."""
    so = scheduler.schedule()
    kvo = rig.step(so)
    mro = model_runner_output(so, kvo, scheduler=scheduler, use_eos=use_eos)
    eco = scheduler.update_from_output(so, mro)
    return so, kvo, eco


def run_until_finished(
    scheduler: Scheduler, rig: WorkerRig, max_steps: int = 200
) -> list[tuple[SchedulerOutput, KVConnectorOutput]]:
    """Step until the scheduler holds no request and has handed every finished id on
    to the worker (it passes them in the step after the one that finished them).

    Returns every (scheduler_output, kv_connector_output) pair for assertions.
    """
    history = []
    for _ in range(max_steps):
        if not scheduler.requests and not scheduler.finished_req_ids:
            return history
        so, kvo, _ = engine_step(scheduler, rig)
        history.append((so, kvo))
    raise AssertionError(
        f"requests still unfinished after {max_steps} steps: {list(scheduler.requests)}"
    )


def assert_scheduler_empty(scheduler: Scheduler) -> None:
    """No request, block or transfer state left behind in the scheduler (leak check).

    Block hashes may stay on free blocks: vLLM evicts prefix-cache entries lazily.
    """
    assert not scheduler.requests, list(scheduler.requests)
    assert len(scheduler.waiting) == 0
    assert len(scheduler.running) == 0
    assert len(scheduler.kv_holding_waiting) == 0
    assert not scheduler.finished_req_ids
    assert not scheduler.finished_recving_kv_req_ids
    assert not scheduler.failed_recving_kv_req_ids
    mgr = scheduler.kv_cache_manager
    for single in mgr.coordinator.single_type_managers:
        assert not single.req_to_blocks, dict(single.req_to_blocks)
        assert not single.num_cached_block
    pool = mgr.block_pool
    # Every block but the null block is free.
    assert pool.free_block_queue.num_free_blocks == pool.num_gpu_blocks - 1
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)
