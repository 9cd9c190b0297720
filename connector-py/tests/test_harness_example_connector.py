"""Proves harness.py against vLLM's own connectors before kvpool's is tested with it.

If vLLM's ExampleConnector (save to safetensors files, load back) round-trips KV
through the harness, the harness drives the real scheduler and worker hooks the way
an engine does; the small in-file RecordingConnector then covers what ExampleConnector
cannot: async loads, load failures, and the exact order of calls vLLM makes.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
import torch

import harness as H
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.v1.engine import FinishReason
from vllm.v1.request import RequestStatus

BS = 16
# 2 full blocks + 8 tokens: ExampleConnector stores/loads align((40 - 1), 16) = 32.
PROMPT = [1000 + 3 * i for i in range(40)]


def _snapshot(rig: H.WorkerRig, block_ids: list[int]) -> dict:
    return {(ln, b): rig.read_block(ln, b) for ln in rig.layer_names for b in block_ids}


def _assert_blocks_hold(rig, block_ids, tokens, first_block_index=0):
    """Blocks hold exactly what the fake model computes for these tokens."""
    for i, b in enumerate(block_ids):
        for ln in rig.layer_names:
            ek, ev = rig.expected_block(ln, tokens, first_block_index + i)
            k, v = rig.read_block(ln, b)
            assert torch.equal(k[: len(ek)], ek), (ln, b)
            assert torch.equal(v[: len(ev)], ev), (ln, b)


# --------------------------------------------------------------------------- vLLM's ExampleConnector


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "BLHNC"])
def test_example_connector_save_then_load_into_fresh_blocks(tmp_path, layout):
    cfg = H.make_vllm_config(
        "ExampleConnector",
        None,
        {"shared_storage_path": str(tmp_path)},
        block_size=BS,
        kv_cache_layout=layout,
    )
    sched = H.make_scheduler(cfg, num_blocks=32)
    rig = H.WorkerRig(cfg, sched.kv_cache_config)
    assert type(sched.connector).__name__ == "ExampleConnector"
    assert type(rig.connector).__name__ == "ExampleConnector"

    # ---- request A: computed locally; ExampleConnector saves its first 32 tokens.
    sched.add_request(H.make_request("a", PROMPT, max_tokens=2, block_size=BS))
    so, _, _ = H.engine_step(sched, rig)
    assert so.num_scheduled_tokens == {"a": 40}
    a_blocks = rig.block_ids("a")
    assert len(a_blocks) == 3
    _assert_blocks_hold(rig, a_blocks, PROMPT)  # the harness's own writes are right
    saved = _snapshot(rig, a_blocks[:2])
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert files == sorted(f"{ln}.safetensors" for ln in rig.layer_names)

    # Forget A locally: zero the paged cache and drop the prefix cache, so B can
    # only get A's KV through the connector.
    rig.zero_cache()
    assert sched.reset_prefix_cache()

    # ---- request B: same prompt -> 32 external tokens, loaded synchronously.
    sched.add_request(H.make_request("b", PROMPT, max_tokens=1, block_size=BS))
    so, kvo, eco = H.engine_step(sched, rig)
    assert so.has_sync_kv_loads
    (new_req,) = so.scheduled_new_reqs
    assert new_req.num_computed_tokens == 32  # what the scheduler took as external
    assert so.num_scheduled_tokens == {"b": 40 - 32}
    # ... and what it reports in its stats (engine core output of this step).
    stats = eco[0].scheduler_stats.connector_prefix_cache_stats
    assert (stats.requests, stats.queries, stats.hits) == (1, 40, 32)
    assert not kvo.invalid_block_ids
    b_blocks = rig.block_ids("b")
    # Fresh blocks (A's were freed, then handed out again in LRU order, so compare
    # by content, not by id): loaded blocks equal what A saved, bit for bit.
    for ln in rig.layer_names:
        for i in range(2):
            k, v = rig.read_block(ln, b_blocks[i])
            sk, sv = saved[(ln, a_blocks[i])]
            assert torch.equal(k, sk) and torch.equal(v, sv), (ln, i)
    # The last block was computed this step (positions 32..39) over zeroed memory.
    _assert_blocks_hold(rig, b_blocks[2:], PROMPT, first_block_index=2)
    k, v = rig.read_block(rig.layer_names[0], b_blocks[2])
    assert not k[8:].any() and not v[8:].any()  # slots not yet written stay zero

    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)
    rig.shutdown()


# --------------------------------------------------------------------------- a recording connector

# Shared by every instance in this process: the "remote store" (block hash -> per-layer
# tensors) and the call log, keyed by role.
STORE: dict[bytes, dict[str, tuple[torch.Tensor, ...]]] = {}
CALLS: dict[str, list[tuple]] = defaultdict(list)


@dataclass
class RecMeta(KVConnectorMetadata):
    # req_id -> list of (block_hash, block_id) to load / to save this step
    loads: dict[str, list[tuple[bytes, int]]] = field(default_factory=dict)
    saves: dict[str, list[tuple[bytes, int]]] = field(default_factory=dict)
    load_async: bool = False


def _as_tuple(kv) -> tuple[torch.Tensor, ...]:
    # "fused": one [B, H, N, 2D] view per layer; "kv_pair": (k, v), each [B, N, H, D].
    return tuple(kv) if isinstance(kv, (tuple, list)) else (kv,)


class RecordingConnector(KVConnectorBase_V1):
    """Stores full blocks keyed by vLLM's request.block_hashes; loads sync or async.

    extra_config: load_async (bool), fail_loads (bool: report every loaded block as
    failed via get_block_ids_with_load_errors and copy nothing).
    """

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.load_async = bool(extra.get("load_async", False))
        self.fail_loads = bool(extra.get("fail_loads", False))
        self.block_size = vllm_config.cache_config.block_size
        # scheduler side
        self._reqs: dict[str, Any] = {}
        self._local_tokens: dict[str, int] = {}
        self._pending_loads: dict[str, list[tuple[bytes, int]]] = {}
        self._loading: dict[str, set[int]] = {}  # req -> block ids being loaded
        self._failed: set[str] = set()  # reqs whose load failed: never claim a hit again
        # worker side
        self.kv_caches: dict[str, Any] = {}
        self._started: set[str] = set()  # async loads started this step
        self._to_report: set[str] = set()  # ... and in the previous step
        self._load_errors: set[int] = set()

    def _rec(self, *call):
        CALLS[self.role.name].append(call)

    # ---- scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self._rec("get_num_new_matched_tokens", request.request_id, num_computed_tokens)
        self._reqs[request.request_id] = request
        self._local_tokens[request.request_id] = num_computed_tokens
        if request.request_id in self._failed:
            # After a failed async load vLLM frees the blocks and asks again;
            # claiming the same hit again would fail the same way forever.
            return 0, False
        # Leave at least one token to compute, so the request can sample.
        limit = (request.num_tokens - 1) // self.block_size
        hit = 0
        while hit < limit and request.block_hashes[hit] in STORE:
            hit += 1
        n = hit * self.block_size - num_computed_tokens
        if n <= 0:
            return 0, False
        return n, self.load_async

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        self._rec("update_state_after_alloc", request.request_id, num_external_tokens)
        if num_external_tokens == 0:
            return
        first = self._local_tokens[request.request_id] // self.block_size
        last = first + num_external_tokens // self.block_size
        ids = blocks.get_block_ids()[0]
        hashes = request.block_hashes
        self._pending_loads[request.request_id] = [
            (bytes(hashes[i]), ids[i]) for i in range(first, last)
        ]
        self._loading[request.request_id] = set(ids[first:last])

    def build_connector_meta(self, scheduler_output):
        meta = RecMeta(loads=self._pending_loads, load_async=self.load_async)
        self._pending_loads = {}
        for r in scheduler_output.scheduled_new_reqs:
            if r.req_id in meta.loads:
                continue
            req = self._reqs[r.req_id]
            end = r.num_computed_tokens + scheduler_output.num_scheduled_tokens[r.req_id]
            full = min(end // self.block_size, len(req.block_hashes))
            start = r.num_computed_tokens // self.block_size
            meta.saves[r.req_id] = [
                (bytes(req.block_hashes[i]), r.block_ids[0][i]) for i in range(start, full)
            ]
        self._rec("build_connector_meta", sorted(meta.loads), sorted(meta.saves))
        return meta

    def update_connector_output(self, connector_output):
        self._rec(
            "update_connector_output",
            sorted(connector_output.finished_recving or ()),
            sorted(connector_output.invalid_block_ids),
        )
        for req_id, ids in self._loading.items():
            if ids & connector_output.invalid_block_ids:
                self._failed.add(req_id)

    def request_finished(self, request, block_ids):
        self._rec("request_finished", request.request_id)
        for state in (self._reqs, self._local_tokens, self._loading):
            state.pop(request.request_id, None)
        self._failed.discard(request.request_id)
        return False, None

    # ---- worker side
    def register_kv_caches(self, kv_caches):
        self._rec("register_kv_caches", len(kv_caches))
        self.kv_caches = kv_caches

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        self._rec("start_load_kv", sorted(meta.loads), forward_context.attn_metadata is None)
        for req_id, blocks in meta.loads.items():
            for h, block_id in blocks:
                if self.fail_loads:
                    self._load_errors.add(block_id)
                    continue
                for ln, kv in self.kv_caches.items():
                    for dst, src in zip(_as_tuple(kv), STORE[h][ln]):
                        dst[block_id].copy_(src)
            if meta.load_async:
                self._started.add(req_id)

    def wait_for_layer_load(self, layer_name):
        self._rec("wait_for_layer_load", layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        meta = self._get_connector_metadata()
        self._rec("save_kv_layer", layer_name)
        for blocks in meta.saves.values():
            for h, block_id in blocks:
                STORE.setdefault(h, {})[layer_name] = tuple(
                    t[block_id].clone() for t in _as_tuple(kv_layer)
                )

    def wait_for_save(self):
        self._rec("wait_for_save")

    def get_finished(self, finished_req_ids):
        # An async load completes one step after it started, so the scheduler has
        # to keep the request waiting for a step.
        done, self._to_report, self._started = self._to_report, self._started, set()
        self._rec("get_finished", sorted(finished_req_ids), sorted(done))
        return None, (done or None)

    def get_block_ids_with_load_errors(self):
        errors, self._load_errors = self._load_errors, set()
        return errors


@pytest.fixture
def recording():
    STORE.clear()
    CALLS.clear()
    yield
    STORE.clear()
    CALLS.clear()


def _recording_setup(extra, kv_format="fused", num_blocks=32):
    cfg = H.make_vllm_config("RecordingConnector", __name__, extra, block_size=BS)
    sched = H.make_scheduler(cfg, num_blocks=num_blocks)
    rig = H.WorkerRig(cfg, sched.kv_cache_config, kv_format=kv_format)
    return sched, rig


def _save_prompt(sched, rig):
    """Request A computes PROMPT and saves its 2 full blocks."""
    sched.add_request(H.make_request("a", PROMPT, max_tokens=1, block_size=BS))
    H.run_until_finished(sched, rig)
    assert len(STORE) == 2 and all(len(v) == len(rig.layer_names) for v in STORE.values())
    rig.zero_cache()
    assert sched.reset_prefix_cache()
    CALLS.clear()


@pytest.mark.parametrize("kv_format", ["fused", "kv_pair"])
def test_recording_connector_sync_load_call_order(recording, kv_format):
    sched, rig = _recording_setup({}, kv_format)
    _save_prompt(sched, rig)
    sched.add_request(H.make_request("b", PROMPT, max_tokens=1, block_size=BS))
    so, _, _ = H.engine_step(sched, rig)
    assert so.num_scheduled_tokens == {"b": 8}
    _assert_blocks_hold(rig, rig.block_ids("b")[:2], PROMPT)
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)

    layers = rig.layer_names
    assert CALLS["SCHEDULER"] == [
        ("get_num_new_matched_tokens", "b", 0),
        ("update_state_after_alloc", "b", 32),
        ("build_connector_meta", ["b"], []),
        # update_from_output: the request stops (max_tokens=1) before the connector
        # output is applied; a KVConnectorOutput is passed every step, even empty.
        ("request_finished", "b"),
        ("update_connector_output", [], []),
        ("build_connector_meta", [], []),  # the step that hands "b" to the worker as finished
        ("update_connector_output", [], []),
    ]
    # A sync load starts BEFORE the forward (scheduler_output.has_sync_kv_loads).
    assert CALLS["WORKER"] == [
        ("start_load_kv", ["b"], False),
        *[c for ln in layers for c in (("wait_for_layer_load", ln), ("save_kv_layer", ln))],
        ("wait_for_save",),
        ("get_finished", [], []),
        # nothing scheduled: kv_connector_no_forward, attn_metadata None
        ("start_load_kv", [], True),
        ("wait_for_save",),
        ("get_finished", ["b"], []),
    ]


def test_recording_connector_async_load_waits_for_finished_recving(recording):
    sched, rig = _recording_setup({"load_async": True})
    _save_prompt(sched, rig)
    req = H.make_request("b", PROMPT, max_tokens=1, block_size=BS)
    sched.add_request(req)

    so, kvo, _ = H.engine_step(sched, rig)  # load starts; nothing to compute
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert so.num_scheduled_tokens == {} and not so.has_sync_kv_loads
    assert not kvo.finished_recving
    so, kvo, _ = H.engine_step(sched, rig)  # still waiting; the worker reports done
    assert so.num_scheduled_tokens == {}
    assert kvo.finished_recving == {"b"}
    so, _, _ = H.engine_step(sched, rig)  # now scheduled, only the uncached tail
    assert so.num_scheduled_tokens == {"b": 8}
    _assert_blocks_hold(rig, rig.block_ids("b")[:2], PROMPT)
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)

    assert CALLS["SCHEDULER"] == [
        ("get_num_new_matched_tokens", "b", 0),
        ("update_state_after_alloc", "b", 32),
        ("build_connector_meta", ["b"], []),
        ("update_connector_output", [], []),
        ("build_connector_meta", [], []),
        ("update_connector_output", ["b"], []),
        # once the load is reported, "b" is allocated its remaining blocks (no new
        # lookup) and first appears in scheduled_new_reqs, with 32 tokens computed.
        ("update_state_after_alloc", "b", 0),
        ("build_connector_meta", [], ["b"]),
        ("request_finished", "b"),
        ("update_connector_output", [], []),
        ("build_connector_meta", [], []),
        ("update_connector_output", [], []),
    ]
    # An async load is started AFTER the forward, and here there is no forward at
    # all (nothing scheduled): start_load_kv sees attn_metadata None.
    assert CALLS["WORKER"][:6] == [
        ("start_load_kv", ["b"], True),
        ("wait_for_save",),
        ("get_finished", [], []),
        ("start_load_kv", [], True),
        ("wait_for_save",),
        ("get_finished", [], ["b"]),
    ]


@pytest.mark.parametrize("load_async", [False, True])
def test_failed_load_is_recomputed(recording, load_async):
    sched, rig = _recording_setup({"load_async": load_async, "fail_loads": True})
    _save_prompt(sched, rig)
    sched.add_request(H.make_request("b", PROMPT, max_tokens=1, block_size=BS))
    history = []
    while sched.requests:
        so, kvo, _ = H.engine_step(sched, rig)
        history.append((so, kvo))
        assert len(history) < 10
    # "b" just finished; the worker still holds its block table until the next step.
    _assert_blocks_hold(rig, rig.block_ids("b"), PROMPT)  # recomputed, never garbage
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)

    invalid = set().union(*(kvo.invalid_block_ids for _, kvo in history))
    assert len(invalid) == 2
    # kv_load_failure_policy="recompute": from the first failed block on, the KV is
    # computed locally. Sync: the step that loaded also computed the 8-token tail,
    # whose output is discarded; then all 40 again. Async: the blocks are freed and
    # the request is looked up again (our connector then claims no hit): 40 once.
    computed = [so.num_scheduled_tokens["b"] for so, _ in history if "b" in so.num_scheduled_tokens]
    assert computed == ([8, 40] if not load_async else [40])


@pytest.mark.parametrize("load_async", [False, True])
def test_failed_load_with_fail_policy_errors_the_request(recording, load_async):
    """kv_load_failure_policy="fail" (vLLM's default): the request ends with
    FinishReason.ERROR and no token, in the step that reports the failed blocks."""
    cfg = H.make_vllm_config(
        "RecordingConnector", __name__, {"load_async": load_async, "fail_loads": True},
        block_size=BS, load_failure_policy="fail",
    )
    sched = H.make_scheduler(cfg, num_blocks=32)
    rig = H.WorkerRig(cfg, sched.kv_cache_config)
    _save_prompt(sched, rig)
    req = H.make_request("b", PROMPT, max_tokens=1, block_size=BS)
    sched.add_request(req)
    _, kvo, eco = H.engine_step(sched, rig)
    assert len(kvo.invalid_block_ids) == 2
    (out,) = [o for v in eco.values() for o in v.outputs]
    assert (out.request_id, out.finish_reason, out.new_token_ids) == ("b", FinishReason.ERROR, [])
    assert req.status == RequestStatus.FINISHED_ERROR
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_request_block_hashes_are_the_engine_chain(monkeypatch, algo):
    """request.block_hashes, recomputed from first principles (what a Rust
    reproduction has to match): h_i = sha256(ser((h_{i-1}, tuple(tokens_i), None))),
    h_-1 = NONE_HASH = sha256(ser("vllm-none-hash")) when PYTHONHASHSEED is unset,
    ser = pickle protocol 5 (sha256) or canonical CBOR (sha256_cbor)."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    req = H.make_request("h", PROMPT, block_size=BS, hash_algo=algo)
    if algo == "sha256":
        ser = lambda x: pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL)  # noqa: E731
    else:
        ser = lambda x: cbor2.dumps(x, canonical=True)  # noqa: E731
    parent = hashlib.sha256(ser("vllm-none-hash")).digest()
    expected = []
    for i in range(len(PROMPT) // BS):  # full blocks only: 2 of 40 tokens' 2.5
        parent = hashlib.sha256(ser((parent, tuple(PROMPT[i * BS : (i + 1) * BS]), None))).digest()
        expected.append(parent)
    assert [bytes(h) for h in req.block_hashes] == expected


# --------------------------------------------------------------------------- harness scenarios


def test_two_instances_share_storage(tmp_path):
    """Two engines ("instances"), each with its own scheduler and worker, one store:
    what instance 1 saved is loaded by instance 2 into its own cache."""
    rigs = []
    for _ in range(2):
        cfg = H.make_vllm_config("ExampleConnector", None, {"shared_storage_path": str(tmp_path)})
        sched = H.make_scheduler(cfg, num_blocks=32)
        rigs.append((sched, H.WorkerRig(cfg, sched.kv_cache_config)))
    (s1, r1), (s2, r2) = rigs
    s1.add_request(H.make_request("a", PROMPT, max_tokens=1, block_size=BS))
    H.run_until_finished(s1, r1)
    s2.add_request(H.make_request("b", PROMPT, max_tokens=1, block_size=BS))
    so, _, _ = H.engine_step(s2, r2)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 32
    assert so.num_scheduled_tokens == {"b": 8}
    _assert_blocks_hold(r2, r2.block_ids("b"), PROMPT)
    H.run_until_finished(s2, r2)
    for sched, _ in rigs:
        H.assert_scheduler_empty(sched)


def test_multi_connector_with_a_child_module(tmp_path, recording):
    """MultiConnector loads a child by module path; the first child with a hit loads."""
    cfg = H.make_vllm_config(
        "MultiConnector",
        None,
        {
            "connectors": [
                {"kv_connector": "RecordingConnector", "kv_connector_module_path": __name__,
                 "kv_role": "kv_both"},
                {"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                 "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)}},
            ]
        },
        block_size=BS,
    )
    sched = H.make_scheduler(cfg, num_blocks=32)
    rig = H.WorkerRig(cfg, sched.kv_cache_config)
    assert [type(c).__name__ for c in sched.connector._connectors] == [
        "RecordingConnector", "ExampleConnector"]
    _save_prompt(sched, rig)
    sched.add_request(H.make_request("b", PROMPT, max_tokens=1, block_size=BS))
    so, _, _ = H.engine_step(sched, rig)
    assert so.num_scheduled_tokens == {"b": 8}
    _assert_blocks_hold(rig, rig.block_ids("b"), PROMPT)
    assert ("start_load_kv", ["b"], False) in CALLS["WORKER"]
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)


def test_preemption_and_abort_release_everything(recording):
    """Too few blocks for three growing requests: one is preempted and resumed; the
    worker's block tables follow, so every finished request holds its exact KV.
    An aborted request is released too."""
    # 8 usable blocks; each request grows to (40 + 29) / 16 -> 5 blocks.
    sched, rig = _recording_setup({}, num_blocks=9)
    prompts = {f"p{i}": [500 + 10 * i + j for j in range(40)] for i in range(3)}
    max_tokens = 30
    for rid, prompt in prompts.items():
        sched.add_request(H.make_request(rid, prompt, max_tokens=max_tokens, block_size=BS))
    preempted, checked = set(), set()
    for _ in range(200):
        if not sched.requests:
            break
        so, _, _ = H.engine_step(sched, rig)
        preempted |= so.preempted_req_ids or set()
        for rid in set(so.num_scheduled_tokens) - set(sched.requests):
            # Finished this step: KV exists for every token but the last sampled one.
            tokens = prompts[rid] + [H.SAMPLED_TOKEN_ID] * (max_tokens - 1)
            _assert_blocks_hold(rig, rig.block_ids(rid), tokens)
            checked.add(rid)
    assert preempted and checked == set(prompts)
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)

    sched.add_request(H.make_request("x", PROMPT, max_tokens=50, block_size=BS))
    H.engine_step(sched, rig)
    H.engine_step(sched, rig)
    sched.finish_requests("x", RequestStatus.FINISHED_ABORTED)
    H.run_until_finished(sched, rig)
    H.assert_scheduler_empty(sched)
    assert ("request_finished", "x") in CALLS["SCHEDULER"]
