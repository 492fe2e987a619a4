"""Shared fixtures: real `nattool serve` processes and plain UDP sockets on loopback.

Loopback source addresses stand for different public IPs: 127.0.0.2, 127.0.0.3 …
(Linux routes all of 127.0.0.0/8 to `lo`, so a socket may bind any of them).
Nothing here sends to anything but loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest

# The lanes (pytest-xdist groups) and the NAT lab's fixtures (network namespaces + nftables).
pytest_plugins = ["tests.lanes", "tests.natlab.fixtures", "tests.natlab.background"]

REPO = Path(__file__).resolve().parents[1]

# Tests press Ctrl-C in the command-line tools they start (pexpect's sendintr) and
# expect exit status 130. A test run started in the background by a non-interactive
# shell (`cmd &`, as some CI runners do) has SIGINT ignored, and an ignored signal
# stays ignored in every child: the tools would never see the Ctrl-C. A handled
# signal goes back to its default in a child, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

BANNER_PREFIX = "tracker listening on udp"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


# -- environment of the child processes ----------------------------------------------


def nattool_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment for a `nattool` child: the repo importable, no colours, and
    nothing of the developer's own configuration (HOME, NATTOOL_*) leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATTOOL_")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("FORCE_COLOR", None)
    if home is not None:
        env["HOME"] = str(home)
        env["XDG_CONFIG_HOME"] = str(home / ".config")
        env["XDG_STATE_HOME"] = str(home / ".local" / "state")
        env["XDG_CACHE_HOME"] = str(home / ".cache")  # the lifetime cache (--keepalive auto)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def nattool_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty HOME for every `nattool` child of the session."""
    return tmp_path_factory.mktemp("home")


def nattool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nattool", *args]


# -- sockets -----------------------------------------------------------------------------


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port that was free a moment ago on ``host`` (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_tcp_port(host: str = "127.0.0.1") -> int:
    """A port number free a moment ago on ``host`` for both UDP and TCP: a tracker with
    TCP on listens on both (an outgoing TCP connection of another test may hold the
    number of a free UDP port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as tcp, socket.socket(family, socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for ``--metrics``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


Dest = tuple[str, int]


def _dest(dest: object) -> Dest:
    if isinstance(dest, tuple):
        return (str(dest[0]), int(dest[1]))
    return (str(dest.host), int(dest.port))  # type: ignore[attr-defined]


def udp_socket(src_ip: str = "127.0.0.2", src_port: int = 0, timeout: float = 1.0) -> socket.socket:
    """A plain UDP socket bound to a chosen loopback source (a stand-in public IP)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # No SO_REUSEADDR: on Linux two UDP sockets that both set it may be given the
    # same ephemeral port, and replies then go to the wrong one. UDP has no TIME_WAIT,
    # so fixed ports are free again as soon as the socket is closed.
    sock.bind((src_ip, src_port))
    sock.settimeout(timeout)
    return sock


def recv_from(sock: socket.socket, dest: object, timeout: float = 1.0) -> bytes | None:
    """The next datagram from ``dest`` within ``timeout`` (others are skipped), or None."""
    want = _dest(dest)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65535)
        except (socket.timeout, ConnectionRefusedError):
            return None
        if (addr[0], addr[1]) == want:
            return data


def udp_ask(
    payload: bytes,
    dest: object,
    src_ip: str = "127.0.0.2",
    src_port: int = 0,
    timeout: float = 1.0,
) -> bytes | None:
    """Send one datagram from ``src_ip:src_port`` and return the reply from ``dest``
    (``b""`` for an empty datagram), or None when nothing came within ``timeout``."""
    with udp_socket(src_ip, src_port) as sock:
        sock.sendto(payload, _dest(dest))
        return recv_from(sock, dest, timeout)


def ask_on(sock: socket.socket, payload: bytes, dest: object, timeout: float = 1.0) -> bytes | None:
    """Like udp_ask, on a socket the caller keeps (its source port stays the same)."""
    sock.sendto(payload, _dest(dest))
    return recv_from(sock, dest, timeout)


# -- a real tracker process ----------------------------------------------------------------


@dataclass
class TrackerProcess:
    """A running `nattool serve` child."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    args: tuple[str, ...]
    stdout_path: Path
    stderr_path: Path
    banner: str = ""
    returncode: int | None = field(default=None)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def addr(self) -> Dest:
        return (self.host, self.port)

    def ask(self, payload: bytes, src_ip: str = "127.0.0.2", src_port: int = 0, timeout: float = 1.0) -> bytes | None:
        return udp_ask(payload, self.addr, src_ip=src_ip, src_port=src_port, timeout=timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then SIGKILL if it does not exit within ``timeout``. Returns the exit code
        (negative: killed by that signal)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.returncode = self.proc.returncode
        return self.returncode

    def assert_clean(self) -> None:
        err = self.stderr()
        assert "Traceback" not in err, f"tracker {self.endpoint} logged a traceback:\n{err[-4000:]}"
        assert self.returncode == 0, f"tracker {self.endpoint} exited {self.returncode}:\n{err[-4000:]}"


def start_tracker(
    *extra: str,
    workdir: Path,
    home: Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    store: str | None = "memory",
    rate_limit: str | None = "0",
    timeout: float = START_TIMEOUT,
) -> TrackerProcess:
    """Start `nattool serve` on ``host`` and a free port and wait for its banner.

    ``store``/``rate_limit`` are added as flags unless None (then the server's defaults
    apply); ``extra`` flags come last, so they may override nothing silently.
    """
    port = free_udp_tcp_port(host) if port is None else port
    args = ["serve", "--host", host, "--port", str(port)]
    if store is not None:
        args += ["--store", store]
    if rate_limit is not None:
        args += ["--rate-limit", rate_limit]
    args += list(extra)
    workdir.mkdir(parents=True, exist_ok=True)
    tag = f"serve-{port}-{time.monotonic_ns()}"
    out_path, err_path = workdir / f"{tag}.out", workdir / f"{tag}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            nattool_cmd(*args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=nattool_env(home),
            cwd=str(workdir),
        )
    tp = TrackerProcess(host, port, proc, tuple(args), out_path, err_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = out_path.read_text(errors="replace")
        if BANNER_PREFIX in text and "\n" in text:
            tp.banner = text.splitlines()[0]
            return tp
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    tp.stop()
    raise AssertionError(
        f"nattool serve {' '.join(args)} did not print its banner within {timeout:g}s "
        f"(exit {proc.returncode}):\nstdout: {tp.stdout()}\nstderr: {tp.stderr()[-4000:]}"
    )


TrackerFactory = Callable[..., TrackerProcess]


@pytest.fixture
def tracker(tmp_path: Path, nattool_home: Path) -> Iterator[TrackerFactory]:
    """A factory: ``tracker("--ttl", "1")`` starts a tracker (memory store, no rate limit
    unless ``store=``/``rate_limit=`` say otherwise) and stops it at teardown, asserting
    a clean exit (0) and a log without tracebacks."""
    started: list[TrackerProcess] = []

    def start(*extra: str, **kwargs: object) -> TrackerProcess:
        tp = start_tracker(*extra, workdir=tmp_path / "trackers", home=nattool_home, **kwargs)  # type: ignore[arg-type]
        started.append(tp)
        return tp

    yield start
    for tp in started:
        tp.stop()
    for tp in started:
        tp.assert_clean()


@pytest.fixture(scope="module")
def shared_tracker(tmp_path_factory: pytest.TempPathFactory, nattool_home: Path) -> Iterator[TrackerProcess]:
    """One long-lived tracker (memory store, no rate limit) for a whole module: tests
    that share it use their own group names."""
    tp = start_tracker(workdir=tmp_path_factory.mktemp("shared-tracker"), home=nattool_home)
    yield tp
    tp.stop()
    tp.assert_clean()


def run_nattool(
    *args: str, home: Path | None = None, timeout: float = 30.0, env: dict[str, str] | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short-lived `nattool` command to completion (stdout/stderr captured, piped:
    so never a terminal)."""
    return subprocess.run(
        nattool_cmd(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else nattool_env(home),
        input=input,
    )


def lines(data: bytes | None) -> list[str]:
    assert data is not None, "no reply"
    return data.decode("ascii").split("\n")


__all__: Sequence[str] = (
    "REPO",
    "TrackerProcess",
    "ask_on",
    "free_udp_port",
    "lines",
    "nattool_cmd",
    "nattool_env",
    "recv_from",
    "run_nattool",
    "start_tracker",
    "udp_ask",
    "udp_socket",
)


@pytest.fixture
def redisd(tmp_path: Path) -> Iterator[object]:
    """A throw-away redis-server on a free loopback port, no persistence (the modules
    that use it skip themselves where redis-server is not installed)."""
    from redis_server import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
