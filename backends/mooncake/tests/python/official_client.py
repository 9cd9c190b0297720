#!/usr/bin/env python3
"""Drives the official Mooncake client (mooncake.store.MooncakeDistributedStore,
PyPI mooncake-transfer-engine-non-cuda==0.3.13.post1) line by line over stdin,
for kvpool's interop tests.

Usage: official_client.py MASTER_ADDR SEGMENT_BYTES
Commands (one reply line each, "ok ..." or "err ..."):
  put KEY HEX            put one value                   -> ok RC
  putb K1,K2 H1,H2       put_batch                       -> ok RC
  get KEY                get (empty value = missing)     -> ok HEX | ok -
  getb K1,K2             get_batch                       -> ok H1,H2 (- for missing)
  exist KEY              is_exist                        -> ok 1 | ok 0
  remove KEY             remove                          -> ok RC
  close                  close and exit                  -> ok RC
"""
import sys

from mooncake.store import MooncakeDistributedStore


def main():
    master, segment = sys.argv[1], int(sys.argv[2])
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", "P2PHANDSHAKE", segment, 16 << 20, "tcp", "", master)
    print(f"ready {rc}", flush=True)
    for line in sys.stdin:
        p = line.split()
        if not p:
            continue
        cmd, args = p[0], p[1:]
        try:
            if cmd == "put":
                out = store.put(args[0], bytes.fromhex(args[1]))
            elif cmd == "putb":
                keys = args[0].split(",")
                values = [bytes.fromhex(h) for h in args[1].split(",")]
                out = store.put_batch(keys, values)
            elif cmd == "get":
                v = store.get(args[0])
                out = v.hex() if v else "-"
            elif cmd == "getb":
                vs = store.get_batch(args[0].split(","))
                out = ",".join(v.hex() if v else "-" for v in vs)
            elif cmd == "exist":
                out = int(store.is_exist(args[0]) == 1)
            elif cmd == "remove":
                out = store.remove(args[0])
            elif cmd == "close":
                print(f"ok {store.close()}", flush=True)
                return
            else:
                out = None
                print(f"err unknown command {cmd}", flush=True)
                continue
            print(f"ok {out}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported to the test
            print(f"err {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
