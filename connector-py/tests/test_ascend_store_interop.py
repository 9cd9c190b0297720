"""A pool written by Ascend Store v0.23 (its key strings, written by the official Mooncake
client) is read by kvpool's connector under vLLM 0.33's real scheduler.

The keys are the reference's worked keys (example A of
``../shared/reference/ascend-store-current.md`` §1.7: Qwen2.5-7B-Instruct, TP 1, prompt
tokens 1000..1511, block size 128, sha256 hashes with PYTHONHASHSEED=0), spelled out here
literally, not derived by kvpool: if kvpool's keys drifted from Ascend Store's, nothing
would be found.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from harness import TINY_OPT, WorkerRig, make_request, make_scheduler, make_vllm_config
from servers import mooncake_master

OFFICIAL_CLIENT = (
    Path(__file__).resolve().parents[2] / "backends/mooncake/tests/python/official_client.py"
)
BLOCK = 128
TOKENS = list(range(1000, 1512))
HASHES = [
    "d5a79ef9201c8550d69ba6d8bc1781687dfd834d125ed42931c9a6ac32ce6353",
    "b7fb2cebac79839ef3139cae0b0f5bfcb342d5c2454f208e28b4f6856a2455ab",
    "415d24191b6e4c20df0458e6d7b26603adf7b3a947b106031422e065a74bf08e",
    "ab6de795cd3e5026424e6077ac5f58c408d154ce0ebe973582d726ac3cc42ad9",
]
PREFIX = (
    "Qwen2.5-7B-Instruct@pcp0@dcp0@head_or_tp_rank:0@pp_rank:0@group:0@cache_role:kv"
    "@cache_family:default@"
)


class OfficialClient:
    """The official Mooncake client in its own process: it owns the segment the values live
    in, so it stays up while kvpool reads them."""

    def __init__(self, master: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(OFFICIAL_CLIENT), master, str(64 << 20)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.call("") == "ready 0"

    def call(self, line: str) -> str:
        if line:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply, "the official client exited"
        return reply

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def block_value(rig: WorkerRig, block: int) -> bytes:
    """A block's value as Ascend Store stores it for vLLM's KV cache: per layer, the page in
    its logical order [heads, tokens, K | V]."""
    parts = []
    for name in rig.layer_names:
        k, v = rig.expected_block(name, TOKENS, block)  # [tokens, heads, head_size] each
        page = torch.cat([k, v], dim=-1).transpose(0, 1).contiguous()
        parts.append(page.view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def test_a_pool_written_with_ascend_store_keys_is_read_by_current_keys_only(
    rpc_base_path, tmp_path, monkeypatch
):
    # The key carries the model's last path component.
    model_dir = tmp_path / "Qwen2.5-7B-Instruct"
    shutil.copytree(TINY_OPT, model_dir)
    # vLLM seeds its first block hash from PYTHONHASHSEED when it is set (the worked keys').
    monkeypatch.setenv("PYTHONHASHSEED", "0")

    with mooncake_master() as master:
        mooncake = {
            "metadata_server": "P2PHANDSHAKE",
            "protocol": "tcp",
            "device_name": "",
            "master_server_address": master.address,
            "global_segment_size": 0,
            "local_buffer_size": "64MB",
        }

        def instance(port: str, extra: dict):
            cfg = make_vllm_config(
                "KvPoolConnector",
                "kvpool.vllm",
                # Ascend Store keys vLLM's own block hashes.
                {
                    "backend": "mooncake",
                    "hash_mode": "vllm",
                    "lookup_rpc_port": port,
                    "mooncake": mooncake,
                    **extra,
                },
                block_size=BLOCK,
                model_dir=model_dir,
                max_num_batched_tokens=1024,
            )
            sched = make_scheduler(cfg, num_blocks=16)
            return cfg, sched, WorkerRig(cfg, sched.kv_cache_config)

        cfg, sched, rig = instance("31", {})
        request = make_request("r", TOKENS + [7], vllm_config=cfg)
        assert [h.hex() for h in request.block_hashes] == HASHES, "not the worked inputs"

        official = OfficialClient(master.address)
        try:
            keys = ",".join(PREFIX + h for h in HASHES)
            values = ",".join(block_value(rig, i).hex() for i in range(4))
            assert official.call(f"putb {keys} {values}") == "ok 0"

            # kvpool (current keys, the default) finds all four blocks and loads them.
            sched.add_request(request)
            out = sched.schedule()
            (new,) = out.scheduled_new_reqs
            assert new.num_computed_tokens == 512
            rig.step(out)
            assert not rig.connector.get_block_ids_with_load_errors()
            for name in rig.layer_names:
                for i in range(4):
                    k, v = rig.read_block(name, new.block_ids[0][i])
                    ek, ev = rig.expected_block(name, TOKENS, i)
                    assert torch.equal(k, ek) and torch.equal(v, ev), f"{name} block {i}"
            rig.shutdown()

            # v0.18 keys name other objects: the same pool is a miss for them.
            cfg18, sched18, rig18 = instance("32", {"key_format": "v0.18"})
            sched18.add_request(make_request("r", TOKENS + [7], vllm_config=cfg18))
            out = sched18.schedule()
            (new,) = out.scheduled_new_reqs
            assert new.num_computed_tokens == 0
            rig18.step(out)
            rig18.shutdown()
        finally:
            official.close()
