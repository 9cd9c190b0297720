"""kvpool's log lines reach the process's stderr (where vLLM's own log goes), filtered by
`KVPOOL_LOG`. Each case runs in a fresh interpreter: the filter is read once, when
`kvpool._native` is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# An Ascend Store option kvpool ignores, with a warning naming it.
CONFIG = json.dumps({"backend": "memory", "register_buffer": True})
IGNORED = "Ascend Store option `register_buffer` is not supported by kvpool and is ignored"


def _load_config(kvpool_log: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVPOOL")}
    if kvpool_log is not None:
        env["KVPOOL_LOG"] = kvpool_log
    code = (
        "import json, sys, kvpool._native as n;"
        "c = json.loads(n.load_config(sys.argv[1], use_env=False));"
        "print(c['backend'])"
    )
    return subprocess.run(
        [sys.executable, "-c", code, CONFIG],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_warnings_reach_stderr_by_default():
    out = _load_config(None)
    assert out.stdout.strip() == "memory"
    assert IGNORED in out.stderr
    assert "WARN" in out.stderr
    assert "\x1b[" not in out.stderr, "no colour codes when stderr is not a terminal"


def test_kvpool_log_filters_them():
    out = _load_config("error")
    assert out.stdout.strip() == "memory"
    assert IGNORED not in out.stderr
    assert out.stderr == ""


def test_an_invalid_filter_is_reported_and_the_default_applies():
    out = _load_config("kvpool=loud")
    assert out.stdout.strip() == "memory"
    assert 'KVPOOL_LOG="kvpool=loud" is not a valid log filter' in out.stderr
    assert IGNORED in out.stderr
