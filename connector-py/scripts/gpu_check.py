#!/usr/bin/env python3
"""kvpool's device path on a CUDA GPU: correctness, then speed against torch, in one run.

    python3 connector-py/scripts/gpu_check.py [--out DIR] [--quick]

Needs torch with CUDA and the kvpool wheel (``pip install ./connector-py``); no vLLM. It
prints every figure and writes them, with the log, to ``DIR/gpu_check.json`` and
``DIR/gpu_check.log``. Exit status 0 only if every correctness check passed.

Checks, per vLLM 0.33 physical KV layout (one int8 allocation viewed per layer as
``[blocks, heads, tokens, 2 * head_size]`` bf16, strides as vLLM's allocator makes them):

1. a save issued while the forward that writes the blocks is still queued (a long
   ``torch.cuda._sleep`` then the writes, on the current stream) stores the forward's bytes;
2. the blocks, wiped, load back byte-identical into other block ids (sync and async handles);
3. a missing key is reported as that block's failure;
4. the same on a non-default stream (what vLLM uses) and on the default stream;
5. the redis backend too, when ``redis-server`` is on PATH;
6. layerwise (``use_layerwise``), driven as vLLM's attention hooks drive it: each layer's
   save is issued while the forward's writes to it are still queued and stores them; each
   layer's load is in place when its ``wait_for_layer_load`` returns; a missing block fails;
   a step that both loads and saves (the two copy streams at once) gets both right.

Speed, for a 64-block x 32-layer step (Llama-3.1-8B-like pages, 64 KiB per layer and block):
kvpool save (device -> staging, fenced) and load against torch's own gather into pinned
memory (``index_select`` + non-blocking copy) and its reverse, and the save through the memory
backend against one large contiguous pinned copy (the link's limit). Ratios are of medians
measured in this run, on this card.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import kvpool
from kvpool import _native
from kvpool.device import KvCachePool, current_stream, describe_kv_caches

# Logical [L, B, H, N, C] in each layout's physical order, outermost first.
LAYOUTS = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}

LOG: list = []
# `--cpu` runs the correctness checks on CPU tensors (no streams, no timing): a dry run of
# this script's own logic on a machine without a GPU.
DEVICE = "cuda"


def say(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def cache(layout: str, L: int, B: int, H: int, N: int, D: int, device) -> tuple:
    """One int8 allocation and per-layer [B, H, N, 2D] bf16 views in `layout`'s order."""
    dims = (L, B, H, N, 2 * D)
    perm = LAYOUTS[layout]
    strides = [0] * 5
    acc = 1
    for d in reversed(perm):
        strides[d] = acc
        acc *= dims[d]
    raw = torch.empty(acc * 2, dtype=torch.int8, device=device)
    flat = raw.view(torch.bfloat16)
    views = {
        f"layers.{l}": flat.as_strided((B, H, N, 2 * D), tuple(strides[1:]), l * strides[0])
        for l in range(L)
    }
    return raw, views


def logical(views: dict, block: int) -> list:
    return [v[block].clone() for v in views.values()]


def config(backend: str, url: str | None, staging: int, port: int) -> dict:
    c = {"backend": backend, "lookup_rpc_port": port, "device_staging_bytes": staging}
    if DEVICE == "cpu":
        c["stage_host_kv"] = True  # the dry run takes the staged path device KV takes
    if backend == "memory":
        c["memory"] = {"capacity": "8GiB"}
    else:
        c["redis"] = {"url": url}
    return c


def correctness(layout: str, backend: str, url: str | None, stream_kind: str, port: int) -> bool:
    L, B, H, N, D = 4, 64, 4, 16, 64
    dev = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
    raw, views = cache(layout, L, B, H, N, D, dev)
    raw.random_(-128, 127)
    if DEVICE == "cuda":
        stream = torch.cuda.Stream() if stream_kind == "side" else torch.cuda.default_stream()
        on_stream = torch.cuda.stream(stream)
    else:
        on_stream = contextlib.nullcontext()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    ok = True
    with on_stream:
        pool = KvCachePool(views, config(backend, url, 16 << 20, port), num_blocks=B,
                           model=f"gpu-check-{layout}")
        S = [3, 7, 8, 20]
        keys = [pool.key(os.urandom(32)) for _ in S]
        new = {b: [torch.randn(H, N, 2 * D, device=dev).to(torch.bfloat16) for _ in range(L)]
               for b in S}
        # The forward: still queued behind a long sleep when the save is issued.
        if DEVICE == "cuda":
            torch.cuda._sleep(200_000_000)
        for b in S:
            for v, x in zip(views.values(), new[b]):
                v[b].copy_(x)
        saved = pool.save(S, keys)
        failed = saved.wait(60)
        if failed != []:
            say(f"  FAIL save: {failed}")
            ok = False
        sync()
        dst = [40, 41, 42, 43]
        for v in views.values():
            v[dst] = 0
        missing = pool.key(os.urandom(32))
        loaded = pool.load(dst, keys[:3] + [missing])
        got = loaded.wait(60)
        if got != [43]:
            say(f"  FAIL load failures {got}, expected [43]")
            ok = False
        sync()
        for s, d in zip(S[:3], dst[:3]):
            for l, (x, y) in enumerate(zip(new[s], logical(views, d))):
                if not torch.equal(x, y):
                    say(f"  FAIL block {s}->{d} layer {l}: bytes differ")
                    ok = False
        pool.close()
    say(f"  {layout:6} {backend:6} {stream_kind:7} stream: {'ok' if ok else 'FAILED'}")
    return ok


def layerwise(layout: str, port: int) -> bool:
    L, B, H, N, D = 4, 64, 4, 16, 64
    dev = torch.device(DEVICE, 0) if DEVICE == "cuda" else torch.device("cpu")
    raw, views = cache(layout, L, B, H, N, D, dev)
    raw.random_(-128, 127)
    cfg = {**config("memory", None, 16 << 20, port), "use_layerwise": True}
    engine = {"model": f"gpu-check-lw-{layout}", "block_size": N, "tp_size": 1, "tp_rank": 0,
              "pp_size": 1, "pp_rank": 0, "dp_rank": 0, "num_kv_heads": H, "use_mla": False,
              "role": "kv_both", "stage_layers": [L]}
    worker = _native.Worker(json.dumps(cfg), json.dumps(engine))
    worker.register_kv_caches(describe_kv_caches(views, B), views, [])
    stream = torch.cuda.Stream() if DEVICE == "cuda" else None
    on_stream = torch.cuda.stream(stream) if DEVICE == "cuda" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    S, dst = [3, 7, 8, 20], [40, 41, 42, 43]
    hashes = [os.urandom(32) for _ in S]
    new = {b: [torch.randn(H, N, 2 * D, device=dev).to(torch.bfloat16) for _ in range(L)]
           for b in S}

    def step(meta: dict, per_layer) -> None:
        worker.bind_connector_metadata(json.dumps({"preempted": [], **meta}).encode())
        worker.start_load_kv(current_stream(DEVICE))
        for l, name in enumerate(views):
            worker.wait_for_layer_load(name, current_stream(DEVICE))
            per_layer(l, name)
            worker.save_kv_layer(name, current_stream(DEVICE))
        worker.wait_for_save(current_stream(DEVICE))
        worker.clear_connector_metadata()

    ok = True
    with on_stream:
        def forward(l, name):
            # The layer's attention writes it; its save is issued while that is still queued.
            if DEVICE == "cuda":
                torch.cuda._sleep(50_000_000)
            for b in S:
                views[name][b].copy_(new[b][l])

        saves = [{"req_id": "s", "block_ids": S, "first_block": 0,
                  "hashes": "".join(h.hex() for h in hashes)}]
        step({"loads": [], "saves": saves}, forward)
        if not worker.wait_for_saves(60.0):
            say("  FAIL layerwise saves did not finish")
            ok = False
        sync()
        for v in views.values():
            v[dst] = 0
        sync()
        arrived = {}

        def check(l, name):
            sync()  # what the layer's attention would read now
            arrived[l] = all(torch.equal(views[name][d], new[s][l]) for s, d in zip(S[:3], dst[:3]))

        loads = [{"req_id": "l", "block_ids": dst, "is_async": False,
                  "hashes": "".join(h.hex() for h in hashes[:3]) + os.urandom(32).hex()}]
        step({"loads": loads, "saves": []}, check)
        failed = worker.get_block_ids_with_load_errors()
        if failed != [dst[3]]:
            say(f"  FAIL layerwise load failures {failed}, expected [{dst[3]}]")
            ok = False
        if not all(arrived.get(l, False) for l in range(L)):
            say(f"  FAIL layerwise: a layer was not in place at its wait: {arrived}")
            ok = False

        # A prefix hit prefilled past its end: one step loads some blocks and saves others,
        # each layer's save issued while its forward is still queued. Loads and saves copy on
        # streams of their own; both must land whole.
        T, dst2, back = [50, 51], [44, 45, 46], [60, 61]
        t_hashes = [os.urandom(32) for _ in T]
        newer = {b: [torch.randn(H, N, 2 * D, device=dev).to(torch.bfloat16) for _ in range(L)]
                 for b in T}
        arrived.clear()

        def mixed(l, name):
            sync()
            arrived[l] = all(torch.equal(views[name][d], new[s][l])
                             for s, d in zip(S[:3], dst2))
            if DEVICE == "cuda":
                torch.cuda._sleep(50_000_000)
            for b in T:
                views[name][b].copy_(newer[b][l])

        loads = [{"req_id": "m", "block_ids": dst2, "is_async": False,
                  "hashes": "".join(h.hex() for h in hashes[:3])}]
        saves = [{"req_id": "m", "block_ids": T, "first_block": 0,
                  "hashes": "".join(h.hex() for h in t_hashes)}]
        step({"loads": loads, "saves": saves}, mixed)
        if worker.get_block_ids_with_load_errors() or not worker.wait_for_saves(60.0):
            say("  FAIL layerwise load and save in one step: a load failed or saves hung")
            ok = False
        if not all(arrived.get(l, False) for l in range(L)):
            say(f"  FAIL layerwise load and save: a layer was not in place: {arrived}")
            ok = False
        loads = [{"req_id": "b", "block_ids": back, "is_async": False,
                  "hashes": "".join(h.hex() for h in t_hashes)}]
        step({"loads": loads, "saves": []}, lambda l, name: None)
        sync()
        saved = all(torch.equal(views[name][d], newer[t][l])
                    for l, name in enumerate(views) for t, d in zip(T, back))
        if worker.get_block_ids_with_load_errors() or not saved:
            say("  FAIL layerwise load and save: a save issued beside loads stored wrong bytes")
            ok = False
    worker.shutdown(30.0)
    say(f"  {layout:6} layerwise: {'ok' if ok else 'FAILED'}")
    return ok


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def speed(layout: str, quick: bool) -> dict:
    L, H, N, D = (8 if quick else 32), 8, 16, 128
    B, MOVE = 1024, 64
    dev = torch.device("cuda", 0)
    raw, views = cache(layout, L, B, H, N, D, dev)
    raw.random_(-128, 127)
    page = H * N * 2 * D * 2
    nbytes = L * MOVE * page
    ids = torch.arange(0, 2 * MOVE, 2, device=dev)
    host = torch.empty(L, MOVE, page, dtype=torch.int8, pin_memory=True)

    def torch_d2h():
        for l, v in enumerate(views.values()):
            src = v.index_select(0, ids).view(torch.int8).reshape(MOVE, page)
            host[l].copy_(src, non_blocking=True)

    def torch_h2d():
        for l, v in enumerate(views.values()):
            blk = host[l].to(dev, non_blocking=True).view(torch.bfloat16).view(MOVE, H, N, 2 * D)
            v.index_copy_(0, ids, blk)

    big_dev = torch.empty(nbytes, dtype=torch.int8, device=dev)
    big_host = torch.empty(nbytes, dtype=torch.int8, pin_memory=True)

    def link():
        big_host.copy_(big_dev, non_blocking=True)

    pool = KvCachePool(views, config("memory", None, 2 * MOVE * L * page, 39), num_blocks=B,
                       model=f"gpu-speed-{layout}")
    blocks = [int(i) for i in ids.tolist()]

    def kvpool_save():
        keys = [pool.key(os.urandom(32)) for _ in blocks]
        assert pool.save(blocks, keys).wait(120) == []
        kvpool_save.keys = keys

    def kvpool_load():
        assert pool.load([b + 1 for b in blocks], kvpool_save.keys).wait(120) == []

    reps = 3 if quick else 7
    for f in (torch_d2h, torch_h2d, link):
        timed(f, 1)
    kvpool_save()
    t_d2h = timed(torch_d2h, reps)
    t_h2d = timed(torch_h2d, reps)
    t_link = timed(link, reps)
    t_save = timed(kvpool_save, reps)
    t_load = timed(kvpool_load, reps)
    pool.close()
    gb = lambda t: nbytes / t / 1e9  # noqa: E731
    r = {
        "layout": layout,
        "bytes": nbytes,
        "torch_d2h_gbps": gb(t_d2h),
        "torch_h2d_gbps": gb(t_h2d),
        "link_gbps": gb(t_link),
        "kvpool_save_gbps": gb(t_save),
        "kvpool_load_gbps": gb(t_load),
    }
    r["save_vs_torch"] = t_d2h / t_save
    r["load_vs_torch"] = t_h2d / t_load
    r["save_vs_link"] = t_link / t_save
    say(
        f"  {layout}: {nbytes / 2**20:.0f} MiB; torch D2H {r['torch_d2h_gbps']:.1f} GB/s, "
        f"H2D {r['torch_h2d_gbps']:.1f}, link {r['link_gbps']:.1f}; kvpool save "
        f"{r['kvpool_save_gbps']:.1f} ({r['save_vs_torch']:.2f}x torch, "
        f"{r['save_vs_link']:.2f}x link), load {r['kvpool_load_gbps']:.1f} "
        f"({r['load_vs_torch']:.2f}x torch)"
    )
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--quick", action="store_true", help="fewer layers and repetitions")
    p.add_argument("--cpu", action="store_true",
                   help="dry run: the correctness checks on CPU tensors, no speed")
    args = p.parse_args()
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (--cpu for a dry run)", file=sys.stderr)
        return 2
    name = "cpu (dry run)" if args.cpu else torch.cuda.get_device_name(0)
    say(f"kvpool {kvpool.__version__}, torch {torch.__version__}, {name}")
    results: dict = {"device": name, "correct": {}, "speed": []}
    redis = None
    url = None
    if shutil.which("redis-server"):
        d = tempfile.mkdtemp()
        sock = os.path.join(d, "redis.sock")
        redis = subprocess.Popen(["redis-server", "--port", "0", "--unixsocket", sock,
                                  "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        url = f"unix://{sock}"
    else:
        say("redis-server not on PATH: the redis backend is not checked here")
    ok = True
    port = 40
    say("correctness:")
    for layout in LAYOUTS:
        for backend in ["memory"] + (["redis"] if url else []):
            for stream_kind in ("side", "default"):
                port += 1
                good = correctness(layout, backend, url, stream_kind, port)
                results["correct"][f"{layout}/{backend}/{stream_kind}"] = good
                ok &= good
        port += 1
        good = layerwise(layout, port)
        results["correct"][f"{layout}/layerwise"] = good
        ok &= good
    if not args.cpu:
        say("speed (64 blocks):")
        for layout in ("BLHNC", "LBHNC", "LBNHC"):
            results["speed"].append(speed(layout, args.quick))
    if redis:
        redis.terminate()
    results["all_correct"] = ok
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.log"), "w") as f:
        f.write("\n".join(LOG) + "\n")
    say("ALL CORRECT" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
