"""Issue 3 acceptance, durability, with real processes: `nattool serve --store sqlite:`
is killed with SIGKILL in the middle of a registration load and restarted on the same
file; every registration whose reply had arrived (acknowledged) and whose TTL has not
passed is served again, and members whose TTL passed during the downtime are not.

How a reply is matched to its registration without one socket per request: each
registration names an explicit public endpoint ``<source ip>:<20000 + i>`` (the IP
must be the observed one, the port is free), and the first line of the reply is the
requester's own endpoint, so the port says which registration ``i`` was answered.
Loopback sources 127.0.4.x stand for different public IPs (and keep every source
under the groups-per-source cap). The keepalive test cannot do that: the server's
keepalive lane takes only the seed form (public ``0``, the source is the endpoint),
so there each identity has a socket of its own, bound to the port that names it.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import TrackerProcess, ask_on, free_tcp_port, lines, start_tracker, udp_ask, udp_socket
from test_metrics import scrape, value

REG = "//51pwn/P2P&E2E/"
PORT_BASE = 20000


# -- the load: plain non-blocking sockets, a window of outstanding requests ----------------


@dataclass(frozen=True, slots=True)
class Ident:
    i: int
    group: str
    src_ip: str

    @property
    def endpoint(self) -> str:
        return f"{self.src_ip}:{PORT_BASE + self.i}"

    @property
    def mac(self) -> str:
        return f"02:00:00:00:{self.i >> 8:02x}:{self.i & 0xFF:02x}"

    def request(self) -> bytes:
        return f"{REG}{self.group}/{self.endpoint}/0/{self.mac}".encode()


def identities(n: int, groups: int, sources: int, prefix: str, first: int = 0) -> list[Ident]:
    """``n`` identities spread over ``groups`` groups and ``sources`` source IPs
    (127.0.4.1 ..); identity ``i`` is in group ``i % groups``, from source ``i % sources``."""
    assert first + n < 65535 - PORT_BASE and sources < 250
    return [
        Ident(i, f"{prefix}-{i % groups:04d}", f"127.0.4.{i % sources + 1}")
        for i in range(first, first + n)
    ]


@dataclass
class LoadResult:
    sent: set[int] = field(default_factory=set)
    acked: set[int] = field(default_factory=set)
    errors: list[bytes] = field(default_factory=list)
    killed_at_acked: int | None = None


def run_load(
    tp: TrackerProcess,
    idents: list[Ident],
    window: int = 8,
    kill_after_acked: int | None = None,
    deadline_s: float = 15.0,
) -> LoadResult:
    """Send every registration once (no retries: a lost one is simply not
    acknowledged), at most ``window`` outstanding per source socket. With
    ``kill_after_acked``, SIGKILL the server as soon as that many are acknowledged,
    keep sending the rest for a moment, then drain what had already arrived."""
    result = LoadResult()
    by_ip: dict[str, list[Ident]] = {}
    for ident in idents:
        by_ip.setdefault(ident.src_ip, []).append(ident)
    sel = selectors.DefaultSelector()
    socks: dict[str, socket.socket] = {}
    todo: dict[str, list[Ident]] = {}
    outstanding: dict[str, int] = {}
    for ip, items in by_ip.items():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((ip, 0))
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        socks[ip], todo[ip], outstanding[ip] = s, list(reversed(items)), 0
        sel.register(s, selectors.EVENT_READ, ip)
    by_i = {ident.i: ident for ident in idents}
    killed_at: float | None = None
    last_progress = time.monotonic()
    end = time.monotonic() + deadline_s
    try:
        while time.monotonic() < end:
            for ip, s in socks.items():
                queue = todo[ip]
                while queue and outstanding[ip] < window:
                    ident = queue.pop()
                    try:
                        s.sendto(ident.request(), tp.addr)
                    except OSError:  # after the kill: port unreachable reported on send
                        continue
                    result.sent.add(ident.i)
                    outstanding[ip] += 1
            for key, _ in sel.select(timeout=0.05):
                s, ip = key.fileobj, key.data
                assert isinstance(s, socket.socket)
                while True:
                    try:
                        data, addr = s.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except ConnectionRefusedError:  # ICMP from the dead server
                        continue
                    if addr != tp.addr:
                        continue
                    outstanding[ip] = max(0, outstanding[ip] - 1)
                    last_progress = time.monotonic()
                    first = data.split(b"\n", 1)[0].decode("ascii", "replace")
                    if first.startswith("ERR"):
                        result.errors.append(data)
                        continue
                    host, _, port = first.rpartition(":")
                    i = int(port) - PORT_BASE
                    assert by_i[i].src_ip == host == ip, (first, ip)
                    result.acked.add(i)
            if kill_after_acked is not None and killed_at is None and len(result.acked) >= kill_after_acked:
                os.kill(tp.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                result.killed_at_acked = len(result.acked)
            if killed_at is not None and time.monotonic() - killed_at > 0.3:
                break  # replies that were on their way have arrived (loopback)
            if killed_at is None and not any(todo.values()):
                if not any(outstanding.values()) or time.monotonic() - last_progress > 1.0:
                    break
    finally:
        for s in socks.values():
            sel.unregister(s)
            s.close()
        sel.close()
    return result


# -- the keepalive load: one socket per identity, so its source port can change -----------

REBIND_PORT_BASE = 30000


def seed_request(ident: Ident) -> bytes:
    """The seed form with public ``0``: the server takes the source as the endpoint,
    the only form its keepalive lane answers (the explicit form above never does)."""
    return f"{REG}{ident.group}/0/0/{ident.mac}".encode()


def run_socket_per_identity_load(
    tp: TrackerProcess,
    idents: list[Ident],
    port_base: int,
    window: int = 48,
    kill_after_acked: int | None = None,
    before_kill: Callable[[], None] | None = None,
    reply_timeout_s: float = 1.0,
    deadline_s: float = 10.0,
) -> LoadResult:
    """Register each identity once (no retries) from its own socket bound to
    ``<src_ip>:<port_base + i>``, at most ``window`` sockets open at once (far from
    the fd limit). A reply on that socket can only be identity ``i``'s, and its
    first line must be that socket's own endpoint. With ``kill_after_acked``: once
    that many are acknowledged, ``before_kill()`` runs, then the server gets SIGKILL
    right after a fresh window of requests went out, so some are in flight; what
    had already arrived is drained for a moment, nothing more is sent."""
    result = LoadResult()
    sel = selectors.DefaultSelector()
    queue = list(reversed(idents))
    open_socks: dict[int, tuple[socket.socket, float]] = {}

    def close(i: int) -> None:
        s, _ = open_socks.pop(i)
        sel.unregister(s)
        s.close()

    kill_armed = False
    killed_at: float | None = None
    end = time.monotonic() + deadline_s
    try:
        while time.monotonic() < end:
            fresh = 0
            while killed_at is None and queue and len(open_socks) < window:
                ident = queue.pop()
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    s.bind((ident.src_ip, port_base + ident.i))
                    s.setblocking(False)
                    s.sendto(seed_request(ident), tp.addr)
                except OSError:
                    # A fixed port someone else holds: fail loudly rather than
                    # silently leave an identity out.
                    s.close()
                    raise
                result.sent.add(ident.i)
                sel.register(s, selectors.EVENT_READ, ident)
                open_socks[ident.i] = (s, time.monotonic())
                fresh += 1
            # Not while the window is still full of replies that came during
            # before_kill(): the kill is to find requests in flight.
            if kill_armed and killed_at is None and (fresh >= window // 2 or not queue):
                os.kill(tp.proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                result.killed_at_acked = len(result.acked)
            for key, _ in sel.select(timeout=0.05):
                s, ident = key.fileobj, key.data
                assert isinstance(s, socket.socket) and isinstance(ident, Ident)
                try:
                    data, addr = s.recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionRefusedError:  # ICMP from the dead server: no reply will come
                    close(ident.i)
                    continue
                if addr != tp.addr:
                    continue
                first = data.split(b"\n", 1)[0].decode("ascii", "replace")
                if first.startswith("ERR"):
                    result.errors.append(data)
                else:
                    assert first == f"{ident.src_ip}:{port_base + ident.i}", (first, ident)
                    result.acked.add(ident.i)
                close(ident.i)
            now = time.monotonic()
            for i in [i for i, (_, t) in open_socks.items() if now - t > reply_timeout_s]:
                close(i)  # lost, or never answered: unacknowledged
            if kill_after_acked is not None and not kill_armed and len(result.acked) >= kill_after_acked:
                if before_kill is not None:
                    before_kill()
                kill_armed = True
            if killed_at is not None and now - killed_at > 0.3:
                break  # replies that were on their way have arrived (loopback)
            if not queue and not open_socks and killed_at is None and not kill_armed:
                break
    finally:
        for i in list(open_socks):
            close(i)
        sel.close()
    return result


# -- reading a group back, through the paging extension ----------------------------------


def group_members(
    tp: TrackerProcess,
    group: str,
    probe_ip: str,
    pages: list[int] | None = None,
    rows_out: list[str] | None = None,
) -> set[str]:
    """Register a probe member in ``group`` (its own identity: the probe endpoint) and
    page through the list with ``offset=`` until no ``next=`` line comes back.
    Padding the request makes room for a 1200-byte reply (the 3x amplification rule).
    ``rows_out`` gets every listed endpoint as listed, duplicates included."""
    found: set[str] = set()
    offset = 0
    with udp_socket(probe_ip) as s:
        for _ in range(100):
            req = f"{REG}{group}/0/0/0\noffset={offset}\n".encode()
            req += b" " * (420 - len(req))
            reply = ask_on(s, req, tp, timeout=2.0)
            if pages is not None:
                pages.append(offset)
            rows = lines(reply)
            assert rows[0] == "%s:%d" % s.getsockname()[:2], rows
            nxt = None
            for row in rows[1:]:
                if row.startswith("next="):
                    nxt = int(row[5:])
                elif row:
                    found.add(row.split(";", 1)[0])
                    if rows_out is not None:
                        rows_out.append(row.split(";", 1)[0])
            if nxt is None:
                return found
            assert nxt > offset
            offset = nxt
    raise AssertionError(f"paging through {group} did not end")


def served(tp: TrackerProcess, idents: list[Ident], pages: list[int] | None = None) -> tuple[set[int], set[str]]:
    """Which of ``idents`` the server lists, and every endpoint it lists (probes excluded)."""
    groups = sorted({ident.group for ident in idents})
    listed: dict[str, set[str]] = {}
    for n, group in enumerate(groups):
        # 50 groups per probe IP: under the groups-per-source cap (64).
        listed[group] = group_members(tp, group, f"127.0.5.{n // 50 + 1}", pages)
    found = {ident.i for ident in idents if ident.endpoint in listed[ident.group]}
    everything = set().union(*listed.values()) if listed else set()
    return found, {e for e in everything if not e.startswith("127.0.5.")}


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_trackers(tmp_path: Path, nattool_home: Path) -> Iterator[list[TrackerProcess]]:
    """Trackers a test starts itself (some get SIGKILL, which the shared `tracker`
    fixture would report as an unclean exit); the ones still running at the end are
    stopped with SIGTERM and must exit cleanly."""
    started: list[TrackerProcess] = []
    yield started
    stop_cleanly(started)


def stop_cleanly(trackers: list[TrackerProcess]) -> None:
    """SIGTERM for the ones still running, which must exit cleanly; reap the killed ones."""
    for tp in trackers:
        if tp.alive():
            tp.stop()
            tp.assert_clean()
        else:
            tp.proc.wait(5)


def start_sqlite(
    started: list[TrackerProcess], db: Path, tmp_path: Path, home: Path, *extra: str, port: int | None = None
) -> TrackerProcess:
    tp = start_tracker(
        *extra, workdir=tmp_path / "trackers", home=home, store=f"sqlite:{db}", rate_limit="0", port=port
    )
    started.append(tp)
    assert f"store sqlite:{db}" in tp.banner, tp.banner
    return tp


def kill9(tp: TrackerProcess) -> None:
    if tp.alive():
        os.kill(tp.proc.pid, signal.SIGKILL)
    assert tp.proc.wait(5) == -signal.SIGKILL


# -- the tests -------------------------------------------------------------------------------


def test_kill_9_mid_load_loses_no_acknowledged_registration(
    sqlite_trackers: list[TrackerProcess], tmp_path: Path, nattool_home: Path
) -> None:
    db = tmp_path / "state" / "tracker.db"
    # 240 members a group (about 120 acknowledged at the kill): more than one
    # 1200-byte reply holds, so reading them
    # back needs the paging extension.
    idents = identities(6000, groups=25, sources=60, prefix="dur")
    tp = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", "600")
    load = run_load(tp, idents, window=8, kill_after_acked=3000)
    assert load.killed_at_acked is not None, f"the load finished before the kill: {len(load.acked)} acked"
    kill9(tp)
    assert not load.errors, load.errors[:3]
    sent, acked = len(load.sent), len(load.acked)
    # The kill really was mid-load: registrations were left unsent or unanswered.
    assert 3000 <= acked < len(idents), (sent, acked)

    again = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", "600", port=tp.port)
    pages: list[int] = []
    found, listed = served(again, idents, pages)
    assert len(pages) >= 2 * 25 and max(pages) > 0, "the lists were not long enough to need paging"
    lost = load.acked - found
    print(
        f"\ndurability: sent={sent} acknowledged={acked} found={len(found & load.acked)} "
        f"lost={len(lost)} unacknowledged-but-found={len(found - load.acked)} (of {sent - acked})"
    )
    assert not lost, f"{len(lost)} acknowledged registrations lost, e.g. {sorted(lost)[:10]}"
    # Nothing made up: whatever is listed was sent (a registration may be durable
    # although its reply never left: it was committed just before the kill).
    sent_endpoints = {ident.endpoint for ident in idents if ident.i in load.sent}
    assert listed <= sent_endpoints, sorted(listed - sent_endpoints)[:10]
    assert "Traceback" not in again.stderr()


def test_kill_9_mid_keepalives_loses_no_acknowledged_move(
    sqlite_trackers: list[TrackerProcess], tmp_path: Path, nattool_home: Path
) -> None:
    """The keepalive lane applies a re-registration to the index at once and holds its
    reply until the wake-up's commit_now(): a move to a new port, once acknowledged,
    must be in the file, whatever the kill interrupts."""
    db = tmp_path / "state" / "tracker.db"
    # 30 members a group (under the lane's 64), 5 groups a source (under the cap).
    idents = identities(1500, groups=50, sources=60, prefix="ka")
    mport = free_tcp_port()
    tp = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", "600", "--metrics", str(mport))

    phase1 = run_socket_per_identity_load(tp, idents, PORT_BASE)
    assert not phase1.errors, phase1.errors[:3]
    missing = sorted({ident.i for ident in idents} - phase1.acked)
    assert not missing, f"{len(missing)} first registrations unacknowledged, e.g. {missing[:10]}"
    # Newcomers never take the lane: any keepalive counted later is phase 2's.
    assert value(scrape(mport), "nattool_keepalives_total") == 0

    # Phase 2: the same identities from new ports of the same IPs (a NAT rebinding).
    kill_after = len(idents) // 3
    keepalives: list[float] = []
    phase2 = run_socket_per_identity_load(
        tp,
        idents,
        REBIND_PORT_BASE,
        kill_after_acked=kill_after,
        before_kill=lambda: keepalives.append(value(scrape(mport), "nattool_keepalives_total")),
    )
    assert phase2.killed_at_acked is not None, f"phase 2 finished before the kill: {len(phase2.acked)} acked"
    kill9(tp)
    assert not phase2.errors, phase2.errors[:3]
    assert keepalives and keepalives[0] > 0, f"no registration took the keepalive lane: {keepalives}"
    sent, acked = phase2.sent, phase2.acked
    # The kill really was mid-load: moves were left unsent or unanswered.
    assert kill_after <= len(acked) < len(idents), (len(sent), len(acked))

    again = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", "600", port=tp.port)
    rows: dict[str, list[str]] = {}
    for n, group in enumerate(sorted({ident.group for ident in idents})):
        rows[group] = []
        # 50 groups per probe IP: under the groups-per-source cap (64).
        group_members(again, group, f"127.0.5.{n // 50 + 1}", rows_out=rows[group])
        rows[group] = [e for e in rows[group] if not e.startswith("127.0.5.")]

    old_ep = {ident.i: ident.endpoint for ident in idents}
    new_ep = {ident.i: f"{ident.src_ip}:{REBIND_PORT_BASE + ident.i}" for ident in idents}
    where: dict[int, list[str]] = {}
    for ident in idents:
        listed = rows[ident.group]
        where[ident.i] = [e for e in listed if e in (old_ep[ident.i], new_ep[ident.i])]
    not_once = {i: eps for i, eps in where.items() if len(eps) != 1}
    moved = {i for i, eps in where.items() if eps == [new_ep[i]]}
    lost = acked - moved
    print(
        f"\nkeepalive durability: keepalives just before the kill={keepalives[0]:g} phase-2 sent={len(sent)} "
        f"acknowledged={len(acked)} moved-found={len(moved & acked)} lost={len(lost)} "
        f"unacknowledged-but-moved={len(moved - acked)} (of {len(sent) - len(acked)})"
    )
    assert not not_once, f"{len(not_once)} identities not listed exactly once, e.g. {sorted(not_once.items())[:5]}"
    assert not lost, f"{len(lost)} acknowledged moves lost, e.g. {[where[i] for i in sorted(lost)[:5]]}"
    # Nothing made up: a move that was never sent cannot be in the file.
    made_up = moved - sent
    assert not made_up, sorted(made_up)[:10]
    known = set(old_ep.values()) | set(new_ep.values())
    strangers = [e for listed in rows.values() for e in listed if e not in known]
    assert not strangers, strangers[:10]
    assert "Traceback" not in again.stderr()


def members_whose_ttl_passed_during_the_downtime_are_not_served(
    sqlite_trackers: list[TrackerProcess], tmp_path: Path, nattool_home: Path
) -> None:
    ttl = 6.0
    db = tmp_path / "state" / "tracker.db"
    old = identities(300, groups=30, sources=10, prefix="ttl")
    young = identities(300, groups=30, sources=10, prefix="ttl", first=1000)
    tp = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", f"{ttl:g}")
    t_old = time.time()
    load_old = run_load(tp, old)
    assert len(load_old.acked) == len(old), (len(load_old.sent), len(load_old.acked))
    time.sleep(max(0.0, t_old + ttl * 0.6 - time.time()))
    t_young = time.time()
    load_young = run_load(tp, young)
    assert len(load_young.acked) == len(young)
    kill9(tp)
    # Down until the old ones have passed their TTL (the young ones have not).
    time.sleep(max(0.0, t_old + ttl + 0.7 - time.time()))
    again = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, "--ttl", f"{ttl:g}", port=tp.port)
    found, listed = served(again, old + young)
    assert time.time() < t_young + ttl - 0.3, "the restart took too long for this test to mean anything"
    found_old = found & {ident.i for ident in old}
    found_young = found & {ident.i for ident in young}
    print(
        f"\nttl during downtime: old {len(old)} -> served {len(found_old)}, "
        f"young {len(young)} -> served {len(found_young)}"
    )
    assert not found_old, f"{len(found_old)} expired members served after the restart"
    assert found_young == {ident.i for ident in young}


def verified_trackers_survive_kill_9_until_they_expire(
    sqlite_trackers: list[TrackerProcess], tmp_path: Path, nattool_home: Path
) -> None:
    peer = start_tracker(workdir=tmp_path / "trackers", home=nattool_home, host="127.0.0.3")
    sqlite_trackers.append(peer)
    db = tmp_path / "state" / "tracker.db"
    flags = ("--tracker-ttl", "3", "--announce-interval", "0.5")
    tp = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, *flags, "--join", peer.endpoint)
    deadline = time.monotonic() + 5
    while peer.endpoint not in lines(udp_ask(b"//tcksvr", tp.addr) or b""):
        assert time.monotonic() < deadline, "the joined tracker was never listed"
        time.sleep(0.1)
    verified_at = time.time()
    # Trackers are written by the housekeeping timer (every 0.5 s), not before the
    # list is answered: give it one tick.
    time.sleep(0.7)
    kill9(tp)
    # Restarted without --join: nothing re-verifies the peer, so what is listed
    # comes from the file.
    again = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, *flags, port=tp.port)
    assert peer.endpoint in lines(udp_ask(b"//tcksvr", again.addr)), "a verified tracker was lost by kill -9"
    kill9(again)
    time.sleep(max(0.0, verified_at + 3 + 0.7 - time.time()))
    third = start_sqlite(sqlite_trackers, db, tmp_path, nattool_home, *flags, port=tp.port)
    assert udp_ask(b"//tcksvr", third.addr) == b"", "an expired tracker was served after a restart"


# The two tests above wait out a TTL across a restart (mostly asleep): they run together,
# each in its own directories with its own trackers, so their waits overlap.
DOWNTIME_SCENARIOS: dict[str, Callable[[list[TrackerProcess], Path, Path], None]] = {
    "member ttl": members_whose_ttl_passed_during_the_downtime_are_not_served,
    "tracker ttl": verified_trackers_survive_kill_9_until_they_expire,
}


@pytest.fixture(scope="module")
def downtime_scenarios(
    tmp_path_factory: pytest.TempPathFactory, nattool_home: Path
) -> Iterator[dict[str, Future[None]]]:
    """Every DOWNTIME_SCENARIOS entry started at once; the trackers still running at the end
    are stopped with SIGTERM and must exit cleanly."""
    started: dict[str, list[TrackerProcess]] = {name: [] for name in DOWNTIME_SCENARIOS}
    with ThreadPoolExecutor(len(DOWNTIME_SCENARIOS)) as pool:
        runs = {name: pool.submit(scenario, started[name], tmp_path_factory.mktemp("downtime"), nattool_home)
                for name, scenario in DOWNTIME_SCENARIOS.items()}
    yield runs
    stop_cleanly([tp for trackers in started.values() for tp in trackers])


@pytest.mark.xdist_group("serve_durability_downtime")  # one lane: the fixture runs every scenario
def test_members_whose_ttl_passed_during_the_downtime_are_not_served(
    downtime_scenarios: dict[str, Future[None]],
) -> None:
    downtime_scenarios["member ttl"].result()


@pytest.mark.xdist_group("serve_durability_downtime")
def test_verified_trackers_survive_kill_9_until_they_expire(
    downtime_scenarios: dict[str, Future[None]],
) -> None:
    downtime_scenarios["tracker ttl"].result()
