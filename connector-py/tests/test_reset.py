"""vLLM's prefix-cache reset (`reset_prefix_cache(reset_connector=True)`) through the real
scheduler: what belongs to the instance alone is cleared; a shared pool only with
`reset_clears_shared_pool`."""

from __future__ import annotations

import json

from servers import mooncake_master
from test_connector import Instance, prompt


def external_hit(inst, req_id, tokens):
    """What the connector offers a new request for `tokens` (the lookup only)."""
    request = inst.request(req_id, tokens)
    need, _ = inst.sched_connector.get_num_new_matched_tokens(request, 0)
    inst.sched_connector.request_finished_all_groups(request, ([],))
    return need


def test_reset_clears_an_instance_local_pool(rpc_base_path):
    inst = Instance({"backend": "memory", "lookup_rpc_port": "51"})
    tokens = prompt(64)
    inst.save_then_forget("r1", tokens)
    assert external_hit(inst, "probe-1", tokens) == 63
    assert inst.sched.reset_prefix_cache(reset_connector=True)
    assert external_hit(inst, "probe-2", tokens) == 0
    # The pool takes new blocks after the reset.
    inst.save_then_forget("r2", tokens)
    assert external_hit(inst, "probe-3", tokens) == 63
    inst.shutdown()


def test_reset_clears_a_shared_pool_only_when_configured(rpc_base_path, tmp_path, monkeypatch):
    with mooncake_master() as master:
        path = tmp_path / "mooncake.json"
        path.write_text(json.dumps({
            "metadata_server": "P2PHANDSHAKE",
            "protocol": "tcp",
            "device_name": "",
            "master_server_address": master.address,
            "global_segment_size": "128MB",
        }))
        monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
        owner = Instance({"backend": "mooncake", "lookup_rpc_port": "52"})
        tokens = prompt(64)
        owner.save_then_forget("r1", tokens)

        # Another instance's reset leaves the shared pool alone by default...
        polite = Instance({"backend": "mooncake", "lookup_rpc_port": "53"})
        assert polite.sched.reset_prefix_cache(reset_connector=True)
        assert external_hit(owner, "probe-1", tokens) == 63
        # ... and clears it for everyone with reset_clears_shared_pool.
        wiping = Instance({
            "backend": "mooncake",
            "lookup_rpc_port": "54",
            "reset_clears_shared_pool": "true",
        })
        assert wiping.sched.reset_prefix_cache(reset_connector=True)
        assert external_hit(owner, "probe-2", tokens) == 0
        assert external_hit(polite, "probe-3", tokens) == 0
        for inst in (wiping, polite, owner):
            inst.shutdown()
