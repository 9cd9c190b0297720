"""Hybrid models (vLLM's hybrid KV-cache manager, HMA) under vLLM 0.33's real scheduler: a
full-attention group and a sliding-window group that share one KV-cache buffer, as vLLM lays
them out. Each group is saved under its own keys and loaded by its own rule.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from harness import (
    WorkerRig,
    assert_scheduler_empty,
    engine_step,
    make_hybrid_kv_cache_config,
    make_request,
    make_scheduler,
    make_vllm_config,
)
from servers import redis_server

BLOCK = 16
WINDOW = 32  # tokens: the window reaches back cdiv(31, 16) = 2 blocks
PROMPT = [(i * 37) % 40000 + 5 for i in range(160)]  # 10 full blocks


@pytest.fixture
def shared_redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


class HybridInstance:
    def __init__(self, extra: dict, num_blocks: int = 64) -> None:
        self.cfg = make_vllm_config(
            "KvPoolConnector", "kvpool.vllm", extra, block_size=BLOCK, num_layers=4
        )
        kv_cache_config = make_hybrid_kv_cache_config(self.cfg, num_blocks, WINDOW)
        self.sched = make_scheduler(self.cfg, num_blocks, kv_cache_config)
        self.rig = WorkerRig(self.cfg, self.sched.kv_cache_config)

    def request(self, req_id, max_tokens=1):
        return make_request(req_id, PROMPT, max_tokens=max_tokens, vllm_config=self.cfg)

    def run(self, timeout=60.0):
        history = []
        deadline = time.monotonic() + timeout
        while self.sched.requests or self.sched.finished_req_ids:
            assert time.monotonic() < deadline, f"still busy: {list(self.sched.requests)}"
            so, kvo, _ = engine_step(self.sched, self.rig)
            history.append((so, kvo))
            if not so.num_scheduled_tokens:
                time.sleep(0.001)
        return history

    def step_until_scheduled(self, req_id, timeout=30.0):
        """Steps until `req_id` is first scheduled; returns its NewRequestData and every
        KV-connector output on the way. Its blocks are checked right after this step: later
        steps let vLLM free out-of-window blocks and hand them to the other group."""
        outputs = []
        deadline = time.monotonic() + timeout
        while True:
            assert time.monotonic() < deadline, f"{req_id} never scheduled"
            so, kvo, _ = engine_step(self.sched, self.rig)
            outputs.append(kvo)
            for r in so.scheduled_new_reqs:
                if r.req_id == req_id:
                    return r, outputs
            time.sleep(0.001)

    def assert_blocks_hold(self, group, block_ids, indices):
        for name in self.rig.layer_groups[group]:
            for i in indices:
                k, v = self.rig.read_block(name, block_ids[i])
                ek, ev = self.rig.expected_block(name, PROMPT, i)
                assert torch.equal(k, ek), f"group {group} {name} block {i}: K differs"
                assert torch.equal(v, ev), f"group {group} {name} block {i}: V differs"

    def drain(self):
        assert self.rig.connector._worker.wait_for_saves(30.0)

    def shutdown(self):
        self.rig.shutdown()
        assert self.rig.connector._worker.tracked_requests() == 0
        assert self.sched.connector._scheduler.tracked_requests() == 0


def redis_keys(redis, pattern):
    reply = redis.command("KEYS", pattern).decode("latin-1")
    return [line for line in reply.split("\r\n") if "@group:" in line]


def test_every_group_round_trips_and_the_hybrid_manager_stays_on(
    rpc_base_path, shared_redis, caplog
):
    caplog.set_level(logging.WARNING)
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    a = HybridInstance({**backend, "lookup_rpc_port": "41"})
    assert a.cfg.scheduler_config.disable_hybrid_kv_cache_manager is False
    assert "Turning off hybrid kv cache manager" not in caplog.text
    assert a.sched.kv_cache_manager.coordinator.__class__.__name__ == "HybridKVCacheCoordinator"
    assert a.rig.num_groups == 2

    a.sched.add_request(a.request("a"))
    a.run()
    a.drain()
    assert_scheduler_empty(a.sched)
    # Both groups' blocks are in the pool, each under its own group's keys.
    full = redis_keys(shared_redis, "*@group:0@*")
    window = redis_keys(shared_redis, "*@group:1@*")
    assert len(full) == 10 and len(window) == 10, (len(full), len(window))
    assert {k.rsplit("@", 1)[1] for k in full} == {k.rsplit("@", 1)[1] for k in window}

    b = HybridInstance({**backend, "lookup_rpc_port": "42"})
    b.sched.add_request(b.request("b", max_tokens=2))
    new, outputs = b.step_until_scheduled("b")
    # 159 tokens at most (vLLM computes the last one), on a block boundary: 9 blocks.
    assert new.num_computed_tokens == 144
    assert not any(o.failed_recving for o in outputs)
    full_ids, window_ids = (list(ids) for ids in new.block_ids)
    # vLLM keeps only the window's blocks of the sliding-window group; kvpool loaded those.
    assert window_ids[:7] == [0] * 7 and all(window_ids[7:9])
    b.assert_blocks_hold(0, full_ids, range(9))
    b.assert_blocks_hold(1, window_ids, [7, 8])
    b.run()
    assert_scheduler_empty(b.sched)
    b.shutdown()
    a.shutdown()


def test_a_failed_load_in_one_group_is_recomputed_never_used(rpc_base_path, shared_redis):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    a = HybridInstance({**backend, "lookup_rpc_port": "43"})
    a.sched.add_request(a.request("a"))
    a.run()
    a.drain()

    b = HybridInstance({**backend, "lookup_rpc_port": "44"})
    b.sched.add_request(b.request("b"))
    so = b.sched.schedule()  # the lookup: a hit of 144 tokens, loaded asynchronously
    assert b.sched.requests["b"].status.name == "WAITING_FOR_REMOTE_KVS"
    # The sliding-window group's blocks vanish before the load reads them.
    window = redis_keys(shared_redis, "*@group:1@*")
    assert window and shared_redis.command("DEL", *window).startswith(b":")
    full_before = len(redis_keys(shared_redis, "*@group:0@*"))

    from harness import model_runner_output

    kvo = b.rig.step(so)
    b.sched.update_from_output(so, model_runner_output(so, kvo, scheduler=b.sched))
    outputs = [kvo]
    new, more = b.step_until_scheduled("b")
    outputs += more
    assert {r for o in outputs for r in (o.failed_recving or ())} == {"b"}
    assert not any(o.invalid_block_ids for o in outputs)
    # Recomputed from scratch, and the KV it computed is right in every group.
    assert new.num_computed_tokens == 0
    full_ids, window_ids = (list(ids) for ids in new.block_ids)
    b.assert_blocks_hold(0, full_ids, range(10))
    b.assert_blocks_hold(1, window_ids, range(10))
    b.run()
    b.drain()
    # b saved the window group's blocks again; the full-attention ones were there already.
    assert len(redis_keys(shared_redis, "*@group:1@*")) == 10
    assert len(redis_keys(shared_redis, "*@group:0@*")) == full_before
    assert_scheduler_empty(b.sched)
    b.shutdown()
    a.shutdown()
