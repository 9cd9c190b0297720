"""Layerwise save and load (`use_layerwise: true`) under vLLM 0.33's scheduler and worker hooks:
vLLM's own `maybe_transfer_kv_layer` calls `wait_for_layer_load` before each layer's attention
and `save_kv_layer` after it. Over the direct host path and the staged (device) path."""

from __future__ import annotations

import pytest

from harness import assert_scheduler_empty, model_runner_output
from test_connector import Instance, loaded_blocks, prompt, run_engine, shared_redis  # noqa: F401
from test_hybrid import redis_keys


def layer_keys(redis):
    reply = redis.command("KEYS", "*").decode("latin-1")
    return [line for line in reply.split("\r\n") if "@group:" in line]


def hits_and_loads_every_layer(b, tokens, n_blocks):
    """Instance `b` finds all but the last token of `tokens` in the pool, loads them with no
    failed block, and then holds the right KV in every layer of its first `n_blocks` blocks."""
    req = b.request("b-1", tokens)
    hit = len(tokens) - 1
    assert b.sched_connector.get_num_new_matched_tokens(req, 0) == (hit, False)
    history = b.run(req)
    blocks, computed = loaded_blocks(b, "b-1", history)
    assert computed == hit
    b.assert_blocks_hold(blocks, tokens, n_blocks)
    assert not any(kvo.invalid_block_ids for _, kvo in history)
    assert_scheduler_empty(b.sched)


@pytest.mark.parametrize("staged", [False, True])
def test_layers_saved_one_by_one_load_byte_identical_in_another_instance(
    rpc_base_path, shared_redis, staged
):
    backend = {
        "backend": "redis",
        "redis": {"url": shared_redis.url},
        "use_layerwise": True,
        "stage_host_kv": staged,
    }
    a = Instance({**backend, "lookup_rpc_port": "91"})
    layers = a.rig.layer_names
    assert len(layers) == 2
    tokens = prompt(80)  # 5 full blocks
    a.run(a.request("a-1", tokens))
    a.drain_saves()
    stored = layer_keys(shared_redis)
    # One object per block and layer, each keyed with its layer; no whole-block objects.
    assert len(stored) == 5 * 2, stored
    assert sorted(k.split("@layer_id:")[1][0] for k in stored) == ["0"] * 5 + ["1"] * 5
    assert all("@pp_rank:0@" in k for k in stored)

    b = Instance({**backend, "lookup_rpc_port": "92"})
    hits_and_loads_every_layer(b, tokens, 5)
    a.shutdown()
    b.shutdown()


@pytest.mark.parametrize("staged", [False, True])
def test_layerwise_over_a_real_mooncake_master(rpc_base_path, staged):
    """The default backend: instance A contributes a segment and saves layer by layer, pure
    client B loads every layer of A's blocks over the tcp transfer engine."""
    from servers import mooncake_master

    with mooncake_master() as master:
        def mooncake(segment):
            return {
                "backend": "mooncake",
                "use_layerwise": True,
                "stage_host_kv": staged,
                "mooncake": {
                    "metadata_server": "P2PHANDSHAKE",
                    "protocol": "tcp",
                    "device_name": "",
                    "master_server_address": master.address,
                    "global_segment_size": segment,
                },
            }

        a = Instance({**mooncake("256MB"), "lookup_rpc_port": "95"})
        b = Instance({**mooncake("0"), "lookup_rpc_port": "96"})
        tokens = prompt(96)  # 6 full blocks
        a.run(a.request("a-1", tokens))
        a.drain_saves()
        hits_and_loads_every_layer(b, tokens, 6)
        b.shutdown()
        a.shutdown()


def test_a_lost_layer_fails_its_blocks_which_are_recomputed(rpc_base_path, shared_redis):
    backend = {
        "backend": "redis",
        "redis": {"url": shared_redis.url},
        "use_layerwise": True,
        "hash_mode": "vllm",  # so the test can name block 2's keys by vLLM's hash
    }
    a = Instance({**backend, "lookup_rpc_port": "93"})
    tokens = prompt(80)
    a.run(a.request("a-1", tokens))
    a.drain_saves()

    b = Instance({**backend, "lookup_rpc_port": "94"})
    b.sched.add_request(b.request("b-1", tokens))
    so = b.sched.schedule()  # the lookup: 79 tokens, loaded in this step
    new = so.scheduled_new_reqs[0]
    assert new.num_computed_tokens == 79
    block2 = bytes(b.sched.requests["b-1"].block_hashes[2]).hex()
    victim = [k for k in layer_keys(shared_redis) if "@layer_id:1@" in k and k.endswith(block2)]
    assert len(victim) == 1 and shared_redis.command("DEL", *victim) == b":1\r\n"
    kvo = b.rig.step(so)
    ids = list(new.block_ids[0])
    # Layer 1 of block 2 never arrived: the block fails (its layer 0 did arrive).
    assert kvo.invalid_block_ids == {ids[2]}
    b.sched.update_from_output(so, model_runner_output(so, kvo, scheduler=b.sched))
    run_engine(b.sched, b.rig)
    # vLLM recomputed from block 2 on: every block holds the right KV in every layer.
    b.assert_blocks_hold(ids, tokens, 5)
    b.drain_saves()
    run_engine(b.sched, b.rig)
    assert any(k.endswith(block2) and "@layer_id:1@" in k for k in layer_keys(shared_redis)), (
        "b saved the recomputed layer again"
    )
    assert_scheduler_empty(b.sched)
    a.shutdown()
    b.shutdown()


def test_layerwise_asks_vllm_for_piecewise_cuda_graphs():
    from kvpool.vllm import KvPoolConnector

    assert KvPoolConnector.requires_piecewise_for_cudagraph({"use_layerwise": "true"})
    assert not KvPoolConnector.requires_piecewise_for_cudagraph({})
