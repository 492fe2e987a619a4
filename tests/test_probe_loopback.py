"""`probe` against real UDP STUN responders on 127.0.0.1 / 127.0.0.2 (no NAT on loopback).

The responders are StunResponder behind a small select loop in a thread: real sockets,
real datagrams, nothing mocked. Traffic stays on 127.0.0.0/8.
"""

from __future__ import annotations

import ipaddress
import json
import select
import socket
import threading
import time
from typing import Iterator, Optional

import pytest

from nattool.diag.probe import SCHEMA, ProbeTarget, parse_target, probe
from nattool.protocol.endpoint import Endpoint
from nattool.protocol.nat_behaviour import Behaviour, NatType
from nattool.tracker.stun_responder import StunResponder

LO1 = ipaddress.ip_address("127.0.0.1")
LO2 = ipaddress.ip_address("127.0.0.2")


class LoopbackStun:
    """StunResponder on real sockets. ``ignore_change``: answer every request from the
    socket it arrived on (a server that claims RFC 5780 but ignores CHANGE-REQUEST).
    ``text_only``: an old tracker that answers only ``//nat``. ``drop_change``: silently
    drop every request carrying CHANGE-REQUEST (sends OTHER-ADDRESS, answers there)."""

    def __init__(self, alt: bool = True, ignore_change: bool = False, text_only: bool = False, drop_change: bool = False) -> None:
        self.ignore_change = ignore_change
        self.drop_change = drop_change
        self.text_only = text_only
        self.requests = 0
        for _ in range(50):
            socks: list[socket.socket] = []
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind((str(LO1), 0))
                p1 = s.getsockname()[1]
                primary = Endpoint(LO1, p1)
                if alt:
                    s2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s2)
                    s2.bind((str(LO1), 0))
                    p2 = s2.getsockname()[1]
                    self.responder = StunResponder(primary, alt_ip=LO2, alt_port=p2)
                else:
                    self.responder = StunResponder(primary)
                for ep in self.responder.local_endpoints()[len(socks):]:
                    s3 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    socks.append(s3)
                    s3.bind(ep.sockaddr())
            except OSError:
                for s in socks:
                    s.close()
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port pair on 127.0.0.1/127.0.0.2")
        self.socks = {ep: s for ep, s in zip(self.responder.local_endpoints(), socks)}
        self.primary = self.responder.primary
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        by_fd = {s.fileno(): (ep, s) for ep, s in self.socks.items()}
        while not self._stop.is_set():
            readable, _, _ = select.select([s for s in self.socks.values()], [], [], 0.05)
            for s in readable:
                local, _ = by_fd[s.fileno()]
                try:
                    data, addr = s.recvfrom(2048)
                except OSError:
                    continue
                self.requests += 1
                src = Endpoint.from_sockaddr(addr)
                if data.startswith(b"//nat"):
                    s.sendto(src.to_text().encode(), addr)
                    continue
                if self.text_only:
                    continue
                reply = self.responder.respond(data, src, local)
                if reply is None:
                    continue
                if self.drop_change and reply.send_from != local:
                    continue
                out = s if self.ignore_change else self.socks[reply.send_from]
                out.sendto(reply.data, reply.dest.sockaddr())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for s in self.socks.values():
            s.close()


@pytest.fixture
def servers() -> Iterator[list[LoopbackStun]]:
    made: list[LoopbackStun] = []
    yield made
    for srv in made:
        srv.close()


def stun_target(srv: LoopbackStun, kind: str = "stun") -> ProbeTarget:
    return ProbeTarget(f"{kind}:{srv.primary}", srv.primary, kind)


def _can_bind_127_0_0_2() -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.2", 0))
        return True
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not _can_bind_127_0_0_2(), reason="127.0.0.2 is not a local address here")


def test_open_internet_on_loopback(servers: list[LoopbackStun]) -> None:
    srv = LoopbackStun()
    servers.append(srv)
    t0 = time.monotonic()
    result = probe([stun_target(srv)], families=(4,), hairpin=True)
    elapsed = time.monotonic() - t0
    fam = result.primary
    assert fam is not None
    b = fam.behaviour
    assert b.udp == "ok"
    assert b.no_nat is True
    assert b.mapping == Behaviour.ENDPOINT_INDEPENDENT
    assert b.filtering == Behaviour.ENDPOINT_INDEPENDENT, b.filtering_reason
    assert b.nat_type == NatType.OPEN_INTERNET
    assert b.port_preservation is True and b.alg is False and b.cgnat is False
    assert b.hairpinning is True
    assert fam.servers[0].rfc5780 is True
    assert elapsed < 5, elapsed
    doc = result.to_json()
    json.dumps(doc)
    assert doc["schema"] == SCHEMA
    assert doc["nat_type"] == "open internet" and doc["udp"] == "ok"
    assert doc["mapping"] == "endpoint-independent" and doc["filtering"] == "endpoint-independent"
    assert doc["public_endpoint"].startswith("127.0.0.1:")
    server = doc["servers"][0]
    assert server["rfc5780"] is True and server["other_address"].startswith("127.0.0.2:")
    sent_to = {t["sent_to"] for t in server["transactions"]}
    assert str(srv.primary) in sent_to and server["other_address"] in sent_to
    change = [t for t in server["transactions"] if t["request"] == "binding change-ip change-port"]
    assert change and change[0]["reply_from"] == server["other_address"]


def test_server_without_rfc5780_never_yields_filtering(servers: list[LoopbackStun]) -> None:
    a, b = LoopbackStun(alt=False), LoopbackStun(alt=False)
    servers += [a, b]
    result = probe([stun_target(a), stun_target(b)], families=(4,))
    beh = result.primary.behaviour  # type: ignore[union-attr]
    assert beh.udp == "ok" and beh.no_nat is True
    assert beh.filtering is None
    assert "no proven RFC 5780 support" in beh.filtering_reason
    assert beh.nat_type == NatType.UNKNOWN
    assert result.to_json()["filtering"] is None


def _probe_alone(servers: list[LoopbackStun], server: LoopbackStun):  # type: ignore[no-untyped-def]
    """Probe over IPv4 with this one server; the IPv4 result."""
    servers.append(server)
    fam = probe([stun_target(server)], families=(4,)).primary
    assert fam is not None
    return fam


def test_server_that_ignores_change_request(servers: list[LoopbackStun]) -> None:
    fam = _probe_alone(servers, LoopbackStun(ignore_change=True))
    assert fam.behaviour.filtering is None, fam.behaviour.filtering_reason
    assert fam.servers[0].rfc5780 is False  # answers from P while claiming the alternate


def test_server_that_silently_drops_change_request(servers: list[LoopbackStun]) -> None:
    # The worst case: OTHER-ADDRESS is real and answers, but CHANGE-REQUEST is dropped, so
    # the filtering tests time out exactly as behind a port-restricted NAT. The control
    # test (alternate addresses contacted first) tells the two apart.
    fam = _probe_alone(servers, LoopbackStun(drop_change=True))
    assert fam.behaviour.filtering is None, fam.behaviour.filtering_reason
    assert "control" in fam.behaviour.filtering_reason
    assert fam.servers[0].rfc5780 is False
    assert fam.behaviour.nat_type == NatType.UNKNOWN
    assert fam.behaviour.mapping == Behaviour.ENDPOINT_INDEPENDENT


def test_old_tracker_is_used_for_mapping_only(servers: list[LoopbackStun]) -> None:
    old, new = LoopbackStun(alt=False, text_only=True), LoopbackStun()
    servers += [old, new]
    result = probe([stun_target(old, "tracker"), stun_target(new)], families=(4,))
    fam = result.primary
    assert fam is not None
    assert fam.servers[0].protocol == "//nat" and fam.servers[0].mapped is not None
    assert fam.servers[0].rfc5780 is False
    assert fam.behaviour.nat_type == NatType.OPEN_INTERNET


def test_udp_blocked_when_nothing_answers() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = Endpoint.from_sockaddr(s.getsockname())  # bound, never read: silence
        result = probe([ProbeTarget("dead", dead, "stun")], families=(4,), timeout=0.5)
    beh = result.primary.behaviour  # type: ignore[union-attr]
    assert beh.udp == "blocked" and beh.nat_type == NatType.UDP_BLOCKED
    assert beh.mapping is None and beh.filtering is None and beh.no_nat is None


def test_repeat_reports_consistency(servers: list[LoopbackStun]) -> None:
    srv = LoopbackStun()
    servers.append(srv)
    result = probe([stun_target(srv)], families=(4,), repeat=2)
    assert result.consistent() is True
    assert result.to_json()["repeat"]["runs"] == 2


def test_lifetime_ladder_on_loopback(servers: list[LoopbackStun]) -> None:
    srv = LoopbackStun()
    servers.append(srv)
    result = probe([stun_target(srv)], families=(4,), lifetime_max=2)
    life = result.primary.lifetime  # type: ignore[union-attr]
    assert life is not None and life["tested"] is True, life
    assert life["alive_after_s"] == [2] and life["below_s"] is None


def test_parse_target() -> None:
    [t] = parse_target("stun:127.0.0.1")
    assert t.kind == "stun" and t.endpoint.port == 3478
    [t] = parse_target("127.0.0.1")
    assert t.kind == "tracker" and t.endpoint.port == 43283
    both = parse_target("localhost:5000")
    assert {x.endpoint.ip.version for x in both} == {4, 6}


def _ipv6_loopback() -> Optional[bool]:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return None


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_plain_server() -> None:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.bind(("::1", 0))
    primary = Endpoint.from_sockaddr(sock.getsockname())
    responder = StunResponder(primary)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            r, _, _ = select.select([sock], [], [], 0.05)
            if r:
                data, addr = sock.recvfrom(2048)
                reply = responder.respond(data, Endpoint.from_sockaddr(addr), primary)
                if reply is not None:
                    sock.sendto(reply.data, reply.dest.sockaddr())

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        result = probe([ProbeTarget("v6", primary, "stun")], families=(4, 6))
    finally:
        stop.set()
        th.join(2)
        sock.close()
    fam = result.primary
    assert fam is not None and fam.family == "IPv6"
    assert fam.behaviour.no_nat is True and fam.behaviour.cgnat is None
    assert fam.behaviour.filtering is None


def _cli_app():  # type: ignore[no-untyped-def]
    import typer

    from nattool.cli.probe_cmd import probe as probe_cmd

    app = typer.Typer()
    app.command()(probe_cmd)

    @app.callback()
    def _main() -> None:
        pass

    return app


def test_cli_probe_json_and_human(servers: list[LoopbackStun], tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("NATTOOL_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("NATTOOL_TRACKERS", raising=False)
    srv = LoopbackStun()
    servers.append(srv)
    app = _cli_app()
    res = CliRunner().invoke(app, ["probe", f"stun:{srv.primary}", "-4", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["schema"] == SCHEMA and doc["nat_type"] == "open internet"
    assert set(doc["families"]) == {"IPv4"}
    res = CliRunner().invoke(app, ["probe", f"stun:{srv.primary}", "-4", "--hairpin"])
    assert res.exit_code == 0, res.output
    assert "open internet" in res.output and "direct connections will work" in res.output
    res = CliRunner().invoke(app, ["probe", f"stun:{srv.primary}", "-4", "-6"])
    assert res.exit_code == 2


def test_cli_probe_blocked_exit_code(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("NATTOOL_CONFIG", str(tmp_path / "empty.toml"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = Endpoint.from_sockaddr(s.getsockname())
        res = CliRunner().invoke(_cli_app(), ["probe", f"stun:{dead}", "--json", "--timeout", "0.3"])
    assert res.exit_code == 3, res.output
    assert json.loads(res.stdout)["udp"] == "blocked"
    assert res.stderr.startswith("nattool: error: no server answered the probe")
