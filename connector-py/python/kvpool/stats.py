"""kvpool's loads and saves in vLLM's own connector stats: the periodic
``KV Transfer metrics: ...`` log line and vLLM's Prometheus ``/metrics``.

vLLM collects ``KvPoolConnector.get_kv_connector_stats()`` from every worker each step, merges
them with ``aggregate``, logs ``reduce()`` and feeds the payload to ``KvPoolPromMetrics``. The
records themselves come from Rust (``Worker.take_transfer_records``); these classes only carry
and sum them, as vLLM's API requires Python objects here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

__all__ = ["KvPoolConnectorStats", "KvPoolPromMetrics", "OPERATIONS"]

OPERATIONS = ("load", "save")
_FIELDS = ("duration_seconds", "num_blocks", "num_bytes", "num_failed_blocks")


@dataclass
class KvPoolConnectorStats(KVConnectorStats):
    """``data``: per operation (``load``, ``save``), one record per transfer with
    ``duration_seconds``, ``num_blocks``, ``num_bytes`` and ``num_failed_blocks``."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    @classmethod
    def from_records(cls, records: list) -> "KvPoolConnectorStats":
        stats = cls()
        for op, *values in records:
            stats.data.setdefault(op, []).append(dict(zip(_FIELDS, values)))
        return stats

    def reset(self) -> None:
        self.data = {}

    def is_empty(self) -> bool:
        return not any(self.data.values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for op, records in other.data.items():
            self.data.setdefault(op, []).extend(records)
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for op, records in sorted(self.data.items()):
            if not records:
                continue
            seconds = sum(float(r["duration_seconds"]) for r in records)
            out[f"kvpool_{op}_count"] = len(records)
            out[f"kvpool_{op}_blocks"] = sum(int(r["num_blocks"]) for r in records)
            out[f"kvpool_{op}_bytes"] = sum(int(r["num_bytes"]) for r in records)
            out[f"kvpool_{op}_failed_blocks"] = sum(
                int(r["num_failed_blocks"]) for r in records
            )
            out[f"kvpool_{op}_avg_ms"] = round(seconds / len(records) * 1e3, 3)
        return out


class KvPoolPromMetrics(KVConnectorPromMetrics):
    """vLLM-registered Prometheus metrics (vLLM's ``vllm:`` prefix and engine labels, plus
    ``operation``): transfer latency, and blocks, bytes and failed blocks moved."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        names = list(labelnames) + ["operation"]
        self._time = self._histogram_cls(
            name="vllm:kvpool_transfer_time_seconds",
            documentation="Time of one kvpool load or save, from start to the last "
            "backend reply.",
            buckets=[1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            labelnames=names,
        )
        self._blocks = self._counter_cls(
            name="vllm:kvpool_transfer_blocks_total",
            documentation="KV blocks kvpool loaded or saved (a save's blocks the pool "
            "already held included).",
            labelnames=names,
        )
        self._bytes = self._counter_cls(
            name="vllm:kvpool_transfer_bytes_total",
            documentation="Bytes kvpool moved to or from its backend.",
            labelnames=names,
        )
        self._failed = self._counter_cls(
            name="vllm:kvpool_transfer_failed_blocks_total",
            documentation="KV blocks kvpool failed to load (vLLM recomputes them) or save.",
            labelnames=names,
        )
        self._children: dict[tuple[int, str], tuple] = {}

    def _for(self, engine_idx: int, op: str) -> tuple:
        key = (engine_idx, op)
        if key not in self._children:
            values = list(self.per_engine_labelvalues[engine_idx]) + [op]
            self._children[key] = tuple(
                m.labels(*values) for m in (self._time, self._blocks, self._bytes, self._failed)
            )
        return self._children[key]

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for op, records in (transfer_stats_data or {}).items():
            time, blocks, nbytes, failed = self._for(engine_idx, op)
            for r in records:
                time.observe(float(r["duration_seconds"]))
                blocks.inc(int(r["num_blocks"]))
                nbytes.inc(int(r["num_bytes"]))
                failed.inc(int(r["num_failed_blocks"]))
