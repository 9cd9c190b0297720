"""kvpool.vllm.KvPoolConnector driven by vLLM 0.33's real scheduler and worker hooks.

Every test asserts on values: external token counts, the bytes in the KV cache after a
load, block ids reported as failed, state left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from harness import (
    WorkerRig,
    assert_scheduler_empty,
    engine_step,
    make_request,
    make_scheduler,
    make_vllm_config,
    run_until_finished,
)
from servers import redis_server

import kvpool

CONNECTOR = "KvPoolConnector"
MODULE = "kvpool.vllm"
BLOCK = 16


def config(extra: dict, **kw):
    return make_vllm_config(CONNECTOR, MODULE, extra, block_size=BLOCK, **kw)


class Instance:
    """One vLLM instance: its scheduler (with the SCHEDULER connector) and one worker."""

    def __init__(self, extra: dict, num_blocks: int = 64, kv_format: str = "fused", **kw):
        self.cfg = config(extra, **kw)
        self.sched = make_scheduler(self.cfg, num_blocks=num_blocks)
        self.rig = WorkerRig(self.cfg, self.sched.kv_cache_config, kv_format=kv_format)

    @property
    def sched_connector(self):
        return self.sched.connector

    def run(self, *requests):
        for r in requests:
            self.sched.add_request(r)
        return run_until_finished(self.sched, self.rig)

    def drain_saves(self):
        assert self.rig.connector._worker.wait_for_saves(30.0)

    def request(self, req_id, tokens, max_tokens=1):
        return make_request(req_id, tokens, max_tokens=max_tokens, vllm_config=self.cfg)

    def assert_blocks_hold(self, req_id_blocks, tokens, nblocks):
        for name in self.rig.layer_names:
            for i in range(nblocks):
                k, v = self.rig.read_block(name, req_id_blocks[i])
                ek, ev = self.rig.expected_block(name, tokens, i)
                assert torch.equal(k, ek), f"{name} block {i}: K differs"
                assert torch.equal(v, ev), f"{name} block {i}: V differs"

    def shutdown(self):
        self.rig.shutdown()
        assert self.rig.connector._worker.tracked_requests() == 0
        assert self.sched_connector._scheduler.tracked_requests() == 0


def run_until_idle(inst, timeout=60.0):
    """Like run_until_finished, but in wall-clock time: saves run in the background, and a
    finished request's blocks are freed only once the worker reports them saved (or failed)."""
    history = []
    deadline = time.monotonic() + timeout
    while inst.sched.requests or inst.sched.finished_req_ids:
        assert time.monotonic() < deadline, f"still busy: {list(inst.sched.requests)}"
        history.append(engine_step(inst.sched, inst.rig)[:2])
        time.sleep(0.002)
    return history


def prompt(n, salt=0):
    return [(salt * 7919 + i * 31) % 50000 + 3 for i in range(n)]


def first_load(history):
    """(scheduler_output, kv_output) of the step that carried the first external load."""
    for so, kvo in history:
        for r in so.scheduled_new_reqs:
            if r.num_computed_tokens > 0:
                return so, kvo, r
    raise AssertionError("no request started with external tokens")


def loaded_blocks(instance, req_id, history):
    so, _, r = first_load(history)
    assert r.req_id == req_id
    return list(r.block_ids[0]), r.num_computed_tokens


@pytest.fixture
def shared_redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


# ---------------------------------------------------------------- the main path


@pytest.mark.parametrize("kv_format", ["fused", "kv_pair"])
def test_prefix_saved_by_one_instance_loads_in_another(rpc_base_path, shared_redis, kv_format):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    a = Instance({**backend, "lookup_rpc_port": "1"}, kv_format=kv_format)
    b = Instance({**backend, "lookup_rpc_port": "2"}, kv_format=kv_format)
    tokens = prompt(80)  # 5 full blocks
    a.run(a.request("a-1", tokens))
    a.drain_saves()
    assert_scheduler_empty(a.sched)

    # Instance B has never seen the prompt: every full block but the last token's comes
    # from the pool. 80 tokens = 5 blocks; a full hit is reported one token short.
    req = b.request("b-1", tokens)
    ext, is_async = b.sched_connector.get_num_new_matched_tokens(req, 0)
    assert (ext, is_async) == (79, False)
    history = b.run(req)
    blocks, computed = loaded_blocks(b, "b-1", history)
    assert computed == 79
    # Blocks 0-3 came from the pool, block 4 too (the last token is recomputed into it).
    b.assert_blocks_hold(blocks, tokens, 5)
    for _, kvo in history:
        assert not kvo.invalid_block_ids
    assert_scheduler_empty(b.sched)
    a.shutdown()
    b.shutdown()


def test_partial_prefix_and_engine_prefix_cache(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "3"})
    tokens = prompt(64)
    inst.run(inst.request("r1", tokens))
    inst.drain_saves()
    # A longer prompt sharing 4 blocks: the engine's own prefix cache holds them, so the
    # pool is asked for nothing beyond (num_computed_tokens = 64 already).
    longer = tokens + prompt(40, salt=9)
    req = inst.request("r2", longer)
    assert inst.sched_connector.get_num_new_matched_tokens(req, 64) == (0, False)
    # With the engine cache dropped, the pool supplies the 4 blocks (64 tokens).
    assert inst.sched_connector.get_num_new_matched_tokens(req, 0) == (64, False)
    # Asked with 2 blocks locally cached, only the other 2 are loaded.
    assert inst.sched_connector.get_num_new_matched_tokens(req, 32) == (32, False)
    # The request never entered the engine; finishing it releases what lookups cached.
    assert inst.sched_connector.request_finished(req, []) == (False, None)
    inst.shutdown()


def test_same_instance_reload_after_cache_wipe(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "4"})
    tokens = prompt(48)
    inst.run(inst.request("r1", tokens, max_tokens=3))
    inst.drain_saves()
    inst.rig.zero_cache()
    assert inst.sched.reset_prefix_cache()
    history = inst.run(inst.request("r2", tokens))
    blocks, computed = loaded_blocks(inst, "r2", history)
    assert computed == 47
    inst.assert_blocks_hold(blocks, tokens, 3)
    inst.shutdown()


def test_async_load_completes_through_get_finished(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "5", "load_async": "true"})
    tokens = prompt(64)
    inst.run(inst.request("r1", tokens))
    inst.drain_saves()
    inst.rig.zero_cache()
    assert inst.sched.reset_prefix_cache()

    req = inst.request("r2", tokens)
    inst.sched.add_request(req)
    so, kvo, _ = engine_step(inst.sched, inst.rig)
    # Parked: blocks allocated, nothing scheduled, the load runs in the background.
    assert "r2" not in so.num_scheduled_tokens
    assert req.status.name == "WAITING_FOR_REMOTE_KVS"
    recv = set(kvo.finished_recving or ())
    deadline = time.monotonic() + 10
    while "r2" not in recv and time.monotonic() < deadline:
        time.sleep(0.005)  # an idle engine step takes microseconds; give the load time
        so, kvo, _ = engine_step(inst.sched, inst.rig)
        assert "r2" not in so.num_scheduled_tokens
        recv |= set(kvo.finished_recving or ())
    assert "r2" in recv
    history = run_until_finished(inst.sched, inst.rig)
    first = next(r for so, _ in history for r in so.scheduled_new_reqs if r.req_id == "r2")
    assert first.num_computed_tokens == 63
    inst.assert_blocks_hold(list(first.block_ids[0]), tokens, 4)
    assert_scheduler_empty(inst.sched)
    inst.shutdown()


@pytest.mark.parametrize("fault", ["evicted", "server_killed"])
def test_failed_load_is_reported_and_recomputed(rpc_base_path, shared_redis, fault):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}, "lookup_rpc_port": "6"}
    inst = Instance(backend)
    tokens = prompt(64)
    inst.run(inst.request("r1", tokens))
    inst.drain_saves()
    inst.rig.zero_cache()
    assert inst.sched.reset_prefix_cache()

    inst.sched.add_request(inst.request("r2", tokens))
    so = inst.sched.schedule()
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 63
    # Between the lookup and the load the blocks vanish, or the server dies.
    if fault == "evicted":
        assert shared_redis.command("FLUSHALL").startswith(b"+OK")
    else:
        shared_redis.stop()
    kvo = inst.rig.step(so)
    from harness import model_runner_output

    assert kvo.invalid_block_ids == set(new.block_ids[0][:4])
    inst.sched.update_from_output(so, model_runner_output(so, kvo, scheduler=inst.sched))
    # vLLM rolls the request back and recomputes: its KV ends up right anyway.
    history = run_until_idle(inst)
    assert history, "the request must be rescheduled"
    inst.assert_blocks_hold(list(new.block_ids[0]), tokens, 4)
    assert_scheduler_empty(inst.sched)
    inst.rig.connector._worker.wait_for_saves(30.0)
    inst.shutdown()
