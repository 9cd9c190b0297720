"""kvpool: a KV-cache pool for LLM inference.

``kvpool.Pool`` stores and loads blocks from scripts; ``kvpool.vllm.KvPoolConnector`` is the
vLLM KV connector (``"kv_connector": "KvPoolConnector", "kv_connector_module_path":
"kvpool.vllm"``). Importing this package imports neither torch nor vLLM.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping, Optional, Union

from kvpool import _native
from kvpool._native import (
    KvPoolError,
    backends,
    block_key,
    metrics_text,
    token_hashes,
    vllm_hashes,
)

__version__ = _native.__version__

__all__ = [
    "KvPoolError",
    "Pool",
    "backends",
    "block_key",
    "load_config",
    "metrics_text",
    "token_hashes",
    "vllm_hashes",
]

ConfigLike = Union[None, str, Mapping[str, Any]]


def _config_json(config: ConfigLike) -> Optional[str]:
    if config is None or isinstance(config, str):
        return config
    return json.dumps(dict(config))


def load_config(config: ConfigLike = None, *, use_env: bool = True) -> dict:
    """The effective configuration (defaults, ``KVPOOL_*``, ``MOONCAKE_CONFIG_PATH``, then
    ``config``) as a dict; raises ``KvPoolError`` naming any bad key."""
    return json.loads(_native.load_config(_config_json(config), use_env))


class Pool:
    """The configured backend, for scripts: ``Pool({"backend": "redis", "redis": {...}})``.

    Keys are vllm-ascend string keys (see ``block_key``). Values are bytes or any object
    with the buffer protocol.
    """

    def __init__(self, config: ConfigLike = None, *, use_env: bool = True) -> None:
        self._native = _native.Pool(_config_json(config), use_env)

    def info(self) -> dict:
        """Backend scheme, description and capabilities."""
        return json.loads(self._native.info())

    def put(self, key: str, data: Union[bytes, bytearray, memoryview]) -> str:
        """Stores ``data``; returns ``"stored"``, or ``"exists"`` when the key was present
        (the first value is kept)."""
        return self._native.put(key, bytes(data))

    def get(self, key: str) -> Optional[bytes]:
        """The value, or None on a miss."""
        return self._native.get(key)

    def exists(self, keys: Iterable[str]) -> list:
        """One bool per key, in order."""
        return self._native.exists(list(keys))

    def remove(self, keys: Iterable[str]) -> None:
        """Removes the keys; absent keys are fine."""
        self._native.remove(list(keys))

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
