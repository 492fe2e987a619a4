"""SQLite store: durability across kill -9, migration, corrupt files, expiry on reopen."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from nattool.errors import StoreError, StoreLocked
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import GroupView, KeepaliveLane, Member, Registration, StoreLimits, TrackerRecord
from nattool.store.sqlite import (
    APPLICATION_ID,
    REFRESH_PERIOD_OF_TTL,
    SCHEMA_VERSION,
    SNAPSHOT_MARK,
    SNAPSHOT_SEEN,
    SqliteStore,
)
from nattool.store.log_checkpoint import LogCheckpointer
from nattool.store.sqlite_codec import encode_rows

ROOT = Path(__file__).resolve().parent.parent
TTL = 120.0


def member(group: str, identity: str, port: int, seen: float) -> Member:
    return Member(
        group=group,
        identity=identity,
        endpoint=Endpoint(ipaddress.ip_address("198.51.100.7"), port),
        lan=("10.0.0.2", "fd00::2"),
        source="198.51.100.7",
        seen=seen,
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reopen(path: Path, limits: StoreLimits = StoreLimits(ttl=TTL)) -> SqliteStore:
    store = SqliteStore(limits, path)
    asyncio.run(store.open())
    return store


def close(store: SqliteStore) -> None:
    asyncio.run(store.close())


def crash(store: SqliteStore) -> None:
    """Leave the files as a killed tracker does: what was committed, and no snapshot
    (closing a connection only folds its WAL into its file)."""
    if store._checkpointer is not None:
        store._checkpointer.stop()
    for db in (store._db, store._db2):
        if db is not None:
            db.close()
    store._db = store._db2 = None
    store._lock.release()


_WRITER = r"""
import asyncio, ipaddress, sys, time
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import GroupView, Member, Registration, StoreLimits
from nattool.store.sqlite import SqliteStore

async def main(path):
    limits = StoreLimits(ttl=600, max_members_per_group=1_000_000, max_groups_per_source=1000)
    store = SqliteStore(limits, path)
    await store.open()
    print("ready", flush=True)
    n = 0
    while True:
        now = time.time()
        size = 1 + n % 17
        ids = [f"id{n + i}" for i in range(size)]
        batch = [Registration(Member(f"g{(n + i) % 5}", ident,
                 Endpoint(ipaddress.ip_address("198.51.100.7"), 1 + (n + i) % 60000),
                 ("10.0.0.2",), "198.51.100.7", now)) for i, ident in enumerate(ids)]
        results = await store.register(batch, now)
        assert all(isinstance(r, GroupView) for r in results), results
        # acknowledged: this line is the "reply"
        sys.stdout.write(" ".join(ids) + "\n")
        sys.stdout.flush()
        n += size
        if n % 7 == 0:
            await store.expire(now)

asyncio.run(main(sys.argv[1]))
"""


def test_kill_9_loses_no_acknowledged_registration(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline() == "ready\n"
        acknowledged: list[str] = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(acknowledged) < 20_000:
            line = proc.stdout.readline()
            acknowledged.extend(line.split())
        os.kill(proc.pid, signal.SIGKILL)
        # lines written before the kill are acknowledged too
        rest = proc.stdout.read()
        for line in rest.splitlines(keepends=True):
            if line.endswith("\n"):
                acknowledged.extend(line.split())
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) > 500, "the writer made too little progress to prove anything"

    store = reopen(path, StoreLimits(ttl=600, max_members_per_group=1_000_000))
    try:
        found = {m.identity for m in store.index.members()}
        missing = [i for i in acknowledged if i not in found]
        print(f"kill -9: acknowledged {len(acknowledged)}, found {len(found)}, missing {len(missing)}")
        assert not missing
        # and they are served through the public API
        now = time.time()
        [view] = asyncio.run(
            store.register([Registration(member("g0", "probe", 9, now), limit=5)], now)
        )
        assert isinstance(view, GroupView) and view.total_others >= len(acknowledged) // 5 - 1
    finally:
        close(store)


def test_members_and_trackers_survive_reopen_expired_do_not(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    now = time.time()
    store = reopen(path)

    async def fill() -> None:
        batch = [
            Registration(member("g", "old", 1000, now - TTL - 5)),
            Registration(member("g", "a", 1001, now - 10)),
            Registration(member("g", "b", 1002, now - 5)),
            Registration(member("h", "c", 1003, now - 1)),
        ]
        await store.register(batch, now - TTL - 5)
        await store.save_tracker(TrackerRecord(Endpoint.from_text("127.0.0.1:1"), now + 60))
        await store.save_tracker(TrackerRecord(Endpoint.from_text("127.0.0.1:2"), now - 1))
        await store.close()

    asyncio.run(fill())
    store = reopen(path)
    try:
        assert sorted(m.identity for m in store.index.members()) == ["a", "b", "c"]
        trackers = asyncio.run(store.load_trackers(now))
        assert [t.endpoint.port for t in trackers] == [1]
        [view] = asyncio.run(store.register([Registration(member("g", "z", 1, now))], now))
        assert isinstance(view, GroupView)
        assert [m.endpoint.port for m in view.others] == [1002, 1001]  # newest first
        assert view.others[0].lan == ("10.0.0.2", "fd00::2")
    finally:
        close(store)
    with closing(sqlite3.connect(path)) as db:
        # Expired rows were deleted from the file. A record per live member (a, b,
        # c, z) is a compact log: the clean close wrote no snapshot.
        rows = [r for (r,) in db.execute("SELECT rec FROM log ORDER BY seq")]
        assert len(rows) == 4 and not any("\x1fold\x1f" in r for r in rows)
        assert [rec.split("\x1f")[1] for rec in rows] == ["a", "b", "c", "z"]
        assert db.execute("SELECT count(*) FROM trackers").fetchone() == (1,)


def test_group_eviction_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    limits = StoreLimits(ttl=TTL, max_members_per_group=2)
    now = time.time()
    store = reopen(path, limits)
    batch = [Registration(member("g", f"m{i}", 1000 + i, now + i)) for i in range(3)]
    asyncio.run(store.register(batch, now + 3))
    close(store)
    store = reopen(path, limits)
    try:
        assert sorted(m.identity for m in store.index.members()) == ["m1", "m2"]
    finally:
        close(store)


def test_fresh_and_empty_files_are_created_at_current_version(tmp_path: Path) -> None:
    for path in (tmp_path / "sub" / "dir" / "new.db", tmp_path / "empty.db"):
        if path.name == "empty.db":
            path.write_bytes(b"")  # version 0: a zero-length file is an empty database
        store = reopen(path)
        now = time.time()
        asyncio.run(store.register([Registration(member("g", "m", 1, now))], now))  # kept: it holds a member
        close(store)
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert db.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        close(reopen(path))  # reopening at the current version is a no-op


def test_files_are_private_to_their_owner(tmp_path: Path) -> None:
    """Members' addresses are nobody else's business: the state directory the store
    creates is 0700, and every file it creates (the log's two files, their WALs,
    the lock) is 0600, whatever the umask lets others read."""
    state = tmp_path / "state" / "nattool"
    path = state / "tracker.db"
    old_umask = os.umask(0o022)
    try:
        store = reopen(path)
        now = time.time()
        try:
            asyncio.run(store.register([Registration(member("g", "m", 1, now))], now))
            files = {p.name: p.stat().st_mode & 0o777 for p in state.iterdir()}
        finally:
            close(store)
        worker = _shared(path)  # the workers' -wal and -shm
        try:
            files.update({p.name: p.stat().st_mode & 0o777 for p in state.iterdir()})
        finally:
            close(worker)
    finally:
        os.umask(old_umask)
    assert state.stat().st_mode & 0o777 == 0o700
    assert state.parent.stat().st_mode & 0o777 == 0o755  # a parent is not ours to lock down
    expected = {f"tracker.db{end}" for end in ("", "-wal", "-shm", "-log2", "-log2-wal", ".lock")}
    assert set(files) == expected, files
    assert {name: mode for name, mode in files.items() if mode != 0o600} == {}


def test_a_fresh_store_that_held_nothing_leaves_nothing_behind(tmp_path: Path) -> None:
    """Opened and closed with nothing written (a server that failed to bind): the
    files and directories that open created are gone; existing ones stay."""
    top = tmp_path / "new"
    close(reopen(top / "nattool" / "tracker.db"))
    assert not top.exists()

    kept = tmp_path / "kept.db"
    store = reopen(kept)
    asyncio.run(store.save_tracker(TrackerRecord(Endpoint.from_text("192.0.2.1:4328"), time.time() + 60)))
    close(store)
    assert kept.exists() and Path(f"{kept}.lock").exists()
    close(reopen(kept))  # not created by this open: it stays, tracker and all
    store = reopen(kept)
    try:
        assert len(asyncio.run(store.load_trackers(time.time()))) == 1
    finally:
        close(store)

    shared = tmp_path / "w.db"  # serve --workers creates the file once, before its workers start
    close(_shared(shared))
    assert shared.exists()


def _assert_refused_and_intact(path: Path, match: str) -> None:
    before = digest(path)
    with pytest.raises(StoreError, match=match) as info:
        reopen(path)
    assert digest(path) == before
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0
    return info  # type: ignore[return-value]


def test_garbage_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    path.write_bytes(os.urandom(16384))
    info = _assert_refused_and_intact(path, "not a database")
    message = str(info.value)  # type: ignore[attr-defined]
    assert str(path) in message and "mv " in message and "--store memory" in message


def test_damaged_database_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "tracker.db"
    now = time.time()
    store = reopen(path, StoreLimits(ttl=TTL, max_members_per_group=100_000))
    batch = [Registration(member("g", f"m{i}" * 20, i + 1, now)) for i in range(2000)]
    asyncio.run(store.register(batch, now))
    close(store)
    size = path.stat().st_size
    assert size > 8 * 4096
    with open(path, "r+b") as fh:  # smash pages in the middle, keep the header
        fh.seek(4 * 4096)
        fh.write(b"\xa5" * (size // 2 - 4 * 4096))
    _assert_refused_and_intact(path, "mv ")


def test_foreign_and_newer_databases_are_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    _assert_refused_and_intact(foreign, "another program")

    newer = tmp_path / "newer.db"
    close(reopen(newer))
    with sqlite3.connect(newer) as db:
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    _assert_refused_and_intact(newer, "newer nattool")


def test_one_process_per_file(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    first = reopen(path)
    try:
        with pytest.raises(StoreLocked, match="in use by another nattool process"):
            reopen(path)
    finally:
        close(first)
    close(reopen(path))  # released on close


def test_workers_expire_compacts_the_log_in_bounded_batches(tmp_path: Path) -> None:
    """Workers compact in the loop (a lone tracker's checkpointer thread does it
    for a lone tracker, see below): bounded statements, the loop between them."""
    from nattool.store import sqlite_common as mod

    path = tmp_path / "t.db"
    now = time.time()
    store = SqliteStore(StoreLimits(ttl=TTL, max_members_per_group=100_000), path, shared=True)
    asyncio.run(store.open())

    def rows() -> int:
        return int(store._require().execute("SELECT count(*) FROM log").fetchone()[0])

    async def body() -> None:
        n = mod.EXPIRE_BATCH * 3 + 10
        # distinct instants: a row each (one instant would make one row)
        await store.register([Registration(member("g", f"m{i}", 1 + i, now + i * 1e-6)) for i in range(n)], now)
        # re-registrations append; the older rows are dead once the TTL passes
        await store.register([Registration(member("g", "m0", 1, now + 1))], now + 1)
        assert rows() == n + 1
        assert await store.expire(now + 1) == 0 and rows() == n + 1  # nothing dead yet
        # with nothing appended since, one call deletes one bounded batch
        later = now + TTL + 0.5
        assert await store.expire(later) == n - 1  # the index drops them all at once
        assert rows() == n + 1 - mod.EXPIRE_BATCH
        while rows() > 1:
            before = rows()
            await store.expire(later)
            assert before - rows() <= mod.EXPIRE_BATCH
        [rec] = [r for (r,) in store._require().execute("SELECT rec FROM log")]
        assert "\x1fm0\x1f" in rec  # the live re-registration stays
        await store.close()

    asyncio.run(body())


def test_one_instant_is_one_row_and_replays_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    now = time.time()
    store = reopen(path)
    batch = [Registration(member("g", f"m{i}", 1000 + i, now)) for i in range(5)]
    batch.append(Registration(member("h", "x", 2000, now + 0.5)))
    asyncio.run(store.register(batch, now + 0.5))
    close(store)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM log").fetchone() == (2,)
    store = reopen(path)
    try:
        [view] = asyncio.run(store.register([Registration(member("g", "new", 1, now + 1))], now + 1))
        assert isinstance(view, GroupView)
        assert [m.identity for m in view.others] == ["m4", "m3", "m2", "m1", "m0"]  # newest first
        assert sorted(m.identity for m in store.index.members()) == ["m0", "m1", "m2", "m3", "m4", "new", "x"]
    finally:
        close(store)


def _old_rec(i: int, lan: str) -> str:
    """Member i of a log row as versions 1 and 2 wrote it."""
    return "\x1f".join(["g", f"m{i}", f"198.51.100.{i + 1}:{4000 + i}", lan, f"198.51.100.{i + 1}"])


def _write_old_file(path: Path, version: int, rows: list[tuple[int | None, float, str]]) -> None:
    """A file as nattool wrote it at ``version`` (1 or 2: same tables, AUTOINCREMENT
    log), holding ``rows`` of (seq or None for the next one, seen, rec)."""
    with closing(sqlite3.connect(path)) as db:
        db.executescript(
            "CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, seen REAL NOT NULL, rec TEXT NOT NULL);"
            "CREATE TABLE trackers (endpoint TEXT PRIMARY KEY, expires REAL NOT NULL) WITHOUT ROWID;"
            f"PRAGMA application_id={APPLICATION_ID}; PRAGMA user_version={version};"
        )
        db.executemany("INSERT INTO log (seq, seen, rec) VALUES (?, ?, ?)", rows)
        db.commit()


def test_a_version_1_file_is_migrated_with_its_members(tmp_path: Path) -> None:
    """Version 1 wrote a row per member: such rows are rows of one member."""
    path = tmp_path / "v1.db"
    now = time.time()
    _write_old_file(path, 1, [(None, now - 3 + i, _old_rec(i, "10.0.0.1")) for i in range(3)])
    store = reopen(path)
    try:
        members = {m.identity: m for m in store.index.members()}
        assert sorted(members) == ["m0", "m1", "m2"]
        assert members["m2"].endpoint_text == "198.51.100.3:4002" and members["m2"].lan == ("10.0.0.1",)
    finally:
        close(store)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (4,)


def _shared(path: Path) -> SqliteStore:
    store = SqliteStore(StoreLimits(ttl=TTL), path, shared=True)
    asyncio.run(store.open())
    return store


def test_shared_workers_see_each_others_members_whole(tmp_path: Path) -> None:
    """What one worker appended reaches the other field for field (its rows are
    taken without a second parse), and a move of the same identity replaces."""
    path = tmp_path / "w.db"
    now = time.time()
    a, b = _shared(path), _shared(path)
    try:
        asyncio.run(a.register([Registration(member("g", "alice", 4000, now))], now))
        [view] = asyncio.run(b.register([Registration(member("g", "bob", 4001, now + 1))], now + 1))
        assert isinstance(view, GroupView)
        assert view.others == (member("g", "alice", 4000, now),)
        assert view.others[0].lan == ("10.0.0.2", "fd00::2")
        # alice moves, registering at b; a learns it when it next writes
        asyncio.run(b.register([Registration(member("g", "alice", 4002, now + 2))], now + 2))
        [view] = asyncio.run(a.register([Registration(member("h", "carol", 4003, now + 3))], now + 3))
        assert sorted((m.identity, m.endpoint_text) for m in a.index.members()) == [
            ("alice", "198.51.100.7:4002"), ("bob", "198.51.100.7:4001"), ("carol", "198.51.100.7:4003"),
        ]
    finally:
        close(a)
        close(b)


_HOLDER = r"""
import fcntl, sys, time
with open(sys.argv[1], "a+") as fh:
    fcntl.lockf(fh.fileno(), fcntl.LOCK_EX, 1, 1)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextmanager
def _writer_lock_held_elsewhere(path: Path, seconds: float) -> Iterator[None]:
    """Another process holds the workers' writer lock of ``path`` for ``seconds``."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, f"{path}.lock", str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait(10)


def _timed_register(store: SqliteStore) -> tuple[object, float]:
    started = time.monotonic()
    [result] = asyncio.run(store.register([Registration(member("g", "m", 1, time.time()))], time.time()))
    return result, time.monotonic() - started


@pytest.mark.skipif(sys.platform == "win32", reason="--workers needs SO_REUSEPORT (POSIX)")
def test_shared_writes_wait_for_the_other_workers_writer_lock(tmp_path: Path) -> None:
    """Workers queue on a lock of their own, not on SQLite's busy handler: a write
    waits while another process holds the writer lock and goes on once it is dropped."""
    path = tmp_path / "w.db"
    store = _shared(path)
    try:
        with _writer_lock_held_elsewhere(path, 0.6):
            view, waited = _timed_register(store)
        assert isinstance(view, GroupView)
        assert 0.3 < waited < 3.0, waited
    finally:
        close(store)


def test_a_file_open_in_another_program_is_refused_clearly(tmp_path: Path) -> None:
    """The server keeps the file to itself (SQLite's exclusive locking mode): an
    sqlite3 shell left open on it gives a plain error, and the file is untouched."""
    path = tmp_path / "t.db"
    now = time.time()
    store = reopen(path)
    asyncio.run(store.register([Registration(member("g", "m", 1, now))], now))
    close(store)
    with closing(sqlite3.connect(path)) as shell:
        shell.execute("SELECT count(*) FROM log").fetchone()
        before = digest(path)
        with pytest.raises(StoreLocked, match="open in another program"):
            reopen(path)
        assert digest(path) == before
    close(reopen(path))  # and once it is closed, the tracker opens it


def test_a_version_2_file_is_rebuilt_without_autoincrement(tmp_path: Path) -> None:
    """Version 2's log used AUTOINCREMENT (a second page written by every commit):
    version 3 rebuilds the table, keeping every row and its seq."""
    path = tmp_path / "v2.db"
    now = time.time()
    recs = [_old_rec(i, "") for i in range(3)]
    _write_old_file(path, 2, [(7, now - 2, "\x1e".join(recs[:2])), (9, now - 1, recs[2])])
    store = reopen(path)
    try:
        assert sorted(m.identity for m in store.index.members()) == ["m0", "m1", "m2"]
        asyncio.run(store.register([Registration(member("g", "new", 1, now))], now))
    finally:
        close(store)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        [sql] = db.execute("SELECT sql FROM sqlite_master WHERE name = 'log'").fetchone()
        assert "AUTOINCREMENT" not in sql.upper()
        assert [seq for (seq,) in db.execute("SELECT seq FROM log ORDER BY seq")] == [7, 9, 10]


def test_compaction_keeps_the_newest_row_so_seq_never_goes_back(tmp_path: Path) -> None:
    """Without AUTOINCREMENT a new row's seq is the largest plus one: if every row
    could be deleted, seq would start again at 1 and a worker tailing the log
    (seq > last seen) would skip the new rows."""
    path = tmp_path / "t.db"
    now = time.time()
    store = _shared(path)

    def seqs() -> list[int]:
        return [seq for (seq,) in store._require().execute("SELECT seq FROM log ORDER BY seq")]

    async def body() -> None:
        for i in range(5):
            await store.register([Registration(member("g", f"m{i}", 1 + i, now + i))], now + i)
        top = seqs()[-1]
        later = now + 10 + TTL
        assert await store.expire(later) == 5  # one call: fewer rows than a batch
        assert seqs() == [top]  # all dead, the newest stays
        await store.register([Registration(member("g", "late", 99, later))], later)
        assert seqs() == [top, top + 1]
        await store.close()

    asyncio.run(body())


SWITCH = 64 << 10  # a small LOG_SWITCH_BYTES: the writer changes files every ~15 commits


@pytest.fixture
def small_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    from nattool.store import sqlite_lone

    monkeypatch.setattr(sqlite_lone, "LOG_SWITCH_BYTES", SWITCH)


# How long the checkpointer thread may take to get its turn. It runs only when a
# CPU has nothing better to do (SCHED_IDLE): on a busy machine that can be seconds.
CHECKPOINTER_PATIENCE = 120.0


def _let_the_checkpointer_catch_up(checkpointer: LogCheckpointer) -> None:
    """Wait until the thread has done every checkpoint asked of it, as a loop's idle
    moments let it on a machine with a CPU to spare."""
    deadline = time.monotonic() + CHECKPOINTER_PATIENCE
    while not (checkpointer.ready("main") and checkpointer.ready("log2")):
        assert time.monotonic() < deadline, f"the checkpointer thread did no checkpoint in {CHECKPOINTER_PATIENCE:g} s"
        time.sleep(0.001)


def _checkpointer_at_normal_priority(checkpointer: LogCheckpointer) -> None:
    """Check that the thread runs at SCHED_IDLE (it must not take the event loop's
    core from it), then lift it to normal priority: these tests wait for its work,
    and at SCHED_IDLE on a busy machine that can take minutes."""
    if not sys.platform.startswith("linux"):
        return
    thread = checkpointer._thread
    assert thread is not None and thread.native_id is not None
    deadline = time.monotonic() + 10
    while os.sched_getscheduler(thread.native_id) != os.SCHED_IDLE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert os.sched_getscheduler(thread.native_id) == os.SCHED_IDLE
    try:
        os.sched_setscheduler(thread.native_id, os.SCHED_OTHER, os.sched_param(0))
    except PermissionError:
        pass  # not allowed here (RLIMIT_NICE): the waits are only longer


def _write_moving_members(
    store: SqliteStore, now: float, commits: int, idents: int = 20, *, wait_for_checkpoints: bool = True
) -> dict[str, str]:
    """One commit per registration; identity i moves to a new port each time it
    registers. Returns every identity's last endpoint. Before each commit the
    checkpointer thread finishes what it was asked (unless told not to wait): so
    the writer moves to the other file whenever its estimate says so."""
    last: dict[str, str] = {}
    checkpointer = store._checkpointer
    for n in range(commits):
        if wait_for_checkpoints and checkpointer is not None:
            _let_the_checkpointer_catch_up(checkpointer)
        ident = f"m{n % idents}"
        m = member("g", ident, 1000 + n, now + n * 1e-3)
        [view] = asyncio.run(store.register([Registration(m)], m.seen))
        assert isinstance(view, GroupView)
        last[ident] = m.endpoint_text
    return last


def _rows_by_file(path: Path) -> tuple[list[int], list[int]]:
    second = Path(f"{path}-log2")
    out = []
    for file in (path, second):
        with closing(sqlite3.connect(file)) as db:
            out.append([seq for (seq,) in db.execute("SELECT seq FROM log ORDER BY seq")])
    return out[0], out[1]


def test_a_lone_tracker_writes_its_log_to_two_files_in_turn(tmp_path: Path, small_switch: None) -> None:
    """The writer moves to the other file once a file's WAL is big enough, and a
    file is written again only after the checkpointer thread has copied its WAL
    back: so, when the thread keeps up, each WAL restarts and stays near
    LOG_SWITCH_BYTES without SQLite ever checkpointing inside a commit (its own
    checkpoints start at four times that; the next test covers a thread that
    falls behind). Replaying both files in seq order gives every member its last
    move."""
    import threading

    path = tmp_path / "t.db"
    wal, wal2 = Path(f"{path}-wal"), Path(f"{path}-log2-wal")
    store = reopen(path)
    checkpointer = store._checkpointer
    assert checkpointer is not None and checkpointer.running
    _checkpointer_at_normal_priority(checkpointer)
    now = time.time()
    biggest = 0
    last: dict[str, str] = {}
    for _ in range(8):
        last.update(_write_moving_members(store, now, 50))
        now += 1
        biggest = max(biggest, wal.stat().st_size, wal2.stat().st_size if wal2.exists() else 0)
    switches, checkpoints = store.switches, checkpointer.checkpoints
    crash(store)  # the files as a killed tracker leaves them: no snapshot
    assert switches >= 10, switches
    assert checkpoints >= switches - 1 and checkpointer.errors == 0
    assert biggest <= 2 * SWITCH, f"a WAL grew to {biggest} bytes: it did not restart"

    first, second = _rows_by_file(path)
    assert first and second
    assert sorted(first + second) == list(range(1, 401)), "one sequence over both files"
    store = reopen(path)
    try:
        assert {m.identity: m.endpoint_text for m in store.index.members()} == last
        # and new rows go on from the largest seq of either file
        asyncio.run(store.register([Registration(member("g", "new", 5, now + 1))], now + 1))
    finally:
        checkpointer = store._checkpointer
        close(store)
    assert checkpointer is not None and not checkpointer.running
    assert not [t for t in threading.enumerate() if t.name == "nattool-log-checkpoint"]
    first, second = _rows_by_file(path)
    # The clean close: the marker (402) after the new row, the snapshot after it,
    # nothing before it, in either file.
    assert second == [] and first[0] == 402


def test_a_lone_tracker_whose_checkpointer_falls_behind_still_bounds_its_wal(
    tmp_path: Path, small_switch: None
) -> None:
    """The thread runs only when a CPU has nothing better to do, so on a busy
    machine it may not get its turn for a long time. The writer then stays on its
    file (it never writes a file whose checkpoint is not complete), and SQLite's
    own checkpoint, inside a commit, bounds that WAL: at most
    SAFETY_CHECKPOINT_SWITCHES times the switch size, plus one commit's frames.
    Nothing is lost. (The thread is stopped here: a thread that never runs.)"""
    from nattool.store.sqlite_lone import SAFETY_CHECKPOINT_SWITCHES

    path = tmp_path / "t.db"
    wals = (Path(f"{path}-wal"), Path(f"{path}-log2-wal"))
    store = reopen(path)
    checkpointer = store._checkpointer
    assert checkpointer is not None
    checkpointer.stop()
    now = time.time()
    biggest = 0
    last: dict[str, str] = {}
    for _ in range(8):
        last.update(_write_moving_members(store, now, 50, wait_for_checkpoints=False))
        now += 1
        biggest = max(biggest, *(wal.stat().st_size for wal in wals if wal.exists()))
    switches = store.switches
    crash(store)
    assert switches == 1, "the writer came back to a file that was not checkpointed"
    frame = 4096 + 24
    assert biggest > 2 * SWITCH, "SQLite's own checkpoint was never needed: the test tests nothing"
    assert biggest <= 32 + SAFETY_CHECKPOINT_SWITCHES * SWITCH // 4096 * frame + 4 * frame, biggest
    first, second = _rows_by_file(path)
    assert sorted(first + second) == list(range(1, 401))
    store = reopen(path)
    try:
        assert {m.identity: m.endpoint_text for m in store.index.members()} == last
    finally:
        close(store)


def test_a_lone_tracker_compacts_in_the_checkpointer_thread_not_the_loop(tmp_path: Path, small_switch: None) -> None:
    """While serving, expire() deletes no log row (a statement in the loop took up
    to 20 ms, and its page writes made the active WAL outgrow the estimate that
    decides the switch); the checkpointer thread deletes a file's dead rows when
    the writer leaves it, keeping each file's newest row."""
    store = reopen(tmp_path / "t.db", StoreLimits(ttl=1.0))
    try:
        checkpointer = store._checkpointer
        assert checkpointer is not None
        _checkpointer_at_normal_priority(checkpointer)
        now = time.time()
        _write_moving_members(store, now, 100)
        assert store.switches >= 2

        def rows(name: str) -> list[float]:
            return [seen for (seen,) in store._log_connection(name).execute("SELECT seen FROM log ORDER BY seq")]

        def settle() -> None:
            _let_the_checkpointer_catch_up(checkpointer)

        settle()
        before = {name: len(rows(name)) for name in ("main", "log2")}
        assert min(before.values()) > 1
        asyncio.run(store.expire(now + 10))  # every row is dead by then
        assert {name: len(rows(name)) for name in ("main", "log2")} == before, "the loop deleted rows"

        later = now + 10
        _write_moving_members(store, later, 100)  # two switches or more, at the later time
        settle()
        assert checkpointer.compacted > 0 and checkpointer.errors == 0
        for name in ("main", "log2"):
            dead = [seen for seen in rows(name)[:-1] if seen <= later - 1.0]
            assert dead == [], f"{name} kept {len(dead)} dead rows"
    finally:
        close(store)


def _wal_restarts(wal: Path) -> int:
    """The checkpoint sequence number in a WAL file's header: SQLite adds one each
    time it starts the WAL afresh."""
    with wal.open("rb") as f:
        return int.from_bytes(f.read(16)[12:16], "big")


def test_the_checkpointer_thread_restarts_the_wal_it_checkpointed(tmp_path: Path, small_switch: None) -> None:
    """Once the writer has left a file, the thread checkpoints it and starts its WAL
    afresh; the writer's first commit on coming back only appends. (SQLite restarts
    a checkpointed WAL at its next write and fsyncs the new header there: in the
    loop that was 0.3-0.6 ms at every switch.)"""
    path = tmp_path / "t.db"
    wals = {"main": Path(f"{path}-wal"), "log2": Path(f"{path}-log2-wal")}
    store = reopen(path)
    try:
        checkpointer = store._checkpointer
        assert checkpointer is not None
        _checkpointer_at_normal_priority(checkpointer)
        now = time.time()
        restarted: dict[str, int] = {}  # file left -> its restarts once the thread is done
        switches = returns = 0
        for n in range(400):
            active = store._active
            m = member("g", f"m{n % 20}", 1000 + n, now + n * 1e-3)
            restarts = _wal_restarts(wals[active]) if wals[active].exists() else 0
            asyncio.run(store.register([Registration(m)], m.seen))
            if active in restarted:
                # The writer's first commit since it came back only appended.
                assert _wal_restarts(wals[active]) == restarted.pop(active), f"{active}: the writer restarted the WAL"
                returns += 1
            if store._active != active:
                switches += 1
                _let_the_checkpointer_catch_up(checkpointer)
                # Restarted by the thread, before the writer comes back.
                restarted[active] = _wal_restarts(wals[active])
                assert restarted[active] == restarts + 1, f"{active}: the WAL was not restarted"
        assert switches >= 10 and returns >= switches - 2 and checkpointer.errors == 0
    finally:
        close(store)


def test_workers_fold_the_second_log_file_into_the_first(tmp_path: Path, small_switch: None) -> None:
    """Workers write one file: opening, they move the second file's rows into it
    (seq kept), so a lone tracker's file serves them whole, and back again."""
    path = tmp_path / "t.db"
    store = reopen(path)
    now = time.time()
    last = _write_moving_members(store, now, 200)
    crash(store)  # a clean close would leave everything in the first file
    first, second = _rows_by_file(path)
    assert first and second

    worker = _shared(path)
    try:
        assert {m.identity: m.endpoint_text for m in worker.index.members()} == last
        m = member("g", "m0", 9999, now + 1)
        asyncio.run(worker.register([Registration(m)], m.seen))
        last["m0"] = m.endpoint_text
    finally:
        close(worker)
    first, second = _rows_by_file(path)
    assert second == [] and len(first) == 201

    store = reopen(path)
    try:
        assert {m.identity: m.endpoint_text for m in store.index.members()} == last
    finally:
        close(store)


def _store_with_a_member(path: Path) -> None:
    """Files a tracker kept: they hold a member (a fresh store that held nothing
    leaves no file behind)."""
    store = reopen(path)
    now = time.time()
    asyncio.run(store.register([Registration(member("g", "m", 1, now))], now))
    close(store)


def test_a_garbage_second_log_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _store_with_a_member(path)
    second = Path(f"{path}-log2")
    second.write_bytes(b"not a database, " * 512)
    before = digest(second)
    with pytest.raises(StoreError, match=r"t\.db-log2 \(the second file of the log\).*mv"):
        reopen(path)
    assert digest(second) == before
    second.unlink()
    close(reopen(path))  # moved aside: the tracker starts


def test_a_foreign_second_log_file_is_refused_and_left_intact(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _store_with_a_member(path)
    second = Path(f"{path}-log2")
    second.unlink()
    with closing(sqlite3.connect(second)) as db:
        db.execute("CREATE TABLE notes (x)")
        db.commit()
    before = digest(second)
    with pytest.raises(StoreError, match="not a nattool log file"):
        reopen(path)
    assert digest(second) == before
    with pytest.raises(StoreError, match="not a nattool log file"):
        _shared(path)
    assert digest(second) == before


@pytest.mark.skipif(sys.platform == "win32", reason="--workers needs SO_REUSEPORT (POSIX)")
def test_a_worker_stuck_holding_the_writer_lock_costs_an_error_not_a_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nattool.store import filelock

    monkeypatch.setattr(filelock, "WRITER_WAIT", 0.3)
    path = tmp_path / "w.db"
    store = _shared(path)
    with _writer_lock_held_elsewhere(path, 5):
        result, waited = _timed_register(store)
    assert 0.25 < waited < 2.0
    assert isinstance(result, StoreError) and "write lock" in str(result)
    assert store.write_errors == 1
    [view] = asyncio.run(store.register([Registration(member("g", "m", 1, time.time()))], time.time()))
    assert isinstance(view, GroupView)  # the lock is free again: writes go on
    close(store)


def test_keepalives_in_the_lane_are_durable_once_committed(tmp_path: Path) -> None:
    """The keepalive lane changes the index at once and writes at commit_now(): what
    a commit wrote comes back on reopen, moved and in its new order."""
    path = tmp_path / "k.db"
    now = time.time()
    store = reopen(path)
    try:
        store.register_now([Registration(member("g", "a", 1001, now - 3)), Registration(member("g", "b", 1002, now - 3))], now - 3)
        lane = store.keepalive_lane()
        assert lane is not None
        answer = lane("g", "a", "198.51.100.7:2001", "10.0.0.9", "198.51.100.7", now - 2)
        assert answer is not None
        others, _, _ = answer
        assert [m.identity for m in others or ()] == ["b"]  # the others as members
        assert store.commit_now() is None
        # Not yet committed when the store closes: close() writes it too.
        assert lane("g", "b", "198.51.100.7:2002", "", "198.51.100.7", now - 1) is not None
    finally:
        close(store)
    store = reopen(path)
    try:
        group = store.index._groups["g"]
        assert [(m.identity, m.endpoint_text, m.lan_text) for m in group.values()] == [
            ("a", "198.51.100.7:2001", "10.0.0.9"),
            ("b", "198.51.100.7:2002", ""),
        ]
        assert group["a"].seen == now - 2
    finally:
        close(store)


def test_a_failed_lane_commit_is_an_error_and_the_next_one_writes(tmp_path: Path) -> None:
    """A commit the disk refuses (here SQLite's own page limit, as a full disk would)
    comes back as a StoreError, counted, and does not poison the next commit."""
    path = tmp_path / "f.db"
    now = time.time()
    store = reopen(path)
    try:
        store.register_now([Registration(member("g", "a", 1001, now - 5))], now - 5)
        lane = store.keepalive_lane()
        assert lane is not None
        db = store._log_connection(store._active)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")
        big_lan = ",".join(f"10.{i >> 8}.{i & 255}.1" for i in range(16))
        for i in range(400):  # more than the file's free pages hold
            assert lane("g", "a", f"198.51.100.7:{3000 + i}", big_lan, "198.51.100.7", now - 4) is not None
        error = store.commit_now()
        assert isinstance(error, StoreError) and "cannot write" in str(error)
        assert store.write_errors == 1
        db.execute("PRAGMA max_page_count=1073741823")
        assert lane("g", "a", "198.51.100.7:4000", "", "198.51.100.7", now - 3) is not None
        assert store.commit_now() is None and store.write_errors == 1
    finally:
        close(store)
    store = reopen(path)
    try:
        assert store.index._groups["g"]["a"].endpoint_text == "198.51.100.7:4000"
    finally:
        close(store)


def _log_records(store: SqliteStore) -> int:
    """Member records in the store's log files (committed; a failed commit left none)."""
    return sum(
        rec.count("\x1e") + 1 for db in (store._db, store._db2) if db is not None for (rec,) in db.execute("SELECT rec FROM log")
    )


@contextmanager
def _member_in_the_lane(path: Path) -> Iterator[tuple[SqliteStore, KeepaliveLane, float, float]]:
    """A store with member a of group g registered just after the start of the
    period before the current one (times from there on are live, and their periods
    known); its lane, the refresh period and that start. Crashed afterwards: the
    files as a killed tracker leaves them."""
    period = TTL * REFRESH_PERIOD_OF_TTL
    start = (time.time() // period - 1) * period
    store = reopen(path)
    try:
        store.register_now([Registration(member("g", "a", 1001, start + 1))], start + 1)
        lane = store.keepalive_lane()
        assert lane is not None
        yield store, lane, period, start
    finally:
        crash(store)


def _records_written(store: SqliteStore, lane: KeepaliveLane, endpoint: str, lan: str, seen: float) -> int:
    """Log records that a keepalive of member a, committed, wrote."""
    before = _log_records(store)
    answer = lane("g", "a", endpoint, lan, "198.51.100.7", seen)
    assert answer is not None
    _, lines, _ = answer
    assert lines == ""  # the only member: no other lines
    assert store.commit_now() is None
    return _log_records(store) - before


def _member_after_reopen(path: Path) -> Member:
    store = reopen(path)
    try:
        return store.index._groups["g"]["a"]
    finally:
        close(store)


def test_a_refresh_is_written_once_a_period_and_a_change_at_once(tmp_path: Path) -> None:
    """A keepalive that changes nothing but the member's time is written only when it
    is the member's first in a new period; a new endpoint or LAN list always is.
    After a crash the member is back as last written: its time at most one period
    older than its last keepalive."""
    path = tmp_path / "r.db"
    with _member_in_the_lane(path) as (store, lane, period, start):
        def written(seen: float, port: int, lan: str) -> int:
            return _records_written(store, lane, f"198.51.100.7:{port}", lan, seen)

        assert written(start + 5, 1001, "10.0.0.2,fd00::2") == 0  # nothing new
        assert written(start + 6, 1002, "10.0.0.2,fd00::2") == 1  # moved
        assert written(start + 7, 1002, "10.0.0.3") == 1  # a new LAN list
        assert written(start + 8, 1002, "10.0.0.3") == 0
        assert written(start + period + 1, 1002, "10.0.0.3") == 1  # the first of a new period
        assert written(start + period + 2, 1002, "10.0.0.3") == 0
    back = _member_after_reopen(path)
    assert (back.endpoint_text, back.lan_text, back.seen) == ("198.51.100.7:1002", "10.0.0.3", start + period + 1)


def test_after_a_failed_write_every_refresh_is_written_for_a_period(tmp_path: Path) -> None:
    """The index keeps what a failed commit held, so a refresh of it in the same
    period would be answered with nothing written: for one period after a failure
    every refresh is written."""
    path = tmp_path / "w.db"
    big_lan = ",".join(f"10.{i >> 8}.{i & 255}.1" for i in range(16))
    with _member_in_the_lane(path) as (store, lane, period, start):
        db = store._log_connection(store._active)
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count={pages}")
        for i in range(400):  # more than the file's free pages hold
            assert lane("g", "a", f"198.51.100.7:{3000 + i}", big_lan, "198.51.100.7", start + 2) is not None
        assert isinstance(store.commit_now(), StoreError)
        db.execute("PRAGMA max_page_count=1073741823")

        def written(seen: float) -> int:
            return _records_written(store, lane, "198.51.100.7:3399", big_lan, seen)

        assert written(start + 3) == 1
        assert written(start + 2 + period - 0.5) == 1  # still within a period of the failure
        assert written(start + 2 + period + 0.5) == 0  # past it, in the period just written
    back = _member_after_reopen(path)
    assert (back.endpoint_text, back.seen) == ("198.51.100.7:3399", start + 2 + period - 0.5)


def test_workers_have_no_keepalive_lane(tmp_path: Path) -> None:
    store = _shared(tmp_path / "w.db")
    try:
        assert store.keepalive_lane() is None  # they must catch up before every write
    finally:
        close(store)


def _index_state(store: SqliteStore) -> tuple[list[Member], list[tuple[str, list[Member]]]]:
    """Everything replay must reproduce: the members by age, and each group's order."""
    index = store.index
    return list(index.oldest_first()), [(key, list(group.values())) for key, group in sorted(index._groups.items())]


def test_a_clean_close_leaves_one_record_per_member_and_replays_to_the_same_index(tmp_path: Path) -> None:
    """Registrations from many instants, keepalives through the lane, a member that
    moved to another source and one evicted by its group's cap: the log holds a
    record for each of them. A clean close leaves a marker and one record per live
    member, and the next open rebuilds the very same index from it."""
    path = tmp_path / "t.db"
    limits = StoreLimits(ttl=TTL, max_members_per_group=8)
    now = time.time()
    store = reopen(path, limits)
    try:
        for n in range(9):  # the ninth evicts m0
            asyncio.run(store.register([Registration(member("g", f"m{n}", 1000 + n, now + n))], now + n))
        asyncio.run(store.register([Registration(member("h", f"x{n}", 2000 + n, now + 9)) for n in range(3)], now + 9))
        lane = store.keepalive_lane()
        assert lane is not None
        for rnd in range(5):
            seen = now + 10 + rnd
            for n in (3, 1, 8):  # keepalives: each commit is one instant, one row
                m = member("g", f"m{n}", 1000 + n + rnd, seen)
                assert lane(m.group, m.identity, m.endpoint_text, m.lan_text, m.source, seen) is not None
            assert store.commit_now() is None
        moved = Member("h", "x1", "203.0.113.9:7", "", "203.0.113.9", now + 20)  # another source: the batch path
        asyncio.run(store.register([Registration(moved)], now + 20))
        before = _index_state(store)
        records_before = _log_records(store)
    finally:
        close(store)
    live = len(before[0])
    assert live == 11 and records_before > 2 * live
    with closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT seen, rec FROM log ORDER BY seq").fetchall()
    assert rows[0] == (SNAPSHOT_SEEN, SNAPSHOT_MARK)
    assert sum(rec.count("\x1e") + 1 for _, rec in rows[1:]) == live
    # One row per instant, as the writer's rows are.
    assert [seen for seen, _ in rows[1:]] == sorted({m.seen for m in before[0]})
    with closing(sqlite3.connect(f"{path}-log2")) as db:
        assert db.execute("SELECT count(*) FROM log").fetchone() == (0,)
    store = reopen(path, limits)
    try:
        assert _index_state(store) == before
        assert "m0" not in {m.identity for m in store.index.members()}
    finally:
        close(store)
    store = reopen(path, limits)  # and once more: a snapshot of a snapshot is the same
    try:
        assert _index_state(store) == before
    finally:
        close(store)


def test_replay_starts_afresh_at_the_newest_marker(tmp_path: Path) -> None:
    """A close cut short after its snapshot was committed leaves older rows behind
    (in one file or both): the open replays from the newest marker only, and
    deletes what came before it."""
    path = tmp_path / "t.db"
    now = time.time()
    store = reopen(path)
    asyncio.run(store.register([Registration(member("g", "gone", 1000, now))], now))
    asyncio.run(store.register([Registration(member("g", "kept", 1001, now + 1))], now + 1))
    crash(store)
    kept = member("g", "kept", 1001, now + 1)
    with closing(sqlite3.connect(path)) as db:
        (last,) = db.execute("SELECT max(seq) FROM log").fetchone()
        db.execute("INSERT INTO log (seq, seen, rec) VALUES (?, ?, ?)", (last + 1, SNAPSHOT_SEEN, SNAPSHOT_MARK))
        [(seen, rec)] = encode_rows([kept])
        db.execute("INSERT INTO log (seq, seen, rec) VALUES (?, ?, ?)", (last + 2, seen, rec))
        db.commit()
    store = reopen(path)
    try:
        assert [m.identity for m in store.index.members()] == ["kept"]
        assert store.bad_rows == 0
    finally:
        crash(store)
    first, second = _rows_by_file(path)
    # Older rows gone, and the marker too: a dead row once replay has used it.
    assert first + second == [last + 2]
