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
        return run_engine(self.sched, self.rig)

    def save_then_forget(self, req_id, tokens, max_tokens=1):
        """Runs a request to completion, waits for its saves, then wipes the KV cache and the
        engine's prefix cache: whatever a later request finds must come from the pool."""
        self.run(self.request(req_id, tokens, max_tokens=max_tokens))
        self.drain_saves()
        self.rig.zero_cache()
        assert self.sched.reset_prefix_cache()

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


def run_engine(sched, rig, timeout=60.0):
    """Like harness.run_until_finished, but bounded in wall-clock time, not steps: saves run
    in the background, and a finished request's blocks are freed only once the worker
    reports them saved, which on a loaded machine can take many idle steps."""
    history = []
    deadline = time.monotonic() + timeout
    while sched.requests or sched.finished_req_ids:
        assert time.monotonic() < deadline, f"still busy: {list(sched.requests)}"
        so, kvo, _ = engine_step(sched, rig)
        history.append((so, kvo))
        if not so.num_scheduled_tokens:
            time.sleep(0.001)
    return history


def run_until_idle(inst, timeout=60.0):
    return run_engine(inst.sched, inst.rig, timeout)


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


def assert_reload_serves_the_pool(inst, tokens):
    """The same 48-token prompt again: 47 tokens come from the pool, byte-exact."""
    history = inst.run(inst.request("r2", tokens))
    blocks, computed = loaded_blocks(inst, "r2", history)
    assert computed == 47
    inst.assert_blocks_hold(blocks, tokens, 3)
    inst.shutdown()


def test_same_instance_reload_after_cache_wipe(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "4"})
    tokens = prompt(48)
    inst.save_then_forget("r1", tokens, max_tokens=3)
    assert_reload_serves_the_pool(inst, tokens)


def test_async_load_completes_through_get_finished(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "5", "load_async": "true"})
    tokens = prompt(64)
    inst.save_then_forget("r1", tokens)

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
    history = run_until_idle(inst)
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
    inst.save_then_forget("r1", tokens)

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


def test_seed_config_over_mooncake(rpc_base_path, tmp_path, monkeypatch):
    """The seed's kv_connector_extra_config, unchanged, with mooncake.json from
    MOONCAKE_CONFIG_PATH: instance A contributes a segment, instance B is a pure client
    that reads A's blocks over the tcp transfer engine."""
    from servers import mooncake_master

    with mooncake_master() as master:
        def mooncake_json(name, segment):
            path = tmp_path / f"{name}.json"
            path.write_text(json.dumps({
                "metadata_server": "P2PHANDSHAKE",
                "protocol": "tcp",
                "device_name": "",
                "master_server_address": master.address,
                "global_segment_size": segment,
                "local_buffer_size": "64MB",
            }))
            return str(path)

        # The config is read when each connector is built.
        monkeypatch.setenv("MOONCAKE_CONFIG_PATH", mooncake_json("owner", "256MB"))
        a = Instance({"lookup_rpc_port": "0", "backend": "mooncake"})
        monkeypatch.setenv("MOONCAKE_CONFIG_PATH", mooncake_json("client", "0"))
        b = Instance({"lookup_rpc_port": "1", "backend": "mooncake"})
        tokens = prompt(96)
        a.run(a.request("a-1", tokens))
        a.drain_saves()
        history = b.run(b.request("b-1", tokens))
        blocks, computed = loaded_blocks(b, "b-1", history)
        assert computed == 95
        b.assert_blocks_hold(blocks, tokens, 6)
        b.shutdown()
        a.shutdown()


def test_async_failed_load_is_recomputed_without_retrying_the_pool(rpc_base_path, shared_redis):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    inst = Instance({**backend, "lookup_rpc_port": "7", "load_async": "true"})
    tokens = prompt(64)
    inst.save_then_forget("r1", tokens)

    req = inst.request("r2", tokens)
    inst.sched.add_request(req)
    so = inst.sched.schedule()
    assert req.status.name == "WAITING_FOR_REMOTE_KVS"
    assert shared_redis.command("FLUSHALL").startswith(b"+OK")
    invalid = set()
    kvo = inst.rig.step(so)
    from harness import model_runner_output

    inst.sched.update_from_output(so, model_runner_output(so, kvo, scheduler=inst.sched))
    invalid |= set(kvo.invalid_block_ids or ())
    history = run_until_idle(inst)
    for _, kvo in history:
        invalid |= set(kvo.invalid_block_ids or ())
    assert len(invalid) == 4, invalid
    # Computed from scratch after the failure: the pool was not offered again.
    starts = [r for so, _ in history for r in so.scheduled_new_reqs if r.req_id == "r2"]
    assert starts and starts[-1].num_computed_tokens == 0
    inst.assert_blocks_hold(list(starts[-1].block_ids[0]), tokens, 4)
    assert_scheduler_empty(inst.sched)
    inst.shutdown()


# ---------------------------------------------------------------- lifecycle


def test_thousand_requests_with_aborts_and_preemptions_leave_no_state(rpc_base_path):
    from vllm.v1.request import RequestStatus

    # 23 usable blocks for up to 16 running sequences forces preemptions.
    inst = Instance({"backend": "memory", "lookup_rpc_port": "8"}, num_blocks=24)
    prefixes = [prompt(32, salt=s) for s in range(5)]
    total, added, aborted = 1000, 0, set()
    preempted, loaded, finished = set(), 0, set()
    deadline = time.monotonic() + 240
    while added < total or inst.sched.requests or inst.sched.finished_req_ids:
        assert time.monotonic() < deadline, "1,000 requests did not finish in 240 s"
        while added < total and len(inst.sched.waiting) < 8:
            i = added
            tokens = prefixes[i % 5] + prompt(8 + i % 24, salt=1000 + i)
            long = i % 5 == 0
            inst.sched.add_request(
                inst.request(f"q{i}", tokens, max_tokens=48 if long else 1 + i % 3)
            )
            added += 1
        so, kvo, eco = engine_step(inst.sched, inst.rig)
        preempted |= set(so.preempted_req_ids or ())
        loaded += sum(1 for r in so.scheduled_new_reqs if r.num_computed_tokens > 0)
        for outs in eco.values():
            finished |= {o.request_id for o in outs.outputs if o.finish_reason is not None}
        # Abort every 50th request a few steps into its life.
        for req_id in list(inst.sched.requests):
            n = int(req_id[1:])
            if n % 50 == 25 and req_id not in aborted and n + 16 < added:
                inst.sched.finish_requests([req_id], RequestStatus.FINISHED_ABORTED)
                aborted.add(req_id)
        if not so.num_scheduled_tokens:
            time.sleep(0.001)  # let background saves finish
    assert preempted, "the scenario must preempt"
    assert loaded > 0, "shared prefixes must be served"
    assert aborted
    assert len(finished | aborted) == total
    assert_scheduler_empty(inst.sched)
    assert inst.rig.connector._worker.wait_for_saves(30.0)
    inst.shutdown()


# ---------------------------------------------------------------- keys and hashes


def test_tokens_mode_keys_do_not_depend_on_pythonhashseed():
    code = (
        "import kvpool, json;"
        "hs = kvpool.token_hashes(list(range(100, 164)), 16);"
        "print(json.dumps([kvpool.block_key('org/model', h) for h in hs]))"
    )
    outs = []
    for seed in ("0", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True).stdout
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 4 and len(set(outs[0])) == 4
    assert outs[0][0].startswith("model@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@")


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_vllm_block_hashes_equal_the_rust_reproduction(algo):
    cfg = config({"backend": "memory"}, hash_algo=algo)
    tokens = prompt(100)
    req = make_request("h", tokens, vllm_config=cfg)
    ours = kvpool.vllm_hashes(tokens, BLOCK, algo, os.environ.get("PYTHONHASHSEED"))
    assert [bytes(h) for h in req.block_hashes] == ours
    assert len(ours) == 6


def test_vllm_hash_mode_round_trip(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "9", "hash_mode": "vllm"})
    tokens = prompt(48)
    inst.save_then_forget("r1", tokens)
    assert_reload_serves_the_pool(inst, tokens)


# ---------------------------------------------------------------- config and roles


def test_multiconnector_with_kvpool_child_as_in_the_seed(rpc_base_path):
    child = {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": MODULE,
        "kv_role": "kv_producer",
        "kv_connector_extra_config": {"lookup_rpc_port": "0", "backend": "memory"},
    }
    cfg = make_vllm_config("MultiConnector", None, {"connectors": [child]},
                           kv_role="kv_producer", block_size=BLOCK)
    sched = make_scheduler(cfg, num_blocks=64)
    rig = WorkerRig(cfg, sched.kv_cache_config)
    tokens = prompt(48)
    sched.add_request(make_request("m1", tokens, vllm_config=cfg))
    run_engine(sched, rig)
    (kvpool_child,) = rig.connector._connectors
    assert kvpool_child._worker.wait_for_saves(30.0)
    rig.zero_cache()
    assert sched.reset_prefix_cache()
    # A producer (prefill node) loads prefixes too, as Ascend Store's does.
    sched.add_request(make_request("m2", tokens, vllm_config=cfg))
    history = run_engine(sched, rig)
    first = next(r for so, _ in history for r in so.scheduled_new_reqs)
    assert first.num_computed_tokens == 47
    for name in rig.layer_names:
        for i in range(3):
            k, v = rig.read_block(name, first.block_ids[0][i])
            ek, ev = rig.expected_block(name, tokens, i)
            assert torch.equal(k, ek) and torch.equal(v, ev)
    assert_scheduler_empty(sched)
    rig.shutdown()


def test_unknown_extra_config_key_is_an_error_naming_it(rpc_base_path):
    cfg = config({"backend": "memory", "lookup_rpc_prot": "0"})
    with pytest.raises(kvpool.KvPoolError) as err:
        make_scheduler(cfg)
    assert "lookup_rpc_prot" in str(err.value) and "lookup_rpc_port" in str(err.value)
    assert err.value.kind == "config_invalid"


def test_consumer_neither_loads_nor_saves_unless_asked(rpc_base_path):
    producer = Instance({"backend": "memory", "lookup_rpc_port": "10"}, kv_role="kv_consumer")
    req = producer.request("c1", prompt(48))
    assert producer.sched_connector.get_num_new_matched_tokens(req, 0) == (0, False)
    producer.run(req)
    assert producer.rig.connector._worker.saves_in_flight() == 0
    assert producer.sched_connector.request_finished(req, [1]) == (False, None)
    producer.shutdown()


def test_consumer_is_to_load_reads_what_a_producer_saved(rpc_base_path, shared_redis):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    p = Instance({**backend, "lookup_rpc_port": "11"}, kv_role="kv_producer")
    c = Instance({**backend, "lookup_rpc_port": "12", "consumer_is_to_load": True},
                 kv_role="kv_consumer")
    tokens = prompt(64)
    p.run(p.request("p1", tokens))
    p.drain_saves()
    history = c.run(c.request("c1", tokens + [5]))
    blocks, computed = loaded_blocks(c, "c1", history)
    assert computed == 64
    c.assert_blocks_hold(blocks, tokens, 4)
    # The consumer saved nothing of its own: only the producer's 4 keys exist.
    keys = shared_redis.command("DBSIZE")
    assert keys.strip() == b":4", keys
    p.shutdown()
    c.shutdown()


def test_lookup_without_a_worker_is_a_quick_miss(rpc_base_path):
    cfg = config({"backend": "memory", "lookup_rpc_port": "13", "lookup_timeout_ms": 300})
    sched = make_scheduler(cfg)
    req = make_request("x", prompt(64), vllm_config=cfg)
    started = time.monotonic()
    assert sched.connector.get_num_new_matched_tokens(req, 0) == (0, False)
    assert time.monotonic() - started < 5


# ---------------------------------------------------------------- the package


def test_import_kvpool_imports_neither_torch_nor_vllm():
    code = "import sys, kvpool; print('torch' in sys.modules, 'vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == ["False", "False"]


def test_pool_api_round_trip_and_errors():
    pool = kvpool.Pool({"backend": "memory", "memory": {"capacity": "64MB"}}, use_env=False)
    assert pool.info()["scheme"] == "memory"
    (h,) = kvpool.token_hashes(list(range(16)), 16)
    key = kvpool.block_key("/models/Qwen3-8B/", h, head_or_tp_rank=1)
    assert key.startswith("Qwen3-8B@pcp0@dcp0@head_or_tp_rank:1@pp_rank:0@")
    assert pool.exists([key]) == [False]
    assert pool.put(key, memoryview(b"kv-bytes")) == "stored"
    assert pool.put(key, b"other") == "exists"
    assert pool.get(key) == b"kv-bytes"
    pool.remove([key])
    assert pool.get(key) is None
    with pytest.raises(kvpool.KvPoolError) as err:
        pool.get("not-a-key")
    assert err.value.kind == "invalid_argument"
    pool.close()
    with pytest.raises(kvpool.KvPoolError) as err:
        kvpool.Pool({"backend": "memroy"}, use_env=False)
    assert "memroy" in str(err.value)


def test_metrics_port_serves_connector_counters(rpc_base_path):
    import urllib.request

    from servers import free_port

    port = free_port()
    inst = Instance({"backend": "memory", "lookup_rpc_port": "14", "metrics_port": port})
    tokens = prompt(48)
    inst.run(inst.request("r1", tokens))
    inst.drain_saves()
    assert inst.rig.connector._worker.metrics_address().endswith(f":{port}")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    stored = [line for line in text.splitlines()
              if 'backend="connector"' in line and 'op="save"' in line
              and 'outcome="stored"' in line and not line.startswith("#")]
    assert stored and float(stored[0].split()[-1]) >= 3, stored
    inst.shutdown()


# ---------------------------------------------------------------- key formats


def test_keys_are_in_the_current_ascend_store_format_and_v018_never_aliases(
    rpc_base_path, shared_redis
):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}}
    cur = Instance({**backend, "lookup_rpc_port": "15"})
    tokens = prompt(48)
    cur.run(cur.request("k1", tokens))
    cur.drain_saves()
    keys = shared_redis.command("KEYS", "*").decode(errors="replace")
    assert keys.count("@group:0@cache_role:kv@cache_family:default@") == 3, keys
    # The same prompt through an instance writing v0.18 keys: no hit, its own 3 keys.
    old = Instance({**backend, "lookup_rpc_port": "16", "key_format": "v0.18"})
    req = old.request("k2", tokens)
    assert old.sched_connector.get_num_new_matched_tokens(req, 0) == (0, False)
    old.run(req)
    old.drain_saves()
    assert shared_redis.command("DBSIZE").strip() == b":6"
    # And the key strings kvpool.block_key writes are the ones the connector stored.
    hashes = kvpool.token_hashes(tokens, BLOCK)
    model = cur.cfg.model_config.model
    for h in hashes:
        for fmt in ("current", "v0.18"):
            # The redis backend prefixes every key with its `key_prefix` ("kvpool:").
            k = "kvpool:" + kvpool.block_key(model, h, key_format=fmt)
            assert shared_redis.command("EXISTS", k).strip() == b":1", k
    with pytest.raises(kvpool.KvPoolError) as err:
        kvpool.block_key(model, hashes[0], key_format="v0.23")
    assert "v0.18" in str(err.value)
    with pytest.raises(kvpool.KvPoolError) as err:
        Instance({**backend, "lookup_rpc_port": "17", "key_format": "v0.19"})
    assert "key_format" in str(err.value)
    cur.shutdown()
    old.shutdown()
