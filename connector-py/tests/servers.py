"""Real servers for the connector tests, on loopback ports picked at run time.

A missing server binary is a test failure, never a skip: CI installs them.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server process; `url` for kvpool's redis backend."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not on PATH (Debian package redis-server)"
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _redis_ping(self.port):
            assert self.proc.poll() is None, "redis-server exited at start"
            assert time.monotonic() < deadline, "redis-server did not answer PING in 10 s"
            time.sleep(0.02)

    def command(self, *args: str) -> bytes:
        """One command through a raw RESP connection; returns the raw reply."""
        payload = f"*{len(args)}\r\n".encode()
        for a in args:
            payload += f"${len(a.encode())}\r\n{a}\r\n".encode()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(payload)
            return s.recv(65536)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir)
    try:
        yield server
    finally:
        server.stop()


class MooncakeMaster:
    """An unmodified mooncake_master (PyPI mooncake-transfer-engine-non-cuda) on loopback."""

    def __init__(self) -> None:
        binary = shutil.which("mooncake_master")
        assert binary, (
            "mooncake_master is not on PATH "
            "(pip install mooncake-transfer-engine-non-cuda==0.3.13.post1)"
        )
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [binary, f"--rpc_port={self.port}", "--rpc_address=127.0.0.1",
             f"--metrics_port={free_port()}", "--metrics_host=127.0.0.1",
             "--enable_http_metadata_server=false",
             f"--http_metadata_server_port={free_port()}",
             "--http_metadata_server_host=127.0.0.1", "--rpc_thread_num=4",
             "--default_kv_lease_ttl=11000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            assert self.proc.poll() is None, "mooncake_master exited at start"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mooncake_master did not listen in 20 s"
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def mooncake_master() -> Iterator[MooncakeMaster]:
    master = MooncakeMaster()
    try:
        yield master
    finally:
        master.stop()
