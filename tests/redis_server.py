"""Throw-away redis-servers on free loopback ports, for the store tests: a single
one, or a cluster."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or shutil.which("valkey-server")
REDIS_CLI = shutil.which("redis-cli") or shutil.which("valkey-cli")
SKIP_REASON = "redis-server is not installed (Debian: apt-get install redis-server)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """Started with no persistence, bound to 127.0.0.1 only; can be stopped and
    started again on the same port (the reconnect test)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more redis-server options

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None, SKIP_REASON
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
                "--protected-mode", "yes",
                *self.extra,
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(b"FLUSHALL\r\n")
            assert s.recv(16).startswith(b"+OK")


class RedisCluster:
    """A Redis Cluster of ``primaries`` primaries, each with ``replicas`` replicas,
    on free loopback ports: started with ``redis-server --cluster-enabled yes`` and
    joined by ``redis-cli --cluster create``. A short node timeout, so that a killed
    primary's replica takes over within a few seconds."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, workdir: Path, primaries: int = 3, replicas: int = 0) -> None:
        self.workdir = workdir
        self.primaries = primaries
        self.replicas = replicas
        self.nodes: list[RedisServer] = []

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        assert REDIS_CLI is not None, "redis-cli is not installed"
        try:
            for n in range(self.primaries * (1 + self.replicas)):
                node_dir = self.workdir / f"node{n}"
                node_dir.mkdir(exist_ok=True)
                node = RedisServer(node_dir, free_cluster_port())
                node.extra = [
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
                    # a replica's first sync at once, not after the default 5 s
                    "--repl-diskless-sync-delay", "0",
                ]  # fmt: skip
                node.start()
                self.nodes.append(node)
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, capture_output=True, timeout=30,
            )  # fmt: skip
            self.wait_ok()
            if self.replicas:
                self.wait_replicated()
        except BaseException:
            self.stop()
            raise

    def cli(self, node: RedisServer, *args: str) -> str:
        assert REDIS_CLI is not None
        out = subprocess.run(
            [REDIS_CLI, "-p", str(node.port), *args], capture_output=True, text=True, timeout=10
        )  # fmt: skip
        return out.stdout

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every running node says cluster_state:ok and knows all slots."""
        deadline = time.monotonic() + timeout
        while True:
            live = [n for n in self.nodes if n.proc is not None]
            if all("cluster_state:ok" in self.cli(n, "cluster", "info") for n in live):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.1)

    def wait_replicated(self, timeout: float = 20.0) -> None:
        """Until every running primary has its replicas online and at its offset:
        every write so far is on a replica."""
        deadline = time.monotonic() + timeout
        while True:
            done = True
            for port in self.primary_ports():
                info = dict(
                    line.split(":", 1) for line in self.cli(self.node_on(port), "info", "replication").split()
                    if ":" in line
                )  # fmt: skip
                replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
                offsets = [dict(f.split("=", 1) for f in r.split(",")) for r in replicas]
                if len(offsets) < self.replicas or any(
                    o.get("state") != "online" or o.get("offset") != info.get("master_repl_offset") for o in offsets
                ):
                    done = False
            if done:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the replicas did not catch up")
            time.sleep(0.05)

    def primary_ports(self) -> set[int]:
        """Ports of the running primaries, as a running node sees them."""
        live = [n for n in self.nodes if n.proc is not None]
        text = self.cli(live[0], "cluster", "nodes")
        ports = set()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 2 and "master" in fields[2] and "fail" not in fields[2]:
                ports.add(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        return ports

    def node_on(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
