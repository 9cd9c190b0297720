"""kvpool's loads and saves in vLLM's own connector stats and Prometheus metrics, collected
through vLLM's worker hooks (`_get_kv_connector_output` calls `get_kv_connector_stats` every
step) and fed to vLLM's `KVConnectorProm`, as its stat logger does."""

from __future__ import annotations

from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorProm

from kvpool.stats import KvPoolConnectorStats
from test_connector import BLOCK, Instance, prompt


def collected(history) -> KvPoolConnectorStats:
    """What vLLM's stat logger accumulates over these steps."""
    total = KvPoolConnectorStats()
    for _, kvo in history:
        if kvo is not None and kvo.kv_connector_stats is not None:
            total.aggregate(kvo.kv_connector_stats)
    return total


def test_loads_and_saves_reach_vllm_stats_and_prometheus(rpc_base_path):
    a = Instance({"backend": "memory", "lookup_rpc_port": "61"})
    tokens = prompt(80)  # 5 full blocks
    history = a.run(a.request("r1", tokens))
    a.drain_saves()
    # Saves finish in the background: the next steps' collections carry them.
    a.rig.zero_cache()
    assert a.sched.reset_prefix_cache()
    history += a.run(a.request("r2", tokens))
    a.drain_saves()
    history += a.run()
    stats = collected(history)

    rig = a.rig
    value_len = len(rig.layer_names) * BLOCK * rig.num_kv_heads * 2 * rig.head_size * 2
    summary = stats.reduce()
    assert summary["kvpool_save_bytes"] == 5 * value_len, summary
    assert summary["kvpool_save_failed_blocks"] == 0
    # r2 loads the 79 tokens the pool offers: 5 blocks, none failed.
    assert summary["kvpool_load_blocks"] == 5, summary
    assert summary["kvpool_load_bytes"] == 5 * value_len
    assert summary["kvpool_load_failed_blocks"] == 0
    assert summary["kvpool_load_count"] >= 1

    # The payload vLLM ships from workers to its logger, into vLLM's Prometheus metrics.
    prom = KVConnectorProm(a.cfg, ["model_name", "engine"], {0: ["tiny", "0"]})
    prom.observe(stats.to_dict(), 0)
    labels = {"model_name": "tiny", "engine": "0", "operation": "load"}
    assert REGISTRY.get_sample_value("vllm:kvpool_transfer_bytes_total", labels) == 5 * value_len
    assert REGISTRY.get_sample_value("vllm:kvpool_transfer_blocks_total", labels) == 5
    assert REGISTRY.get_sample_value("vllm:kvpool_transfer_failed_blocks_total", labels) == 0
    count = REGISTRY.get_sample_value("vllm:kvpool_transfer_time_seconds_count", labels)
    assert count == summary["kvpool_load_count"]
    saved = {**labels, "operation": "save"}
    assert REGISTRY.get_sample_value("vllm:kvpool_transfer_bytes_total", saved) == 5 * value_len
    a.shutdown()
