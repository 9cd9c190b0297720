#!/usr/bin/env python3
"""The official Mooncake client's side of kvpool's mooncake benchmark
(benches/benches/mooncake.rs), zero-copy batch API, same shapes as kvpool's.

Usage:
  official_bench.py owner MASTER SEGMENT_BYTES
      own a segment and serve it until stdin closes (prints "ready")
  official_bench.py bench MASTER SEGMENT_BYTES VALUE_SIZE BATCH SECONDS MAX_BYTES
      put, get and exists phases; prints one JSON line:
      {"put_gbps", "get_gbps", "exists_keys_per_s", "exists_call_us", ...}
"""
import ctypes
import json
import os
import sys
import time

from mooncake.store import MooncakeDistributedStore


def setup(master, segment):
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment, 64 << 20, "tcp", "", master)
    if rc != 0:
        raise SystemExit(f"setup failed: {rc}")
    return store


def owner(master, segment):
    store = setup(master, segment)
    print("ready", flush=True)
    sys.stdin.read()
    store.close()


def bench(master, segment, size, batch, seconds, max_bytes):
    store = setup(master, segment)
    total = size * batch
    buf = (ctypes.c_char * total)()
    base = ctypes.addressof(buf)
    ctypes.memmove(base, os.urandom(total), total)
    if store.register_buffer(base, total) != 0:
        raise SystemExit("register_buffer failed")
    ptrs = [base + i * size for i in range(batch)]
    sizes = [size] * batch
    run = os.urandom(4).hex()

    batches = []
    t0 = time.perf_counter()
    moved = 0
    while time.perf_counter() - t0 < seconds and moved + total <= max_bytes:
        keys = [f"official-{run}-{len(batches)}-{j}" for j in range(batch)]
        rcs = store.batch_put_from(keys, ptrs, sizes)
        if any(rc != 0 for rc in rcs):
            raise SystemExit(f"batch_put_from failed: {rcs[:4]}")
        batches.append(keys)
        moved += total
    put_s = time.perf_counter() - t0
    put_gbps = moved / put_s / 1e9

    t0 = time.perf_counter()
    got = 0
    i = 0
    while time.perf_counter() - t0 < seconds:
        keys = batches[i % len(batches)]
        rcs = store.batch_get_into(keys, ptrs, sizes)
        if any(rc != size for rc in rcs):
            raise SystemExit(f"batch_get_into failed: {rcs[:4]}")
        got += total
        i += 1
    get_s = time.perf_counter() - t0

    calls = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min(seconds, 1.0):
        store.batch_is_exist(batches[calls % len(batches)])
        calls += 1
    ex_s = time.perf_counter() - t0

    print(json.dumps({
        "put_gbps": put_gbps,
        "get_gbps": got / get_s / 1e9,
        "exists_keys_per_s": calls * batch / ex_s,
        "exists_call_us": ex_s / calls * 1e6,
        "put_batches": len(batches),
        "get_batches": i,
    }), flush=True)
    store.unregister_buffer(base)
    store.close()


if __name__ == "__main__":
    mode, master, segment = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "owner":
        owner(master, segment)
    else:
        bench(master, segment, int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]),
              int(sys.argv[7]))
