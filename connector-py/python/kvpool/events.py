"""vLLM KV events for what the pool stores and loses.

With vLLM's ``--kv-events-config '{"enable_kv_cache_events": true, ...}'`` every worker
reports, after each step, the blocks its saves left in the pool (``BlockStored``), the blocks
its loads found missing (``BlockRemoved``) and a reset that emptied the pool
(``AllBlocksCleared``); vLLM gathers the workers' reports and the scheduler publishes them on
vLLM's event publisher, where a cache-aware router (llm-d, Dynamo) sees them next to the GPU
cache's own events, told apart by their ``medium`` (``"kvpool:<backend>"``).

A block is split across ranks (each tensor-parallel rank stores its heads; with MLA the ranks
take turns), so a ``BlockStored`` is published only once the ranks that store it, times how many
ranks share each copy, make up every worker. A removal is published as soon as one rank sees
it: a block missing one rank's share cannot be loaded.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Optional, Sequence

from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVCacheEvent,
    KVConnectorKVEvents,
)

__all__ = ["KvPoolKVEvents", "PendingEvents", "pool_events", "group_spec_details"]

# A BlockStored still short of some rank's report after this many collections is dropped: that
# rank's save failed, and a router must not be told the block is there.
MAX_PENDING_COLLECTIONS = 4096


class KvPoolKVEvents(KVConnectorKVEvents):
    """The events of one step's workers (vLLM merges those of every worker into the first's,
    counting the workers) and, on the scheduler, the events still waiting for some rank."""

    def __init__(self, num_workers: int = 1, put_steps: Sequence[int] = (1,)) -> None:
        if num_workers <= 0:
            raise ValueError("num_workers must be greater than zero")
        if any(step <= 0 for step in put_steps):
            raise ValueError("put steps must be greater than zero")
        self._counts: Counter = Counter()
        # AllBlocksCleared is not hashable (it has no fields): a flag stands for it.
        self._cleared = False
        self._num_workers = num_workers
        self._put_steps = tuple(put_steps)
        # Collections each pending event has waited through.
        self._waited: dict = {}

    def add_events(self, events: list) -> None:
        if not isinstance(events, list):
            raise TypeError("events must be a list of KVCacheEvent")
        for event in events:
            if isinstance(event, AllBlocksCleared):
                self._cleared = True
            else:
                self._counts[event] += 1

    def increment_workers(self, count: int = 1) -> None:
        if count <= 0:
            raise ValueError("count must be positive")
        self._num_workers += count

    def get_number_of_workers(self) -> int:
        return self._num_workers

    def get_all_events(self) -> list:
        cleared = [AllBlocksCleared()] if self._cleared else []
        return cleared + list(self._counts.elements())

    def clear_events(self) -> None:
        self._counts.clear()
        self._cleared = False
        self._waited.clear()
        self._num_workers = 1

    def aggregate(self) -> "KvPoolKVEvents":
        complete = self.pop_complete()
        self._counts.clear()
        self.add_events(complete)
        self._num_workers = 1
        return self

    def merge_pending(self, other: "KvPoolKVEvents") -> None:
        """Adds a later step's reports to the events still waiting here."""
        self.add_events(other.get_all_events())

    def has_events(self) -> bool:
        return self._cleared or bool(self._counts)

    def _complete(self, event: KVCacheEvent, count: int) -> bool:
        if isinstance(event, BlockStored):
            group = event.group_idx or 0
            step = self._put_steps[group] if group < len(self._put_steps) else 1
            return count * step >= self._num_workers
        return True

    def pop_complete(self) -> list:
        """The events every rank needed has reported, in first-reported order; the others
        stay (dropped after ``MAX_PENDING_COLLECTIONS`` collections)."""
        complete: list = [AllBlocksCleared()] if self._cleared else []
        self._cleared = False
        for event, count in list(self._counts.items()):
            if self._complete(event, count):
                complete.append(event)
                del self._counts[event]
                self._waited.pop(event, None)
                continue
            waited = self._waited.get(event, 0) + 1
            if waited > MAX_PENDING_COLLECTIONS:
                del self._counts[event]
                self._waited.pop(event, None)
            else:
                self._waited[event] = waited
        return complete

    def __repr__(self) -> str:
        return f"<KvPoolKVEvents workers={self._num_workers} events={self.get_all_events()}>"


class PendingEvents:
    """The scheduler's side: the workers' reports, gathered step after step, until every rank
    a block needs has reported it."""

    def __init__(self) -> None:
        self._pending: Optional[KvPoolKVEvents] = None

    def add(self, events: Any) -> None:
        """Takes a step's combined reports (``KVConnectorOutput.kv_cache_events``)."""
        if not isinstance(events, KvPoolKVEvents) or not events.has_events():
            return
        if self._pending is None:
            self._pending = events
        else:
            self._pending.merge_pending(events)

    def take(self) -> list:
        """The events ready to publish."""
        if self._pending is None:
            return []
        events = self._pending.pop_complete()
        if not self._pending.has_events():
            self._pending = None
        return events

    def clear(self) -> None:
        self._pending = None


def group_spec_details(kv_cache_config: Any) -> list:
    """Per KV-cache group, vLLM's ``(kv_cache_spec_kind, sliding window)`` for its events."""
    from vllm.v1.kv_cache_interface import (
        get_kv_cache_spec_kind,
        get_kv_cache_spec_sliding_window,
    )

    details = []
    for group in getattr(kv_cache_config, "kv_cache_groups", None) or ():
        spec = group.kv_cache_spec
        try:
            details.append(
                (get_kv_cache_spec_kind(spec).value, get_kv_cache_spec_sliding_window(spec))
            )
        except Exception:  # a spec vLLM's helpers do not classify: leave it unspecified
            details.append((None, None))
    return details


def pool_events(
    records: Iterable[tuple],
    medium: str,
    group_details: Sequence[tuple] = (),
) -> list:
    """vLLM event objects for the worker's records (``Worker.take_pool_events``), each
    distinct event once."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    def spec(group: int) -> tuple:
        return group_details[group] if group < len(group_details) else (None, None)

    events: dict = {}
    cleared = []
    for kind, group, block_hash, parent, token_ids, block_size, lora_name in records:
        event: Optional[KVCacheEvent]
        if kind == "stored":
            spec_kind, window = spec(group)
            event = BlockStored(
                block_hashes=[maybe_convert_block_hash(block_hash)],
                parent_block_hash=(
                    maybe_convert_block_hash(parent) if parent is not None else None
                ),
                token_ids=list(token_ids),
                block_size=block_size,
                lora_id=None,
                medium=medium,
                lora_name=lora_name,
                group_idx=group,
                kv_cache_spec_kind=spec_kind,
                kv_cache_spec_sliding_window=window,
            )
        elif kind == "removed":
            event = BlockRemoved(
                block_hashes=[maybe_convert_block_hash(block_hash)],
                medium=medium,
                group_idx=group,
            )
        elif kind == "cleared":
            cleared = [AllBlocksCleared()]
            continue
        else:
            raise ValueError(f"unknown kvpool pool event {kind!r}")
        # One rank reports a block once per step, however many requests saved it: a repeat
        # would count as another rank's share.
        events.setdefault(event, None)
    return cleared + list(events)
