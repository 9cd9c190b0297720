"""KV events: what the pool stores and loses, published by vLLM 0.33's own scheduler on its
own ZMQ event publisher, as a cache-aware router subscribed to it receives them."""

from __future__ import annotations

import time

import msgspec
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message
from vllm.config import KVEventsConfig
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)
from vllm.distributed.kv_transfer.kv_connector.utils import KVOutputAggregator
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput

from harness import model_runner_output
from kvpool.events import MAX_PENDING_COLLECTIONS, KvPoolKVEvents, PendingEvents
from test_connector import BLOCK, Instance, prompt, run_engine, shared_redis  # noqa: F401
from test_hybrid import redis_keys


class Subscriber:
    """A router's end of vLLM's event publisher."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        # PUB drops what it sends before a subscriber is connected: wait for the connection's
        # handshake (not a fixed sleep, which a loaded machine can outlast), then briefly for
        # the publisher's I/O thread to take in the subscription that follows it.
        monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(endpoint)
        assert monitor.poll(10_000), f"no ZMQ handshake with {endpoint} in 10 s"
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED, event
        self.sock.disable_monitor()
        monitor.close()
        time.sleep(0.1)
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)

    def events(self, settle: float = 0.5) -> list:
        out = []
        while self.sock.poll(int(settle * 1000)):
            _topic, _seq, payload = self.sock.recv_multipart()
            out.extend(self.decoder.decode(payload).events)
        return out

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def events_instance(extra: dict, tmp_path, name: str) -> tuple[Instance, Subscriber]:
    endpoint = f"ipc://{tmp_path}/{name}-events"
    cfg = KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint)
    inst = Instance(extra, kv_events_config=cfg)
    return inst, Subscriber(inst.sched.kv_event_publisher._endpoint)


def of_medium(events, medium):
    return [e for e in events if getattr(e, "medium", None) == medium]


def test_saved_blocks_are_published_as_vllm_hashes_and_lost_ones_removed(
    rpc_base_path, shared_redis, tmp_path
):
    backend = {"backend": "redis", "redis": {"url": shared_redis.url}, "hash_mode": "vllm"}
    a, a_events = events_instance({**backend, "lookup_rpc_port": "81"}, tmp_path, "a")
    tokens = prompt(80)  # 5 full blocks
    a.run(a.request("a-1", tokens))
    a.drain_saves()
    run_engine(a.sched, a.rig)
    published = a_events.events()

    stored = of_medium(published, "kvpool:redis")
    assert all(isinstance(e, BlockStored) for e in stored), stored
    assert len(stored) == 5, stored
    # The GPU cache's own events for the same blocks: a router sees the same hashes, tokens
    # and chain for the pool's copies.
    gpu = [e for e in published if isinstance(e, BlockStored) and e.medium != "kvpool:redis"]
    gpu_by_hash = {e.block_hashes[i]: (e, i) for e in gpu for i in range(len(e.block_hashes))}
    parent = None
    for i, e in enumerate(stored):
        assert len(e.block_hashes) == 1
        h = e.block_hashes[0]
        assert h in gpu_by_hash, f"block {i}'s hash is not vLLM's"
        assert e.token_ids == tokens[i * BLOCK : (i + 1) * BLOCK]
        assert e.parent_block_hash == parent
        assert (e.block_size, e.group_idx, e.kv_cache_spec_kind) == (BLOCK, 0, "full_attention")
        assert e.lora_name is None
        parent = h
    hashes = [e.block_hashes[0] for e in stored]

    # Instance B looks the prompt up (all 5 blocks), then block 3 vanishes before the load.
    b, b_events = events_instance({**backend, "lookup_rpc_port": "82"}, tmp_path, "b")
    b.sched.add_request(b.request("b-1", tokens))
    so = b.sched.schedule()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 79
    block3 = b.sched.requests["b-1"].block_hashes[3]
    victim = redis_keys(shared_redis, f"*{bytes(block3).hex()}*")
    assert len(victim) == 1 and shared_redis.command("DEL", *victim) == b":1\r\n"
    kvo = b.rig.step(so)
    assert kvo.invalid_block_ids, "the load of block 3 failed"
    b.sched.update_from_output(so, model_runner_output(so, kvo, scheduler=b.sched))
    run_engine(b.sched, b.rig)
    b.drain_saves()
    run_engine(b.sched, b.rig)
    removed = [e for e in b_events.events() if isinstance(e, BlockRemoved)]
    pool_removed = of_medium(removed, "kvpool:redis")
    assert [(e.block_hashes, e.group_idx) for e in pool_removed] == [([hashes[3]], 0)]

    # Without --kv-events-config the connector reports nothing.
    assert Instance({"backend": "memory", "lookup_rpc_port": "83"}).rig.connector.get_kv_connector_kv_cache_events() is None
    for inst, sub in ((a, a_events), (b, b_events)):
        sub.close()
        inst.shutdown()


def stored_event(h: int, group: int = 0) -> BlockStored:
    return BlockStored(
        block_hashes=[h],
        parent_block_hash=None,
        token_ids=[1, 2],
        block_size=2,
        lora_id=None,
        medium="kvpool:memory",
        lora_name=None,
        group_idx=group,
    )


def worker_output(*events) -> ModelRunnerOutput:
    kv = KvPoolKVEvents(num_workers=1, put_steps=(1, 2))
    kv.add_events(list(events))
    return ModelRunnerOutput(
        req_ids=[],
        req_id_to_index={},
        kv_connector_output=KVConnectorOutput(kv_cache_events=kv),
    )


def test_a_block_is_published_once_every_rank_holding_a_share_reported_it():
    """Two tensor-parallel workers, combined by vLLM's own output aggregator. Group 0 is split
    by heads (both ranks store every block); group 1 is MLA-like (the ranks take turns:
    put step 2), so one report covers a block."""
    aggregator = KVOutputAggregator(expected_finished_count=2)
    pending = PendingEvents()  # what the scheduler half keeps between steps

    def step(*outputs):
        out = aggregator.aggregate(list(outputs))
        pending.add(out.kv_connector_output.kv_cache_events)
        return pending.take()

    # Rank 0 saved block 1 this step; rank 1 only the next: published after both.
    assert step(worker_output(stored_event(1)), worker_output()) == []
    assert step(worker_output(), worker_output(stored_event(1))) == [stored_event(1)]
    # A turn-taking group's block: one rank's report is the whole block.
    assert step(worker_output(stored_event(2, group=1)), worker_output()) == [
        stored_event(2, group=1)
    ]
    # A removal seen by one rank is published at once, and a reset too.
    removed = BlockRemoved(block_hashes=[3], medium="kvpool:memory", group_idx=0)
    got = step(worker_output(removed, AllBlocksCleared()), worker_output(removed))
    assert got[0] == AllBlocksCleared() and got[1:] == [removed]


def test_a_block_one_rank_never_saved_is_never_published():
    pending = KvPoolKVEvents(num_workers=2)
    pending.add_events([stored_event(9)])
    for _ in range(MAX_PENDING_COLLECTIONS):
        assert pending.pop_complete() == []
    assert pending.has_events()
    assert pending.pop_complete() == []
    assert not pending.has_events(), "dropped, not published"


def test_bad_containers_are_refused():
    with pytest.raises(ValueError, match="num_workers"):
        KvPoolKVEvents(num_workers=0)
    with pytest.raises(ValueError, match="put steps"):
        KvPoolKVEvents(put_steps=(0,))
    with pytest.raises(TypeError, match="list"):
        KvPoolKVEvents().add_events(stored_event(1))
