"""`nattool serve --store sqlite:PATH` on a filesystem that really fills up.

A small tmpfs holds the database; a filler file takes its last free block. While
the disk is full, both ways a registration reaches SQLite must refuse it with an
ERR line (never a member list: a reply is an acknowledgement that the
registration is on disk): the keepalive lane (``SqliteStore.commit_now()`` at the
end of a wake-up) and the batch of first registrations (``register_now``). Each
failure is counted in ``nattool_store_errors_total`` and logged as
``event=store_error`` at most once a second. Once the filler is gone, both ways
acknowledge again, and what they acknowledged is in the file when a new tracker
opens it.

Mounting needs root: skipped otherwise, but failed under CI=true or
NATLAB_REQUIRED=1 (the rule of tests/natlab/fixtures.py), where a skip would hide
that the test never ran.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import TrackerProcess, ask_on, free_tcp_port, lines, start_tracker, udp_socket
from test_metrics import Samples, scrape, value
from test_serve_durability import group_members

REG = "//51pwn/P2P&E2E/"
# Room for the database, its second log file and their WALs after the test's 150-odd
# commits (about 4 KB of WAL each), and small enough to fill in a few milliseconds.
TMPFS_SIZE = "4m"
GROUPS = 5
MEMBERS_PER_GROUP = 10  # well under the keepalive lane's limit of 64 a group
SOURCES = [f"127.0.6.{n}" for n in range(1, 6)]
PROBE_SOURCE = "127.0.7.1"
STORE_UNAVAILABLE = b"store unavailable"  # nattool.net.server._STORE_UNAVAILABLE, on the wire
RECOVERY_DEADLINE_S = 3.0
_STORE_ERROR_LINE = re.compile(r"event=store_error .*\brefused=(\d+) failed_batches=(\d+)")


# -- root and a tmpfs of our own -------------------------------------------------------------


def _required() -> bool:
    # As tests/natlab/fixtures.py: in CI a skip would hide a test that never ran.
    return os.environ.get("CI") == "true" or os.environ.get("NATLAB_REQUIRED") == "1"


def _skip_or_fail(reason: str) -> None:
    if _required():
        pytest.fail(f"disk-full test required (CI=true or NATLAB_REQUIRED=1) but {reason}", pytrace=False)
    pytest.skip(f"disk-full test unavailable: {reason}")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A fresh tmpfs of TMPFS_SIZE, unmounted at teardown (after the trackers of
    ``disk_trackers``, which depends on this fixture and so is torn down first)."""
    if os.geteuid() != 0:
        _skip_or_fail("it needs root to mount a tmpfs")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        _skip_or_fail("mount/umount not found")
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mnt)],
        check=False,
        capture_output=True,
        text=True,
        timeout=10,
    )
    if res.returncode != 0:
        _skip_or_fail(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        res = subprocess.run(["umount", str(mnt)], check=False, capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            # Detach it anyway, so that no mount outlives the run, but say so.
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=10)
            raise AssertionError(f"umount {mnt} failed: {res.stderr.strip()}")


@pytest.fixture
def disk_trackers(small_fs: Path) -> Iterator[list[TrackerProcess]]:
    """Trackers the test starts; any still running at teardown (a failed assertion)
    is stopped before the tmpfs goes, so that the unmount never finds files open."""
    started: list[TrackerProcess] = []
    yield started
    for tp in started:
        tp.stop()


def fill(fs: Path) -> Path:
    """Take every free block of ``fs`` with one file; return its path."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Big writes first for speed, then smaller ones for the last partial chunk.
        for size in (1 << 16, 1 << 12, 1):
            block = b"\0" * size
            while True:
                try:
                    os.write(fd, block)  # a short write is followed by ENOSPC on the next
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    assert os.statvfs(fs).f_bavail == 0, "the filler left free blocks"
    return filler


# -- members: one socket each, so that its endpoint stays put across keepalives -----------


@dataclass(frozen=True)
class Node:
    n: int
    group: str
    sock: socket.socket
    endpoint: str  # kept: the restart check runs after the sockets are closed
    lan: str = "0"  # "0": none

    def request(self) -> bytes:
        # The seed form with public "0" and no padding: the only form the keepalive
        # lane takes once the member is known from this source.
        return f"{REG}{self.group}/0/{self.lan}/02:00:00:00:{self.n >> 8:02x}:{self.n & 0xFF:02x}".encode()

    def own_line(self) -> str:
        return self.endpoint if self.lan == "0" else f"{self.endpoint};{self.lan}"


def endpoint_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def make_nodes(stack: contextlib.ExitStack, first: int, count: int) -> list[Node]:
    nodes = []
    for n in range(first, first + count):
        sock = stack.enter_context(udp_socket(SOURCES[n % len(SOURCES)]))
        nodes.append(Node(n, f"diskfull-{n % GROUPS}", sock, endpoint_of(sock)))
    return nodes


def ask(tp: TrackerProcess, node: Node) -> bytes:
    reply = ask_on(node.sock, node.request(), tp, timeout=2.0)
    assert reply is not None, f"no reply to {node.request()!r}: is the tracker alive? {tp.alive()}"
    return reply


def is_acknowledgement(reply: bytes, node: Node) -> bool:
    """A member list: its first line is the requester's own (endpoint and LAN list)."""
    return not reply.startswith(b"ERR") and lines(reply)[0] == node.own_line()


def assert_refused(reply: bytes, node: Node, db: Path) -> None:
    assert reply.startswith(b"ERR "), f"{node.endpoint} was answered while the disk is full: {reply[:80]!r}"
    assert STORE_UNAVAILABLE in reply, reply
    # One line, and none of the store's own text (paths, SQLite's message) on the wire.
    assert b"\n" not in reply and str(db).encode() not in reply and b"disk" not in reply, reply


def ask_until_acknowledged(tp: TrackerProcess, node: Node, deadline: float) -> int:
    """Ask until a member list comes back; return how many ERR replies came first.
    Freed blocks are usable at once on tmpfs, so the loop is only a safety margin."""
    refusals = 0
    while True:
        reply = ask(tp, node)
        if is_acknowledgement(reply, node):
            return refusals
        assert reply.startswith(b"ERR") and STORE_UNAVAILABLE in reply, reply
        refusals += 1
        assert time.monotonic() < deadline, f"{node.endpoint} still refused after the disk got space back"
        time.sleep(0.02)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def group_endpoints(tp: TrackerProcess, group: str) -> set[str]:
    """Every endpoint ``group`` lists to a probe member, through the paging extension."""
    return group_members(tp, group, PROBE_SOURCE)


def store_error_lines(tp: TrackerProcess) -> list[tuple[int, int]]:
    """(refused, failed_batches) of every event=store_error line logged so far."""
    return [(int(m[1]), int(m[2])) for m in _STORE_ERROR_LINE.finditer(tp.stderr())]


# -- the test ----------------------------------------------------------------------------------


def test_full_disk_refuses_keepalives_and_first_registrations_then_recovers(
    small_fs: Path, disk_trackers: list[TrackerProcess], tmp_path: Path, nattool_home: Path
) -> None:
    db = small_fs / "tracker.db"
    mport = free_tcp_port()
    tp = start_tracker("--metrics", str(mport), workdir=tmp_path / "trackers", home=nattool_home, store=f"sqlite:{db}")
    disk_trackers.append(tp)
    assert f"store sqlite:{db}" in tp.banner, tp.banner

    with contextlib.ExitStack() as stack:
        originals = make_nodes(stack, 0, GROUPS * MEMBERS_PER_GROUP)
        during = make_nodes(stack, 100, 2 * GROUPS)  # first registered while the disk is full
        after = make_nodes(stack, 200, 2 * GROUPS)  # first registered once it has space again

        # One request at a time, each waiting for its reply: every wake-up of the
        # server then reads one datagram, so each refusal is one failed batch. And
        # nothing else writes while a lone tracker serves (its compaction runs in
        # the checkpointer thread, only when the log switches files), so the
        # counters below move by exactly the refusals.
        for node in originals:
            reply = ask(tp, node)
            assert is_acknowledgement(reply, node), (node.endpoint, reply[:80])
        start = scrape(mport)
        assert value(start, "nattool_keepalives_total") == 0  # newcomers never take the lane
        assert value(start, "nattool_store_errors_total") == 0

        filler = fill(small_fs)

        # Keepalives: known member, same source, seed form, small group -> the lane.
        # Each brings a new LAN list: a keepalive that changes nothing but the time
        # is written only once in a while (REFRESH_PERIOD_OF_TTL), so it could be
        # answered with nothing to write. Once a write has failed, every keepalive
        # is written: the log probe and the retries below change nothing, and must
        # still be refused while the disk is full and be in the file once answered.
        originals = [replace(node, lan=f"10.0.{node.n >> 8}.{node.n & 0xFF}") for node in originals]
        # No need to push the WAL into new blocks with extra traffic: each commit
        # appends a frame of a whole page to it (measured: 50 one-row commits made it
        # 32 + 50 x 4120 bytes), and it never restarts into space it already has
        # here (a lone tracker switches log files after 4 MB of WAL, SQLite's own
        # checkpoint waits for 16 MB; both beyond this tmpfs). A 4120-byte frame
        # never fits in what is left of the WAL's last 4 KB tmpfs page, so the very
        # first commit after the fill fails with SQLITE_FULL, and so does every
        # later one, on both paths.
        first_refusal_at = time.monotonic()
        for node in originals:
            assert_refused(ask(tp, node), node, db)
        last_refusal_at = time.monotonic()
        lane_down = scrape(mport)
        assert delta(lane_down, start, "nattool_keepalives_total") == len(originals)  # all took the lane
        assert delta(lane_down, start, "nattool_store_errors_total") == len(originals)
        assert delta(lane_down, start, "nattool_requests_total", kind="register", result="store_error") == len(
            originals
        )

        # First registrations: the batch path (register_now).
        for node in during:
            assert_refused(ask(tp, node), node, db)
        last_refusal_at = time.monotonic()
        batch_down = scrape(mport)
        assert delta(batch_down, lane_down, "nattool_keepalives_total") == 0  # none took the lane
        assert delta(batch_down, lane_down, "nattool_store_errors_total") == len(during)
        assert delta(batch_down, lane_down, "nattool_requests_total", kind="register", result="store_error") == len(
            during
        )

        # Still serving what needs no disk.
        assert tp.alive()
        with udp_socket("127.0.0.9") as s:
            assert ask_on(s, b"//nat", tp) == endpoint_of(s).encode()

        # The log: once a second at most. A refusal more than a second after all the
        # others must log again, with the count of every batch failed since the line
        # before; so the lines together account for every failure.
        time.sleep(max(0.0, last_refusal_at + 1.05 - time.monotonic()))
        assert_refused(ask(tp, originals[0]), originals[0], db)
        failures = len(originals) + len(during) + 1
        logged = store_error_lines(tp)
        assert sum(batches for _, batches in logged) == failures, logged
        assert all(refused == 1 for refused, _ in logged), logged
        outage_s = time.monotonic() - first_refusal_at
        assert 2 <= len(logged) <= 1 + int(outage_s), (logged, outage_s)
        assert "Traceback" not in tp.stderr(), tp.stderr()[-4000:]
        assert value(scrape(mport), "nattool_store_errors_total") == failures

        # Space again: both paths acknowledge (after a short retry loop at most).
        filler.unlink()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        retries = sum(ask_until_acknowledged(tp, node, deadline) for node in originals)
        lane_up = scrape(mport)
        # Every one of them a keepalive again, the log probe's and the retries included.
        assert delta(lane_up, batch_down, "nattool_keepalives_total") == len(originals) + 1 + retries
        assert delta(lane_up, batch_down, "nattool_store_errors_total") == retries + 1  # +1: the log probe

        # A refused first registration stays in memory (soft state), so its retry
        # normally takes the lane; either way its only successful write is this
        # one, after the recovery, which the restart below checks.
        retries_during = sum(ask_until_acknowledged(tp, node, deadline) for node in during)
        during_up = scrape(mport)
        assert delta(during_up, lane_up, "nattool_store_errors_total") == retries_during
        # Brand-new members: the batch path. (A retry after an ERR would be a keepalive.)
        retries_after = sum(ask_until_acknowledged(tp, node, deadline) for node in after)
        batch_up = scrape(mport)
        assert delta(batch_up, during_up, "nattool_keepalives_total") == retries_after
        assert delta(batch_up, during_up, "nattool_store_errors_total") == retries_after
        print(f"\nrecovery retries: keepalives={retries} refused-newcomers={retries_during} new={retries_after}")

    assert tp.stop() == 0
    tp.assert_clean()

    # Everything acknowledged after the recovery is in the file. (Only what was
    # acknowledged is checked: a refused registration may legitimately have
    # stayed in the old tracker's memory.)
    again = start_tracker(workdir=tmp_path / "trackers", home=nattool_home, store=f"sqlite:{db}")
    disk_trackers.append(again)
    nodes = originals + during + after
    listed = {f"diskfull-{g}": group_endpoints(again, f"diskfull-{g}") for g in range(GROUPS)}
    missing = [node.endpoint for node in nodes if node.endpoint not in listed[node.group]]
    assert not missing, f"{len(missing)} acknowledged registrations not in the file: {missing[:10]}"
    known = {node.endpoint for node in nodes}
    strangers = sorted(e for eps in listed.values() for e in eps if e not in known and not e.startswith(PROBE_SOURCE))
    assert not strangers, strangers[:10]
    assert again.stop() == 0
    again.assert_clean()


@pytest.mark.parametrize("existing", [False, True], ids=["new-file", "existing-file"])
def test_starting_on_a_full_disk_is_a_clear_store_error(small_fs: Path, existing: bool) -> None:
    """No traceback (the lock file's pid write used to raise ENOSPC unhandled), exit
    code 5, and advice about the disk: never "move the file aside", which would
    throw a good file's members away."""
    from conftest import nattool_cmd, nattool_env

    db = small_fs / "tracker.db"
    if existing:
        tp = start_tracker(workdir=small_fs.parent / "work", store=f"sqlite:{db}")
        tp.stop()
        tp.assert_clean()
    fill(small_fs)
    res = subprocess.run(
        nattool_cmd("serve", "--host", "127.0.0.1", "--port", "0", "--store", f"sqlite:{db}"),
        env=nattool_env(None),
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 5, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    assert "free space on that disk" in res.stderr and ".corrupt" not in res.stderr, res.stderr
    assert res.stderr.startswith("nattool: error: ") and res.stderr.count("\n") == 1, res.stderr
