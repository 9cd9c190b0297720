"""KV caches in CPU, CUDA GPU or Ascend NPU memory, and block saves and loads below vLLM's hooks.

``KvCachePool`` registers a set of KV-cache tensors and saves or loads blocks under keys the
caller chooses, returning completion handles; it needs torch but not vLLM. The vLLM connector
(``kvpool.vllm``) describes its tensors with the same ``describe_kv_caches`` and moves bytes
through the same Rust code.

Device KV never reaches a backend directly: blocks move device -> pinned staging -> backend on
save and back on load, on a copy stream of kvpool's own, ordered after the work already queued
on the caller's current stream (``current_stream``). Torch is imported only when these
functions run.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from kvpool import _native

__all__ = ["KvCachePool", "current_stream", "describe_kv_caches"]


def current_stream(device: Any) -> int:
    """The raw handle of torch's current stream on ``device`` (0 for the CPU): what kvpool
    orders its device copies after. Read it at each call: vLLM changes the current stream."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cpu":
        return 0
    import torch

    if kind == "cuda":
        return int(torch.cuda.current_stream(device).cuda_stream)
    if kind == "npu":
        return int(torch.npu.current_stream(device).npu_stream)  # torch_npu
    raise _native.KvPoolError(f"kvpool moves KV on cpu, cuda and npu devices, not {device}")


def _group_kernel_blocks(t: Any, num_blocks: Optional[int], paired: bool) -> Any:
    """vLLM views a cache with its attention kernel's block size, which may split each of the
    scheduler's blocks (dimension 0 is then not the block id). Regroup as vLLM's own
    ``group_kernel_blocks`` does, and keep tokens contiguous in logical order so the stored
    value is the one an unsplit cache stores."""
    if num_blocks is None or t.dim() < 2 or t.shape[0] == num_blocks:
        return t
    if t.shape[0] % num_blocks != 0:
        raise _native.KvPoolError(
            f"a KV-cache tensor has {t.shape[0]} rows, not a multiple of the {num_blocks} "
            "blocks vLLM allocated"
        )
    grouped = t.unflatten(0, (num_blocks, t.shape[0] // num_blocks))
    # [B, r, H, N, C] -> [B, H, r, N, C]: heads first, then the block's tokens in order.
    # A K/V pair is token-major already ([B, r, N, H, D]).
    return grouped if paired else grouped.transpose(1, 2)


def describe_kv_caches(
    kv_caches: Mapping[str, Any],
    num_blocks: Optional[int] = None,
    layer_groups: Optional[Mapping[str, int]] = None,
) -> list:
    """``(layer, data_ptr, shape, strides, element_size, device)`` for each distinct cache
    tensor, in registration order. Accepts vLLM's one tensor per layer, the older stacked
    ``[2, blocks, ...]`` form, and Ascend's ``(k, v)`` pairs. Layers that share another
    layer's KV (vLLM aliases them to the same tensor) are described once per KV-cache group
    (``layer_groups``: layer name -> group; the layers of a hybrid model's groups share
    memory, each group using its own blocks of it)."""
    tensors = []
    seen = set()
    for name, value in kv_caches.items():
        parts = list(value) if isinstance(value, (tuple, list)) else [value]
        paired = len(parts) > 1
        if (
            len(parts) == 1
            and num_blocks is not None
            and parts[0].dim() >= 2
            and parts[0].shape[0] == 2
            and parts[0].shape[1] == num_blocks
        ):
            # The older [2, blocks, ...] layout: K and V stacked in front of the blocks.
            parts, paired = [parts[0][0], parts[0][1]], True
        for t in parts:
            t = _group_kernel_blocks(t, num_blocks, paired)
            group = (layer_groups or {}).get(name, 0)
            alias = (group, t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.device))
            if alias in seen:
                continue
            seen.add(alias)
            tensors.append(
                (
                    name,
                    t.data_ptr(),
                    list(t.shape),
                    list(t.stride()),
                    t.element_size(),
                    str(t.device),
                )
            )
    return tensors


class KvCachePool:
    """KV-cache tensors registered with a kvpool backend, saved and loaded by block id.

    ``kv_caches`` maps layer names to tensors as vLLM's ``register_kv_caches`` receives them
    (dimension 0 indexes blocks). ``config`` is a kvpool configuration
    (``{"backend": "memory"}``, or the seed's ``kv_connector_extra_config``). Keys are
    vllm-ascend key strings, e.g. from ``key(block_hash)``.
    """

    def __init__(
        self,
        kv_caches: Mapping[str, Any],
        config: Mapping[str, Any],
        *,
        num_blocks: Optional[int] = None,
        model: str = "kvpool",
        block_size: int = 16,
    ) -> None:
        tensors = describe_kv_caches(kv_caches, num_blocks)
        if not tensors:
            raise _native.KvPoolError("no KV-cache tensors to register")
        self._device = tensors[0][5]
        self._model = model
        layout = {
            "model": model,
            "block_size": block_size,
            "tp_size": 1,
            "tp_rank": 0,
            "pp_size": 1,
            "pp_rank": 0,
            "dp_rank": 0,
            "num_kv_heads": 1,
            "use_mla": False,
            "role": "kv_both",
        }
        self._worker = _native.Worker(json.dumps(dict(config)), json.dumps(layout))
        self._caches = kv_caches  # keeps the tensors alive as long as the registration
        self.value_len = self._worker.register_kv_caches(tensors, kv_caches)

    def key(self, block_hash: bytes) -> str:
        """The key of a block with this 32-byte hash, under this pool's model."""
        return _native.block_key(self._model, block_hash, 0, 0)

    def save(self, block_ids: Sequence[int], keys: Iterable[str]) -> "_native.Transfer":
        """Saves ``block_ids`` under ``keys`` after the work queued so far on the current
        stream; ``.wait()`` returns the block ids not saved."""
        return self._worker.save_blocks(
            list(block_ids), list(keys), current_stream(self._device)
        )

    def load(self, block_ids: Sequence[int], keys: Iterable[str]) -> "_native.Transfer":
        """Loads the values under ``keys`` into ``block_ids`` after the work queued so far on
        the current stream; ``.wait()`` returns the block ids not loaded (misses, errors)."""
        return self._worker.load_blocks(
            list(block_ids), list(keys), current_stream(self._device)
        )

    def free_staging_slots(self) -> Optional[int]:
        """Free slots of the pinned staging memory (device KV), else None."""
        return self._worker.free_staging_slots()

    def close(self) -> None:
        self._worker.shutdown(30.0)

    def __enter__(self) -> "KvCachePool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
