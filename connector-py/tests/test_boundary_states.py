"""Mamba "align" boundary states that vLLM 0.33 hands the connector
(SchedulerOutput.kv_connector_block_state.boundary_state_offloads), under the real scheduler.

vLLM's Mamba2 and GDN layers declare a prefill checkpoint (MambaSpec
num_prefill_checkpoint_blocks=1): the final prefill chunk is no longer split at the prompt's
last cacheable block boundary, the state there is exported from inside the chunk into a
reserved block instead. No step ends at that boundary, so a connector that saves the state
block at each step's end never sees it; vLLM hands it over as (group, block, tokens). kvpool
saves it under the key of the block ending there, and another instance gets the hit vLLM's own
prefix cache gets.
"""

from __future__ import annotations

import functools

import pytest
import torch

from harness import SAMPLED_TOKEN_ID, engine_step, make_mamba_hybrid_kv_cache_config
from servers import redis_server
from test_hybrid import PROMPT, HybridInstance, redis_keys, saved_state_ends, step_ends


@pytest.fixture
def shared_redis(tmp_path):
    with redis_server(tmp_path) as server:
        yield server


def mamba_config(cfg, num_blocks, dense=False, **spec):
    if dense:
        # Keep every Mamba state vLLM caches (the default, 0, keeps only the reusable ones).
        cfg.cache_config.prefix_cache_retention_interval = None
    return make_mamba_hybrid_kv_cache_config(cfg, num_blocks, **spec)


# What vLLM 0.33's Mamba2 mixer declares (MambaMixer2.get_kv_cache_spec).
MAMBA2 = dict(num_prefill_checkpoint_blocks=1, prefill_checkpoint_alignment=1)


def instance(port, backend, budget, **spec):
    kv_cache_config = functools.partial(mamba_config, **spec)
    return HybridInstance(
        {**backend, "lookup_rpc_port": str(port)},
        kv_cache_config=kv_cache_config,
        mamba_cache_mode="align",
        max_num_batched_tokens=budget,
    )


def record_offers(inst):
    """Every boundary-state hand-off vLLM's scheduler gives the connector, as
    (req_id, group, block, tokens), in order. Each step's are read before the connector's
    build_connector_meta runs (vLLM clears them right after)."""
    offers = []
    connector = inst.sched.connector
    build = connector.build_connector_meta

    def recording(scheduler_output):
        state = scheduler_output.kv_connector_block_state
        for req_id, entries in (state.boundary_state_offloads if state else {}).items():
            offers.extend((req_id, *e) for e in entries)
        return build(scheduler_output)

    connector.build_connector_meta = recording
    return offers


def run_capturing_states(inst, offers, req_id):
    """Runs `inst` until idle; returns, per offered block of `req_id`, its Mamba layers' state
    right after the step that offered it (vLLM may reuse the block later)."""
    captured = {}
    history = []
    while inst.sched.requests or inst.sched.finished_req_ids:
        seen = len(offers)
        so, kvo, _ = engine_step(inst.sched, inst.rig)
        history.append((so, kvo))
        for rid, _, block, tokens in offers[seen:]:
            if rid == req_id:
                captured[tokens] = {
                    name: inst.rig.read_state(name, block) for name in inst.rig.layer_groups[1]
                }
    return captured, history


@pytest.mark.parametrize(
    ("prompt_len", "budget", "ends", "saved", "hit_before"),
    [
        # One chunk: before, no Mamba state below 160 tokens was saved, so no hit at all.
        (160, 256, [160, 161], [144, 160], 0),
        # 64-token chunks: the states after 64 and 128 end steps; 144 does not.
        (160, 64, [64, 128, 160, 161], [64, 128, 144, 160], 128),
        # The prefill ends inside a block: no step ends on a block boundary.
        (150, 256, [150, 151], [144], 0),
    ],
)
def test_a_prefill_checkpoint_gives_another_instance_its_hit(
    rpc_base_path, shared_redis, prompt_len, budget, ends, saved, hit_before
):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    prompt = PROMPT[:prompt_len]
    a = instance(51, backend, budget, **MAMBA2)
    offers = record_offers(a)
    a.sched.add_request(a.request("a", max_tokens=2, prompt=prompt))
    states, history = run_capturing_states(a, offers, "a")
    a.drain()
    assert step_ends(history, "a") == ends
    # vLLM hands over the checkpoint: the state after 144 tokens, in the block it reserved.
    assert [(g, t) for rid, g, _, t in offers if rid == "a"] == [(1, 144)]
    for name, state in states[144].items():
        assert torch.equal(state, a.rig.expected_state(name, prompt, 144)), name
    # Every step end on a block boundary, and the handed-over state.
    assert saved_state_ends(shared_redis, prompt) == saved

    b = instance(52, backend, budget, **MAMBA2)
    b.sched.add_request(b.request("b", max_tokens=1, prompt=prompt))
    new, outputs = b.step_until_scheduled("b")
    # vLLM's own prefix cache on A would give 144 too; before, kvpool gave `hit_before`.
    assert new.num_computed_tokens == 144 > hit_before
    assert not any(o.failed_recving for o in outputs)
    full_ids, state_ids = (list(ids) for ids in new.block_ids)
    b.assert_blocks_hold(0, full_ids, range(9), prompt=prompt)
    for name in b.rig.layer_groups[1]:
        loaded = b.rig.read_state(name, state_ids[8])
        # Byte for byte what A's checkpoint block held.
        assert torch.equal(loaded, states[144][name]), name
    b.run()
    b.drain()
    for inst in (b, a):
        inst.shutdown()


def test_states_past_the_prompt_or_in_the_null_block_are_not_saved(rpc_base_path, shared_redis):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    # Dense retention: vLLM also hands over the decode states after 48 and 64 tokens, past the
    # 40-token prompt (no other group's blocks are saved there, so no hit could use them).
    a = instance(53, backend, 256, dense=True)
    offers = record_offers(a)
    prompt = PROMPT[:40]
    a.sched.add_request(a.request("a", max_tokens=30, prompt=prompt))
    # A hand-off of vLLM's null block, in the step that first schedules the request, at a
    # boundary no step ends on (16 tokens).
    manager = a.sched.kv_cache_manager
    mamba_manager = manager.coordinator.single_type_managers[1]
    mamba_manager._pending_boundary_state_offloads.append(
        ("a", 1, manager.block_pool.null_block, 16)
    )
    history = a.run()
    a.drain()
    assert step_ends(history, "a")[:2] == [32, 40]
    handed = [(b, t) for rid, g, b, t in offers if rid == "a"]
    assert (0, 16) in handed
    assert {t for _, t in handed} == {16, 32, 48, 64}
    tokens = prompt + [SAMPLED_TOKEN_ID] * 30
    assert saved_state_ends(shared_redis, tokens) == [32]
    a.shutdown()


def test_states_inside_a_block_are_not_saved(rpc_base_path, shared_redis):
    # 64-token Mamba blocks with 16-token hashes: vLLM's fine-grained hits hand over the
    # prompt's last 16-token boundary, inside a Mamba block. kvpool's hits end on every
    # group's block boundary (64 tokens here), so it has no key for that state.
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    a = instance(54, backend, 256, mamba_block_size=64)
    offers = record_offers(a)
    a.sched.add_request(a.request("a", max_tokens=2))
    a.run()
    a.drain()
    assert [(g, t) for rid, g, _, t in offers if rid == "a"] == [(1, 144)]
    assert redis_keys(shared_redis, "*@group:1@*") == []
    a.shutdown()
