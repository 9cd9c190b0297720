"""The device path on a machine without an accelerator: KV laid out in each of vLLM 0.33's
physical layouts (built by vLLM's own allocator), kernel-block splits, the staging path driven
by the real vLLM scheduler, the block-level API, and the clear error for a CUDA tensor where
there is no driver. The copies themselves on a GPU are checked by scripts/gpu_check.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import assert_scheduler_empty, make_kv_cache_config, make_vllm_config
from servers import redis_server
from test_connector import Instance, loaded_blocks, prompt

import kvpool
from kvpool import _native
from kvpool.device import KvCachePool, current_stream, describe_kv_caches

from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.utils import allocate_kv_cache

LAYOUTS = ["LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC"]


@pytest.fixture
def shared_redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


@pytest.mark.parametrize(
    "saver, loader, staged",
    [
        ("LBNHC", "LBHNC", False),  # vLLM's GPU default -> vLLM's CPU layout
        ("LBHNC", "BLNHC", True),
        ("LHBNC", "BHLNC", False),
        ("BLHNC", "LBNHC", True),
        ("BHLNC", "LHBNC", True),
        ("BLNHC", "BLHNC", False),
    ],
)
def test_instances_with_different_kv_layouts_share_blocks(
    rpc_base_path, shared_redis, saver, loader, staged
):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    a = Instance({**backend, "lookup_rpc_port": "31"}, kv_cache_layout=saver)
    b = Instance(
        {**backend, "lookup_rpc_port": "32", "stage_host_kv": staged},
        kv_cache_layout=loader,
    )
    assert (b.rig.connector._worker.free_staging_slots() is not None) == staged
    tokens = prompt(64)
    a.run(a.request("a-1", tokens))
    a.drain_saves()
    history = b.run(b.request("b-1", tokens))
    blocks, computed = loaded_blocks(b, "b-1", history)
    assert computed == 63
    b.assert_blocks_hold(blocks, tokens, 4)
    for _, kvo in history:
        assert not kvo.invalid_block_ids
    assert_scheduler_empty(b.sched)
    a.shutdown()
    b.shutdown()


def test_the_staged_path_serves_async_loads_through_the_real_scheduler(rpc_base_path):
    inst = Instance(
        {
            "backend": "memory",
            "lookup_rpc_port": "33",
            "stage_host_kv": True,
            "load_async": True,
            # Three blocks of tiny-opt (2 layers x 4 heads x 16 tokens x 32 fp16 = 8 KiB):
            # the six-block load oversubscribes staging.
            "device_staging_bytes": 3 * 8192,
        }
    )
    worker = inst.rig.connector._worker
    slots = worker.free_staging_slots()
    assert slots == 3
    tokens = prompt(96)
    inst.save_then_forget("r1", tokens)
    history = inst.run(inst.request("r2", tokens))
    first = next(r for so, _ in history for r in so.scheduled_new_reqs if r.req_id == "r2")
    assert first.num_computed_tokens == 95
    inst.assert_blocks_hold(list(first.block_ids[0]), tokens, 6)
    assert worker.free_staging_slots() == slots
    # Timeouts from Python never panic: no wait, and a wait without end.
    assert worker.wait_for_saves(float("nan"))
    assert worker.wait_for_saves(float("inf"))
    inst.shutdown()


def _pool(cache: dict, url: str, port: int, num_blocks: int, **extra) -> KvCachePool:
    config = {"backend": "redis", "redis": {"url": url}, "lookup_rpc_port": port, **extra}
    return KvCachePool(cache, config, num_blocks=num_blocks, model="layout-test")


def _vllm_cache(layout: str, num_blocks: int, block_size: int, kernel_block_size=None):
    """A KV cache allocated and viewed by vLLM 0.33's own code, as its model runner does."""
    cfg = make_vllm_config("KvPoolConnector", "kvpool.vllm", {}, block_size=block_size,
                           kv_cache_layout=layout)
    kcc = make_kv_cache_config(cfg, num_blocks)
    kernel = None if kernel_block_size is None else [kernel_block_size]
    caches = allocate_kv_cache(kcc, torch.device("cpu"), KVCacheLayout[layout], kernel)
    return caches, kcc.num_blocks


def _logical(cache: dict, num_blocks: int, block: int) -> list:
    """One block of every layer as [H, tokens, C] in logical order, whatever the split."""
    out = []
    for t in cache.values():
        t = t.unflatten(0, (num_blocks, -1))[block]  # [r, H, Nk, C]
        out.append(t.transpose(0, 1).flatten(1, 2).clone())  # [H, r*Nk, C]
    return out


def test_a_kernel_split_cache_and_an_unsplit_one_exchange_the_same_blocks(
    rpc_base_path, shared_redis
):
    split, n = _vllm_cache("LBHNC", 8, 32, kernel_block_size=16)
    whole, n2 = _vllm_cache("LBNHC", 8, 32)
    assert n == n2
    first = next(iter(split.values()))
    assert first.shape[0] == 2 * n, "vLLM split each block into two kernel blocks"
    gen = torch.Generator().manual_seed(5)
    for t in split.values():
        t.copy_(torch.randint(-1000, 1000, t.shape, generator=gen).to(t.dtype))
    a = _pool(split, shared_redis.url, 34, n)
    b = _pool(whole, shared_redis.url, 35, n)
    assert a.value_len == b.value_len
    keys = [a.key(bytes([i]) * 32) for i in range(3)]
    assert a.save([1, 2, 3], keys).wait(30) == []
    assert b.load([5, 6, 7], keys).wait(30) == []
    for src, dst in [(1, 5), (2, 6), (3, 7)]:
        for x, y in zip(_logical(split, n, src), _logical(whole, n, dst)):
            assert torch.equal(x, y)
    a.close()
    b.close()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_block_api_round_trips_every_layout_and_reports_misses(rpc_base_path, shared_redis,
                                                              layout):
    cache, n = _vllm_cache(layout, 12, 16)
    gen = torch.Generator().manual_seed(len(layout))
    for t in cache.values():
        t.copy_(torch.randint(-1000, 1000, t.shape, generator=gen).to(t.dtype))
    before = {b: _logical(cache, n, b) for b in range(n)}
    pool = _pool(cache, shared_redis.url, 36, n, stage_host_kv=layout.startswith("B"))
    keys = [pool.key(bytes([100 + i]) * 32) for i in range(4)]
    saved = pool.save([0, 1, 2, 3], keys)
    assert saved.wait(30) == [] and saved.is_done()
    missing = pool.key(b"\x07" * 32)
    loaded = pool.load([8, 9, 10, 11], keys[:2] + [missing] + keys[3:])
    assert loaded.wait(30) == [10]
    for src, dst in [(0, 8), (1, 9), (3, 11)]:
        for x, y in zip(before[src], _logical(cache, n, dst)):
            assert torch.equal(x, y)
    with pytest.raises(kvpool.KvPoolError) as err:
        pool.load([1, 2], keys[:1])
    assert "2 block ids but 1 keys" in str(err.value)
    with pytest.raises(kvpool.KvPoolError):
        pool.save([1], ["not-a-key"])
    pool.close()


def test_aliased_layers_are_described_once():
    t = torch.zeros(4, 2, 16, 8, dtype=torch.float16)
    other = torch.zeros(4, 2, 16, 8, dtype=torch.float16)
    tensors = describe_kv_caches({"l0": t, "l1": t, "l2": other})
    assert [x[0] for x in tensors] == ["l0", "l2"]
    assert tensors[0][5] == "cpu"
    assert current_stream(t.device) == 0


def test_a_cuda_tensor_without_a_cuda_driver_is_one_clear_error(rpc_base_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: scripts/gpu_check.py covers CUDA")
    layout = json.dumps({
        "model": "m", "block_size": 16, "tp_size": 1, "tp_rank": 0, "pp_size": 1,
        "pp_rank": 0, "dp_rank": 0, "num_kv_heads": 1, "use_mla": False, "role": "kv_both",
    })
    worker = _native.Worker(json.dumps({"backend": "memory", "lookup_rpc_port": 37}), layout)
    fake_gpu_tensor = ("layers.0", 0x7F0000000000, [4, 2, 16, 8], [256, 128, 8, 1], 2, "cuda:0")
    with pytest.raises(kvpool.KvPoolError) as err:
        worker.register_kv_caches([fake_gpu_tensor], None)
    text = str(err.value)
    assert "cuda:0" in text and "libcuda" in text, text
    assert err.value.kind == "unsupported"
    with pytest.raises(kvpool.KvPoolError) as err:
        worker.register_kv_caches([fake_gpu_tensor[:5] + ("tpu:0",)], None)
    assert "tpu:0" in str(err.value) and "layers.0" in str(err.value)
    worker.shutdown(5.0)


def test_the_gpu_check_script_passes_its_dry_run_on_cpu(tmp_path):
    """The GPU check's own logic (layouts, the racing save, loads, misses, redis, layerwise) on CPU
    tensors through staging, so the script is known good before GPU minutes are spent."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    out = subprocess.run(
        [sys.executable, str(script), "--cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ALL CORRECT" in out.stdout
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    # Per layout: two backends x two streams, and the layerwise check.
    assert len(results["correct"]) == 6 * (2 * 2 + 1), results["correct"]
    assert sum(k.endswith("/layerwise") for k in results["correct"]) == 6
    assert all(results["correct"].values())
