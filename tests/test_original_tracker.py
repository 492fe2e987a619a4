"""Compatibility with the original Go NatTrackerServer, both ways.

1. Our client against a tracker that speaks only the original wire format, built here
   from PROTOCOL.md's description of it (its replies and its silences).
2. An unmodified original client's exact datagrams against our `nattool serve`.
"""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from conftest import TrackerProcess, ask_on, run_nattool, udp_socket

REG = "//51pwn/P2P&E2E/"
OTHER_TRACKER = "tracker.example.org:43283"  # only listed, never contacted


class OriginalTracker:
    """The original server as PROTOCOL.md describes it.

    - ``//nat``: the observed endpoint.
    - the original client's 3-field registration: one line per member,
      ``<public ip:port>,<mac-ip field verbatim>``, the requester first, then the
      others newest first; with ``trailing_newline`` an empty last line.
    - ``//tcksvr`` (and announcements): its tracker list.
    - silence for the 4-field seed form, for unknown text and for anything over 64 KiB.
    """

    def __init__(self, host: str = "127.0.0.1", trailing_newline: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.host, self.port = self.sock.getsockname()[:2]
        self.trailing_newline = trailing_newline
        self.groups: dict[str, list[tuple[str, str]]] = {}  # group -> [(endpoint, macip)] oldest first
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.received.append(data)
            reply = self.answer(data, f"{addr[0]}:{addr[1]}")
            if reply is not None:
                self.sock.sendto(reply, addr)

    def answer(self, data: bytes, observed: str) -> bytes | None:
        if len(data) > 64 * 1024:
            return None
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            return None
        if text == "//nat":
            return observed.encode()
        if text == "//tcksvr" or text.startswith("//tcksvr/"):
            return "\n".join([self.endpoint, OTHER_TRACKER]).encode()
        if text.startswith(REG):
            fields = text[len(REG) :].split("/")
            if len(fields) != 3:
                return None  # the seed form (and anything else): no answer at all
            group, public, macip = fields
            endpoint = observed if public == "0" else public
            members = [m for m in self.groups.get(group, []) if m[0] != endpoint]
            members.append((endpoint, macip))
            self.groups[group] = members
            out = [f"{ep},{mi}" for ep, mi in reversed(members)]
            body = "\n".join(out)
            return (body + "\n" if self.trailing_newline else body).encode()
        return None


@pytest.fixture
def original() -> Iterator[OriginalTracker]:
    tracker = OriginalTracker()
    yield tracker
    tracker.close()


@pytest.fixture(params=[False, True], ids=["plain", "trailing-newline"])
def original_both(request: pytest.FixtureRequest) -> Iterator[OriginalTracker]:
    """Both shapes of its member lists: with and without an empty last line."""
    tracker = OriginalTracker(trailing_newline=request.param)
    yield tracker
    tracker.close()


def nattool_json(home: Path, *args: str) -> dict:  # type: ignore[type-arg]
    result = run_nattool(*args, "--json", home=home)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_the_fake_is_faithful(original: OriginalTracker) -> None:
    """The stand-in keeps the silences the description promises (else the fallback
    tests below would prove nothing)."""
    with udp_socket("127.0.0.3") as s:
        for silent in (f"{REG}g/0/192.168.0.56/77:5b:67:a5:87:66".encode(), b"hello", b"//x" + b"y" * 65400):
            s.sendto(silent, (original.host, original.port))
        # Handled in order: the first answer is the one to this //nat.
        assert ask_on(s, b"//nat", original) == f"127.0.0.3:{s.getsockname()[1]}".encode()


def test_whoami_against_an_original_tracker(original: OriginalTracker, nattool_home: Path) -> None:
    out = nattool_json(nattool_home, "whoami", original.endpoint, "--timeout", "2")
    assert out["endpoint"] and out["endpoint"].startswith("127.0.0.1:")
    assert [a["ok"] for a in out["answers"]] == [True]
    assert out["answers"][0]["tracker"] == original.endpoint


def test_register_falls_back_to_the_original_form(original_both: OriginalTracker, nattool_home: Path) -> None:
    original = original_both
    group = "5e1a7f0e-0b7e-4b0a-9d7b-c0ffee000001"
    # An unmodified original client is already in the group.
    with udp_socket("127.0.0.3") as peer:
        peer_ep = f"127.0.0.3:{peer.getsockname()[1]}"
        first = ask_on(peer, f"{REG}{group}/0/02:42:ac:11:00:02-192.168.1.10,10.0.0.5".encode(), original)
        assert first is not None and first.startswith(peer_ep.encode() + b",02:42:ac:11:00:02")

        out = nattool_json(
            nattool_home, "register", group, "-t", original.endpoint,
            "--lan", "192.168.1.50", "--id", "02:42:AC:11:00:99", "--timeout", "2",
        )
    assert out["group"] == group
    assert out["self"]["endpoint"].startswith("127.0.0.1:")
    assert out["self"]["lan"] == ["192.168.1.50"]
    assert out["members"] == [{"endpoint": peer_ep, "lan": ["192.168.1.10", "10.0.0.5"]}]
    [answer] = out["trackers"]
    assert answer["ok"] is True and answer["form"] == "original"
    text = json.dumps(out).lower()
    assert "02:42:ac" not in text and "02-42-ac" not in text, "a MAC leaked into the output"

    # What went on the wire: the seed form first (no answer), then the original
    # client's own form, bare (no newline, no padding), with the canonical MAC.
    regs = [d for d in original.received if d.startswith(REG.encode()) and group.encode() in d]
    assert regs[-1] == f"{REG}{group}/0/02:42:ac:11:00:99-192.168.1.50".encode()
    seed_tries = [d for d in regs if d.split(b"\n")[0].count(b"/") == 6]
    assert seed_tries, "the seed form was never tried first"
    assert all(b"\n" not in d for d in regs if d.split(b"\n")[0].count(b"/") == 5)


def test_register_human_output_against_an_original_tracker(original: OriginalTracker, nattool_home: Path) -> None:
    group = "orig-human"
    with udp_socket("127.0.0.3") as peer:
        peer_ep = f"127.0.0.3:{peer.getsockname()[1]}"
        assert ask_on(peer, f"{REG}{group}/0/0a:0b:0c:0d:0e:0f-10.1.2.3".encode(), (original.host, original.port))
        result = run_nattool("register", group, "-t", original.endpoint, "--lan", "0", "--id", "0", "--timeout", "2", home=nattool_home)
    assert result.returncode == 0, result.stderr
    assert peer_ep in result.stdout
    assert "0a:0b" not in result.stdout.lower()
    assert "\x1b[" not in result.stdout


def test_trackers_against_an_original_tracker(original: OriginalTracker, nattool_home: Path) -> None:
    out = nattool_json(nattool_home, "trackers", "-t", original.endpoint, "--timeout", "2")
    assert out["trackers"] == [original.endpoint, OTHER_TRACKER]
    [answer] = out["answers"]
    assert answer["ok"] is True and answer["knows"] == [original.endpoint, OTHER_TRACKER]


# -- the other way round: an original client against our server ---------------------------------


def test_original_client_datagrams_against_our_server(shared_tracker: TrackerProcess) -> None:
    group = "8b8f7a52-66a0-4b4c-9c1e-5a1d2c3b4a01"
    with udp_socket("127.0.0.2", 40001) as c1, udp_socket("127.0.0.2", 40002) as c2:
        assert ask_on(c1, b"//nat", shared_tracker) == b"127.0.0.2:40001"
        r1 = ask_on(c1, f"{REG}{group}/0/02:42:ac:11:00:02-192.168.1.10,10.0.0.5".encode(), shared_tracker)
        assert r1 == b"127.0.0.2:40001;192.168.1.10,10.0.0.5"
        r2 = ask_on(c2, f"{REG}{group}/0/02:42:ac:11:00:03-192.168.1.11".encode(), shared_tracker)
        assert r2 == b"127.0.0.2:40002;192.168.1.11\n127.0.0.2:40001;192.168.1.10,10.0.0.5"
        # Re-registration (every ~25 s in the original client): same reply, no duplicate.
        r1b = ask_on(c1, f"{REG}{group}/0/02:42:ac:11:00:02-192.168.1.10,10.0.0.5".encode(), shared_tracker)
        assert r1b == b"127.0.0.2:40001;192.168.1.10,10.0.0.5\n127.0.0.2:40002;192.168.1.11"
        assert ask_on(c1, b"//tcksvr", shared_tracker) == b""
        # The original tracker-to-tracker announcement: answered with the list; the
        # unverified endpoint is not in it.
        assert ask_on(c1, b"//tcksvr/127.0.0.2:40001", shared_tracker) == b""
