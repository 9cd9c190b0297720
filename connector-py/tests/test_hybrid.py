"""Hybrid models (vLLM's hybrid KV-cache manager, HMA) under vLLM 0.33's real scheduler: a
full-attention group and a sliding-window group (or a Mamba state group, align mode) that
share one KV-cache buffer, as vLLM lays them out. Each group is saved under its own keys and
loaded by its own rule.
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

import kvpool
from harness import (
    WorkerRig,
    assert_scheduler_empty,
    engine_step,
    make_hybrid_kv_cache_config,
    make_mamba_hybrid_kv_cache_config,
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


def sliding_window_config(cfg, num_blocks):
    return make_hybrid_kv_cache_config(cfg, num_blocks, WINDOW)


class HybridInstance:
    """One vLLM instance: scheduler + worker of a 4-layer hybrid model. `kv_cache_config`
    builds its KVCacheConfig from (VllmConfig, num_blocks) (default: full attention + sliding
    window); `config` goes to make_vllm_config."""

    def __init__(
        self,
        extra: dict,
        num_blocks: int = 64,
        kv_cache_config=sliding_window_config,
        **config,
    ) -> None:
        self.cfg = make_vllm_config(
            "KvPoolConnector", "kvpool.vllm", extra, block_size=BLOCK, num_layers=4, **config
        )
        self.sched = make_scheduler(self.cfg, num_blocks, kv_cache_config(self.cfg, num_blocks))
        self.rig = WorkerRig(self.cfg, self.sched.kv_cache_config)

    def request(self, req_id, max_tokens=1, prompt=PROMPT):
        return make_request(req_id, prompt, max_tokens=max_tokens, vllm_config=self.cfg)

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

    def assert_blocks_hold(self, group, block_ids, indices, prompt=PROMPT):
        for name in self.rig.layer_groups[group]:
            for i in indices:
                k, v = self.rig.read_block(name, block_ids[i])
                ek, ev = self.rig.expected_block(name, prompt, i)
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


# Full attention + Mamba (align mode). 48-token chunks: A's prefill steps end at 48, 96, 144
# (vLLM stops a chunk at the last cacheable boundary, floor(159 / 16) * 16) and 160.
MAMBA_CHUNK = 48


def mamba_config(cfg, num_blocks):
    return make_mamba_hybrid_kv_cache_config(cfg, num_blocks)


def saved_state_ends(redis, prompt):
    """Token counts T whose Mamba state (block T / 16 - 1 of `prompt`) is in the pool."""
    hashes = [h.hex() for h in kvpool.token_hashes(prompt, BLOCK)]
    keys = redis_keys(redis, "*@group:1@*")
    return sorted((hashes.index(k.rsplit("@", 1)[1]) + 1) * BLOCK for k in keys)


def step_ends(history, req_id):
    """num_computed + num_scheduled tokens of `req_id` after each step that ran it."""
    ends = []
    for so, _ in history:
        if req_id not in so.num_scheduled_tokens:
            continue
        new = [r.num_computed_tokens for r in so.scheduled_new_reqs if r.req_id == req_id]
        cached = so.scheduled_cached_reqs
        start = new[0] if new else cached.num_computed_tokens[cached.req_ids.index(req_id)]
        ends.append(start + so.num_scheduled_tokens[req_id])
    return ends


def test_mamba_state_group_round_trips(rpc_base_path, shared_redis, caplog):
    caplog.set_level(logging.WARNING)
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    mamba = dict(
        kv_cache_config=mamba_config,
        mamba_cache_mode="align",
        max_num_batched_tokens=MAMBA_CHUNK,
    )
    a = HybridInstance({**backend, "lookup_rpc_port": "45"}, **mamba)
    assert a.cfg.scheduler_config.disable_hybrid_kv_cache_manager is False
    assert "Turning off hybrid kv cache manager" not in caplog.text
    assert a.sched.kv_cache_manager.coordinator.__class__.__name__ == "HybridKVCacheCoordinator"
    assert (a.rig.attention_groups, a.rig.mamba_groups) == ([0], [1])
    assert a.rig.group_block_size(1) == BLOCK
    # What the connector registered for a Mamba layer: vLLM's raw state view, blocks first.
    state = a.rig.kv_caches["model.decoder.layers.1.self_attn.attn"]
    assert state.shape[0] == 64 and state.dtype == torch.int8

    # A: two decode tokens, so its last step (161 tokens) ends off a block boundary.
    a.sched.add_request(a.request("a", max_tokens=2))
    history = a.run()
    ends = step_ends(history, "a")
    assert ends == [48, 96, 144, 160, 161]
    a.drain()
    assert_scheduler_empty(a.sched)
    # Every full-attention block is in the pool; a Mamba state only for the steps that
    # ended on a block boundary (the state after 161 tokens is not a block's).
    assert len(redis_keys(shared_redis, "*@group:0@*")) == 10
    assert saved_state_ends(shared_redis, PROMPT) == [48, 96, 144, 160]

    # B, same prompt: vLLM computes the last token itself, so the longest hit is the largest
    # saved state below 160 tokens.
    b = HybridInstance({**backend, "lookup_rpc_port": "46"}, **mamba)
    assert b.cfg.scheduler_config.disable_hybrid_kv_cache_manager is False
    b.sched.add_request(b.request("b", max_tokens=2))
    new, outputs = b.step_until_scheduled("b")
    hit = max(t for t in saved_state_ends(shared_redis, PROMPT) if t < len(PROMPT))
    assert hit == 144
    assert new.num_computed_tokens == hit
    assert not any(o.failed_recving for o in outputs)
    assert {r for o in outputs for r in (o.finished_recving or ())} == {"b"}
    full_ids, state_ids = (list(ids) for ids in new.block_ids)
    # vLLM keeps one Mamba block for the hit, the state after 144 tokens (index 8), and a
    # fresh one for the state the step computes (after 160 tokens, index 9).
    assert state_ids[:8] == [0] * 8 and all(state_ids[8:10])
    b.assert_blocks_hold(0, full_ids, range(hit // BLOCK))
    for name in b.rig.layer_groups[1]:
        loaded = b.rig.read_state(name, state_ids[hit // BLOCK - 1])
        assert torch.equal(loaded, b.rig.expected_state(name, PROMPT, hit)), name
        assert not torch.equal(loaded, b.rig.expected_state(name, PROMPT, 160)), name
    b.run()
    b.drain()
    assert_scheduler_empty(b.sched)
    # B's own boundary state (after 160 tokens) goes under a key the pool already holds.
    assert saved_state_ends(shared_redis, PROMPT) == [48, 96, 144, 160]

    # C shares A's first 90 tokens: full attention could serve 80, but the last Mamba state
    # at or below 80 tokens is the one after 48.
    prompt = PROMPT[:90] + [40000 + i for i in range(40)]
    c = HybridInstance({**backend, "lookup_rpc_port": "47"}, **mamba)
    c.sched.add_request(c.request("c", prompt=prompt))
    new, outputs = c.step_until_scheduled("c")
    assert new.num_computed_tokens == 48
    assert not any(o.failed_recving for o in outputs)
    full_ids, state_ids = (list(ids) for ids in new.block_ids)
    assert state_ids[:2] == [0, 0] and state_ids[2]
    c.assert_blocks_hold(0, full_ids, range(3), prompt=prompt)
    for name in c.rig.layer_groups[1]:
        assert torch.equal(
            c.rig.read_state(name, state_ids[2]), c.rig.expected_state(name, prompt, 48)
        ), name
    c.run()
    assert_scheduler_empty(c.sched)
    for inst in (c, b, a):
        inst.shutdown()
