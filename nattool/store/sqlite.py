"""The embedded default store: reads from memory, writes to SQLite (WAL).

Every read is served by the same :class:`MemberIndex` as the memory store, so the
hot path never waits on a query. Each ``register()`` batch (everything one event
loop turn received) is written as ONE transaction: group commit.

The file is an append-only log of registrations, not a table updated in place:
appending to the end of a rowid b-tree costs about 1 us a row, an upsert into a
(group, identity) table with a ``seen`` index 15-25 us (benchmarks/store_bench.py
measures this). A row holds every member that one batch registered at one instant
(the server stamps a whole event-loop wake-up with one clock reading), so a commit
inserts one row, not one per registration. Opening replays the log through the same index, which reproduces
replacement by identity and group evictions. Compaction is trivial because of
soft state: a row whose ``seen`` is older than the TTL is dead -- its member
either expired or registered again since, in a later row -- so dead rows are
deleted from the head of the log: by the checkpointer thread for a lone tracker
(each file when the writer leaves it), by ``expire()`` in bounded batches for
workers. The log holds
about (registration rate x TTL) rows. With
``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is a ``write()`` into the
WAL file with no fsync, so a committed batch survives ``kill -9`` of the process
(the data sit in the kernel's page cache); only a power loss can take the
commits since a file's last checkpoint (at most a few MB of WAL, under a second
under load), which soft state with a TTL of two minutes tolerates.

The commit runs in the event-loop thread. Measured with benchmarks/store_bench.py,
a hop to a worker thread and back costs more than the commit itself (batches of
one: ~10k registrations/s through a thread vs ~47k in the loop), and staying in
one thread keeps the write order equal to the batch order for free. What made
commits cost more than they had to, and what was done about each:

- SQLite checkpoints inside a commit: 1-1.5 ms (fsyncs, mostly) about ten times a
  second under a half-rate registration load, most of the registration p99
  then. A lone tracker splits the log over two files and a thread checkpoints the
  one not being written (log_checkpoint.py); no checkpoint runs in the loop.
- AUTOINCREMENT rewrote the sqlite_sequence page in every commit: schema 3 drops
  it and keeps seq growing by never deleting the newest row (20 -> 13 us a commit).
- A lone tracker takes its files with ``locking_mode=EXCLUSIVE``: the WAL index
  lives in this process's memory, with no -shm file and no lock calls per commit.
  Workers (``shared``) keep the normal mode, one file, and SQLite's own
  checkpoints, and queue on a lock of their own.
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import os
import sqlite3
import sys
import time
from operator import itemgetter
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Sequence

from nattool.errors import LimitError, ProtocolError, StoreError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import (
    KeepaliveLane,
    Member,
    Registration,
    RegisterResult,
    Store,
    StoreLimits,
    StoreStats,
    TrackerRecord,
)
from nattool.store.log_checkpoint import LogCheckpointer
from nattool.store.memory import MemberIndex, TrackerTable, expire_in_steps

# 2: a row holds every member one batch registered at one instant (was: one member)
# 3: the log's seq is a plain rowid (was AUTOINCREMENT, which wrote a second page,
#    sqlite_sequence, in every commit); compaction keeps the newest row instead, so
#    seq still never goes back
# 4: a lone tracker writes the log to two files in turn (PATH and PATH-log2) and
#    gives every row its seq itself, one more than the largest in either file
SCHEMA_VERSION = 4
# PRAGMA application_id marks the file as ours ("natT"), so that we never migrate
# somebody else's database by mistake.
APPLICATION_ID = 0x6E617454
# Rows deleted per statement when expiring: bounds the time one statement holds the
# loop (and the size of one WAL transaction). A row holds one wake-up's batch, up
# to a few hundred members in several KB of overflow pages: 16 such rows take
# 0.2-0.5 ms to delete.
EXPIRE_BATCH = 16
# Workers' WAL bytes before SQLite checkpoints inside a commit (SQLite's default,
# 1000 pages of 4 KB). 1 MB made each checkpoint shorter, but four times as many of
# them cost more at full load (closed-loop p99 2.2-2.8 ms against 1.5-1.7 ms).
WAL_AUTOCHECKPOINT_BYTES = 4 << 20
# A lone tracker's two log files (log_checkpoint.py): WAL bytes written to one
# before the writer moves to the other, whose checkpoint must be complete by then.
LOG_SWITCH_BYTES = 4 << 20
SECOND_LOG_SUFFIX = "-log2"
# A lone tracker's clean close writes its live members again as the newest rows,
# after a marker row, and deletes every older row: the next start replays one record
# per member instead of one per registration within the TTL. Replay starts afresh at
# the newest marker, so a close cut short (some older rows left in one file or both)
# still loads exactly what the marker's rows hold. A marker's seen is no real time,
# so versions that know no markers take it for a dead row.
SNAPSHOT_SEEN = -1.0
SNAPSHOT_MARK = "snapshot"
SNAPSHOT_CHUNK = 256  # members a snapshot row holds at most (one instant's, as the writer's rows)
# ... and only when the log holds more than this many records per live member: a
# compact log is not worth the time a snapshot adds to the stop (2 s a million).
SNAPSHOT_WORTH = 2
# A keepalive that changes nothing but the member's time is written to the log only
# when it is the member's first in a new period of this fraction of the TTL (30 s of
# the default 120 s); a move or a new LAN list is always written before its reply.
# As ISC Kea's lease cache (cache-threshold, 0.25 by default): a refresh carries no
# new fact, and writing each one made a member that refreshes every few seconds
# cost a commit per refresh. After kill -9 a member's time is at most one period
# old, so a member that falls silent right then expires up to that much early.
REFRESH_PERIOD_OF_TTL = 0.25
# How often a worker looks again for the write lock, and for how long.
WRITER_POLL = 50e-6
WRITER_WAIT = 2.0
_SEP = "\x1f"  # fields; none of them can hold control characters
_REC = "\x1e"  # members within one row (schema 2)

_SCHEMA_V1 = """
CREATE TABLE log (
    seq  INTEGER PRIMARY KEY AUTOINCREMENT,  -- append order; never reused (workers tail it)
    seen REAL NOT NULL,
    rec  TEXT NOT NULL          -- members (RS-separated): group US identity US endpoint US lan US source
);
CREATE TABLE trackers (
    endpoint TEXT PRIMARY KEY,
    expires  REAL NOT NULL
) WITHOUT ROWID;
"""

# version found in the file -> script that brings it to the next version
# (1 -> 2 changes what a row may hold, not the tables: a version 1 row is a row of
# one member. The version still moves, so that an older nattool refuses the file.)
# (2 -> 3 rebuilds the log without AUTOINCREMENT, keeping every seq.)
_MIGRATIONS: dict[int, str] = {
    0: _SCHEMA_V1,
    1: "",
    2: """
CREATE TABLE log_v3 (
    seq  INTEGER PRIMARY KEY,   -- append order; never goes back (workers tail it)
    seen REAL NOT NULL,
    rec  TEXT NOT NULL
);
INSERT INTO log_v3 (seq, seen, rec) SELECT seq, seen, rec FROM log;
DROP TABLE log;
ALTER TABLE log_v3 RENAME TO log;
""",
    3: "",  # the second file is created when a lone tracker first opens the store
}

_APPEND = "INSERT INTO log (seen, rec) VALUES (?, ?)"
_APPEND_SEQ = "INSERT INTO log (seq, seen, rec) VALUES (?, ?, ?)"
_SECOND_LOG_TABLE = """
CREATE TABLE IF NOT EXISTS log (
    seq  INTEGER PRIMARY KEY,   -- shares one sequence with the first file's log
    seen REAL NOT NULL,
    rec  TEXT NOT NULL
)"""
# Dead rows among the oldest ones. Rows are appended in time order, so this
# normally deletes a prefix; after a wall-clock step backwards a live row may sit
# among dead ones and simply stays until it dies too. The newest row always stays:
# a new row's seq is the largest one plus 1, so keeping it keeps seq growing.
_COMPACT = (
    "DELETE FROM log WHERE seq IN (SELECT seq FROM log ORDER BY seq LIMIT ?) AND seen <= ? "
    "AND seq < (SELECT max(seq) FROM log)"
)
# Rows per statement when the checkpointer thread compacts an idle file: it holds
# no loop, but a statement is one transaction and one WAL's worth of pages.
IDLE_COMPACT_BATCH = 1024


def _delete_dead_rows(db: sqlite3.Connection, horizon: float, batch: int, budget: int) -> int:
    """Delete dead rows from the head of one log file, ``batch`` per statement (each
    its own transaction), up to ``budget``; return how many."""
    deleted = 0
    while deleted < budget:
        step = db.execute(_COMPACT, (min(batch, budget - deleted), horizon)).rowcount
        deleted += step
        if step == 0:
            break
    return deleted


def _compact_file(db: sqlite3.Connection, horizon: float) -> int:
    """Every dead row of one log file (the checkpointer thread, on a file the store
    is not writing)."""
    return _delete_dead_rows(db, horizon, IDLE_COMPACT_BATCH, 1 << 62)


def default_sqlite_path() -> Path:
    """Where the tracker keeps its state unless told otherwise."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "nattool" / "tracker.db"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "nattool" / "tracker.db"
    state = os.environ.get("XDG_STATE_HOME")
    # XDG says a relative value is invalid and must be ignored.
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "nattool" / "tracker.db"


def _connect(path: Path, shared: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
    # timeout: how long a lock held by another program may delay the open.
    # Workers wait for the one that migrates the file; a lone tracker only finds
    # the file locked when some other program has it open.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0 if shared else 0.2)
    if not shared:
        # One process per file (the .lock file sees to that), so SQLite may keep
        # the WAL index in this process's memory: no -shm file and no lock calls
        # on it in every commit, 14 us a commit instead of 20 under load. Nothing
        # else can read the file while we serve.
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
    return db


def _rows(members: Sequence[Member]) -> list[tuple[float, str]]:
    """One row per run of members registered at the same instant: normally the
    whole batch (the server stamps one event-loop wake-up with one clock reading)."""
    rows: list[tuple[float, str]] = []
    start, n = 0, len(members)
    while start < n:
        seen = members[start].seen
        end = start + 1
        while end < n and members[end].seen == seen:
            end += 1
        # A member is its fields joined by US, the endpoint as the wire text it
        # already carries (validated when the log is replayed).
        rows.append((seen, _REC.join([
            f"{m.group}{_SEP}{m.identity}{_SEP}{m.endpoint_text}{_SEP}{m.lan_text}{_SEP}{m.source}"
            for m in members[start:end]
        ])))
        start = end
    return rows


def _members(seen: float, rec: str) -> list[Member]:
    """The members of one log row, in the order they registered."""
    return [_member(seen, part) for part in rec.split(_REC)]


def _sibling_members(seen: float, rec: str) -> list[Member]:
    """The members of a row that a sibling worker appended during this run: it
    wrote them from members its own index had accepted, so they are taken as they
    are. Parsing each endpoint again cost a third of a worker's time."""
    return [Member(*part.split(_SEP), seen) for part in rec.split(_REC)]  # type: ignore[call-arg]


def _member(seen: float, rec: str) -> Member:
    fields = rec.split(_SEP)
    if len(fields) != 5:
        raise ProtocolError("bad log record")
    grp, identity, endpoint, lan, source = fields
    return Member(
        group=grp,
        identity=identity,
        endpoint=Endpoint.canonical_text(endpoint),
        lan=lan,
        source=source,
        seen=float(seen),
    )


_FULL_DISK_WAY_OUT = "free space on that disk, give nattool another --store sqlite:PATH, or use --store memory"
# SQLite's primary result codes that say the disk, not the file, is the trouble.
_DISK_TROUBLE = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}


def _way_out(where: Path, exc: sqlite3.Error) -> str:
    """What the operator can do: a damaged file is moved aside, a full or unwritable
    disk is not the file's fault (moving a good file aside would lose its members)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return _FULL_DISK_WAY_OUT
    if code is not None and code & 0xFF in _DISK_TROUBLE:
        return f"check the disk and the permissions of {where.parent}, or use --store memory"
    return f"move it aside (mv '{where}' '{where}.corrupt') or use --store memory"


class _FileLock:
    """One process per database file: two trackers writing one file would each
    serve only their own memory and overwrite each other's rows. The OS drops the
    lock when the process dies, kill -9 included, so it never goes stale."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self.shared = shared  # the workers of one server share the file
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        try:
            fh = open(self.path, "a+", encoding="ascii")
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.path}: {exc.strerror}; "
                "use a writable --store sqlite:PATH, or --store memory"
            ) from None
        try:
            if sys.platform == "win32":
                import msvcrt

                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            else:
                import fcntl

                fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read(32).strip() or "?"
            fh.close()
            raise StoreError(
                f"{self.path.with_suffix('')} is in use by another nattool process "
                f"(pid {holder}); stop it, or give this one its own --store sqlite:PATH"
            ) from None
        if not self.shared:
            try:
                fh.seek(0)
                fh.truncate()
                # Straight to the descriptor: nothing stays buffered for close() to
                # fail on when the disk is full.
                os.write(fh.fileno(), f"{os.getpid()}\n".encode("ascii"))
            except OSError as exc:  # a full disk, most likely
                fh.close()
                raise StoreError(
                    f"cannot write {self.path}: {exc.strerror}; {_FULL_DISK_WAY_OUT}"
                ) from None
        self._fh = fh

    def hold_writer(self) -> None:
        """Wait for the other workers' write transactions (shared mode only).

        SQLite's own busy handler polls with sleeps of 1 ms and more, which caps a
        pair of workers below one; this lock is polled every WRITER_POLL instead,
        and gives up after WRITER_WAIT (a stopped or hung worker must cost a batch
        an error, not stall every worker for good). POSIX record locks are per
        process, so they order the workers without touching the flock that keeps
        other servers out."""
        if self._fh is None or sys.platform == "win32":
            return
        import fcntl

        fd = self._fh.fileno()
        deadline = 0.0
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 1)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            now = time.monotonic()
            if not deadline:
                deadline = now + WRITER_WAIT
            elif now > deadline:
                raise OSError(errno.EAGAIN, f"another worker held the write lock for over {WRITER_WAIT:g} s")
            time.sleep(WRITER_POLL)

    def drop_writer(self) -> None:
        if self._fh is not None and sys.platform != "win32":
            import fcntl

            fcntl.lockf(self._fh.fileno(), fcntl.LOCK_UN, 1, 1)

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops flock/msvcrt locks
            self._fh = None


class SqliteStore(Store):
    """Members and trackers in memory, every batch committed to one SQLite file."""

    kind = "sqlite"

    def __init__(
        self, limits: StoreLimits, path: str | os.PathLike[str] | None = None, *, shared: bool = False
    ) -> None:
        super().__init__(limits)
        # shared: several worker processes (serve --workers) use one file. Each keeps
        # its own index and, inside every write transaction, first applies the rows
        # the others appended since it last looked (it tails the log), so every
        # worker answers from the same member set.
        self.shared = shared
        self._tail_seq = 0
        self.path = Path(path) if path is not None else default_sqlite_path()
        self.index = MemberIndex(limits)
        self.trackers = TrackerTable(limits.max_trackers)
        self._db: sqlite3.Connection | None = None
        # A lone tracker splits the log over two files, "main" (PATH) and "log2"
        # (PATH-log2), each with a connection of its own, and writes them in turn
        # (log_checkpoint.py says why); workers fold a second file's rows into the
        # first when opening and write that one only.
        self._db2: sqlite3.Connection | None = None
        self._active = "main"
        self._log_bytes = 0  # WAL bytes written to the active file, estimated
        self._next_seq = 1
        self._page_size = 4096
        self._checkpointer: LogCheckpointer | None = None
        self.switches = 0
        self._lock = _FileLock(Path(str(self.path) + ".lock"), shared=shared)
        self.commits = 0
        self.commit_seconds = 0.0
        self.write_errors = 0
        self.loaded = 0
        self.bad_rows = 0
        self.appended = 0  # rows appended since the last expire()
        self.compacted = 0
        self.snapshot_seq = 0  # the newest marker row's seq, once loaded or written
        self.log_records = 0  # member records replayed and appended (deleted ones not subtracted)

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        self._open(time.time())

    def _open(self, now: float) -> None:
        where = self.path
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create directory {where.parent}: {exc.strerror}") from None
        self._lock.acquire()
        try:
            db = _connect(where, self.shared)
        except sqlite3.Error as exc:
            self._lock.release()
            raise StoreError(f"cannot open {where}: {exc}; {_way_out(where, exc)}") from None
        second = Path(f"{where}{SECOND_LOG_SUFFIX}")
        db2: sqlite3.Connection | None = None
        try:
            self._check_and_migrate(db)
            self._configure(db)
            second_has_log = second.exists() and self._check_second(db, second)
            if self.shared:
                if second_has_log:
                    self._fold_second(db, second)
            else:
                db2 = self._open_second(second)
            self._db = db
            self._db2 = db2
            self._load(now)
            if db2 is not None:
                self._checkpointer = LogCheckpointer({"main": db, "log2": db2}, _compact_file)
                self._checkpointer.start()
        except sqlite3.DatabaseError as exc:
            self._abandon_open(db, db2)
            if "locked" in str(exc):
                raise StoreError(
                    f"{where} is open in another program (an sqlite3 shell?); close it, "
                    "or give nattool its own --store sqlite:PATH"
                ) from None
            raise StoreError(f"cannot use {where}: {exc}; {_way_out(where, exc)}") from None
        except StoreError:
            self._abandon_open(db, db2)
            raise

    def _abandon_open(self, *connections: sqlite3.Connection | None) -> None:
        """A failed open leaves nothing behind: connections closed, lock released."""
        for conn in connections:
            if conn is not None:
                conn.close()
        self._db = self._db2 = None
        self._lock.release()

    def _configure(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        # A lone tracker's checkpoints run in the checkpointer thread, each file's
        # while the other one is written; SQLite's own is then only a safety net.
        limit = WAL_AUTOCHECKPOINT_BYTES if self.shared else 4 * LOG_SWITCH_BYTES
        db.execute(f"PRAGMA wal_autocheckpoint={limit // self._page_size}")
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute("PRAGMA busy_timeout=2000")

    def _check_second(self, db: sqlite3.Connection, second: Path) -> bool:
        """Refuse a second log file that is not ours, before anything writes to it;
        True if it holds a log table."""
        way_out = f"move it aside (mv '{second}' '{second}.corrupt') or use another --store path"
        attached = False
        try:
            db.execute("ATTACH ? AS log2", (str(second),))
            attached = True
            app_id = db.execute("PRAGMA log2.application_id").fetchone()[0]
            tables = {name for (name,) in db.execute("SELECT name FROM log2.sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as exc:
            if "locked" in str(exc):
                raise  # told as "open in another program"
            raise StoreError(f"cannot use {second} (the second file of the log): {exc}; {way_out}") from None
        finally:
            if attached:
                db.execute("DETACH log2")
        if tables and (app_id != APPLICATION_ID or tables != {"log"}) or app_id not in (0, APPLICATION_ID):
            raise StoreError(f"{second} is not a nattool log file; {way_out}")
        return bool(tables)

    def _open_second(self, second: Path) -> sqlite3.Connection:
        """The log's second file, for a lone tracker: its own connection, so that the
        checkpointer thread can checkpoint it while the loop writes the first."""
        db2 = _connect(second, False)
        try:
            self._configure(db2)
            db2.executescript(
                "BEGIN IMMEDIATE;"
                + _SECOND_LOG_TABLE + ";"
                + f"PRAGMA application_id={APPLICATION_ID};"
                + f"PRAGMA user_version={SCHEMA_VERSION};"
                + "COMMIT;"
            )
        except BaseException:
            db2.close()
            raise
        return db2

    def _fold_second(self, db: sqlite3.Connection, second: Path) -> None:
        """Move a second log file's rows (checked by _check_second) into the first,
        for workers, which write one file. Rows keep their seq; a fold cut short by
        a crash is simply done again (OR IGNORE)."""
        db.execute("ATTACH ? AS log2", (str(second),))
        try:
            db.executescript(
                "BEGIN IMMEDIATE;"
                "INSERT OR IGNORE INTO main.log (seq, seen, rec) SELECT seq, seen, rec FROM log2.log;"
                "DELETE FROM log2.log;"
                "COMMIT;"
            )
        finally:
            db.execute("DETACH log2")

    def _check_and_migrate(self, db: sqlite3.Connection) -> None:
        # Reading the header pragmas is what fails on a file that is not SQLite.
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (version == 0 and tables and app_id == 0):
            raise StoreError(
                f"{self.path} is an SQLite database of another program; "
                "give nattool its own file with --store sqlite:PATH"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, written by a newer nattool "
                f"(this one knows up to {SCHEMA_VERSION}); upgrade nattool or use another "
                "--store path"
            )
        while version < SCHEMA_VERSION:
            # executescript commits first; wrap the step so a crash mid-migration
            # leaves the old version intact.
            db.executescript(
                "BEGIN IMMEDIATE;"
                + _MIGRATIONS[version]
                + f"PRAGMA application_id={APPLICATION_ID};"
                + f"PRAGMA user_version={version + 1};"
                + "COMMIT;"
            )
            version += 1

    def _load(self, now: float) -> None:
        """Replay the live part of the log through the index (replacement and
        evictions come out as they did), bring back unexpired trackers, then
        delete what is dead."""
        db = self._require()
        horizon = now - self.limits.ttl
        index = self.index
        live = "SELECT seq, seen, rec FROM log WHERE seen > ? OR seen = ? ORDER BY seq"
        wanted = (horizon, SNAPSHOT_SEEN)  # live rows, and snapshot markers
        if self._db2 is not None:
            db2 = self._db2
            # Each file is in seq order; together they are one log.
            self._replay(heapq.merge(db.execute(live, wanted), db2.execute(live, wanted), key=itemgetter(0)), now)
            last = "SELECT coalesce(max(seq), 0) FROM log"
            self._next_seq = 1 + max(db.execute(last).fetchone()[0], db2.execute(last).fetchone()[0])
        else:
            self._replay(db.execute(live, wanted), now)
        if self.snapshot_seq:
            # Normally nothing: the close that wrote the marker deleted what came before.
            self._forget_before(self.snapshot_seq)
        for endpoint_text, expires in db.execute(
            "SELECT endpoint, expires FROM trackers WHERE expires > ? ORDER BY expires DESC",
            (now,),
        ):
            try:
                self.trackers.save(TrackerRecord(Endpoint.from_text(endpoint_text), expires))
            except ProtocolError:
                self.bad_rows += 1
        db.execute("DELETE FROM trackers WHERE expires <= ?", (now,))
        self._compact(horizon, 1 << 62)
        self.loaded = len(index)

    async def close(self) -> None:
        if self._db is not None:
            self.commit_now()  # best effort: nothing pending was acknowledged yet
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db2 is not None and self.log_records > SNAPSHOT_WORTH * len(self.index):
            # A lone tracker: nobody else reads the log, and nothing writes it now.
            self._write_snapshot()
        for db in (self._db, self._db2):
            if db is None:
                continue
            try:
                # A clean close folds the WAL back into the database file.
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is still valid; the next open replays it
            db.close()
        self._db = self._db2 = None
        self._lock.release()

    def _write_snapshot(self) -> None:
        """The marker row and every member in the index, oldest first, in one
        transaction; then delete the rows before the marker. Best effort: if the
        first step fails the log stays as it was, if the second does the next open
        finishes it."""
        db = self._require()
        first = self._next_seq
        members = self.index.oldest_first()

        def rows() -> Iterator[tuple[int, float, str]]:
            yield first, SNAPSHOT_SEEN, SNAPSHOT_MARK
            seq = first
            for start in range(0, len(members), SNAPSHOT_CHUNK):
                for seen, rec in _rows(members[start : start + SNAPSHOT_CHUNK]):
                    seq += 1
                    yield seq, seen, rec

        try:
            self._in_transaction(db, _APPEND_SEQ, rows())
            self.snapshot_seq = first
            self._forget_before(first)
        except sqlite3.Error:
            self.write_errors += 1

    def _forget_before(self, seq: int) -> None:
        for db in (self._require(), self._db2):
            if db is not None:
                db.execute("DELETE FROM log WHERE seq < ?", (seq,))

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("sqlite store used before open()")
        return self._db

    # -- members -----------------------------------------------------------------
    supports_sync = True

    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        return self.register_now(batch, now)

    def register_now(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        if self.shared:
            return self._register_shared(batch, now)
        # Evictions need no write: replaying the log evicts the same members.
        results, written, _evicted = self.index.register_batch(batch, now)
        error = self._append(written) if written else None
        if error is not None:
            # Nothing of this batch is durable: refuse every entry rather than
            # acknowledge what a restart would forget. The index keeps them; they
            # are soft state and the nodes re-register.
            return [error if not isinstance(r, Exception) else r for r in results]
        return results

    def keepalive_lane(self) -> KeepaliveLane | None:
        if self.shared:
            # A worker applies nothing before catching up with the others' rows,
            # inside its write transaction: no lane outside it.
            return None
        self.index.start_journal(self.limits.ttl * REFRESH_PERIOD_OF_TTL)
        return self.index.keepalive

    def commit_now(self) -> StoreError | None:
        journal = self.index.journal
        if not journal:
            return None
        written = journal.copy()
        journal.clear()
        return self._append(written)

    def _append(self, written: Sequence[Member]) -> StoreError | None:
        """Commit ``written`` to the log; the error, counted, instead of raising it."""
        try:
            self._commit(written)
        except (sqlite3.Error, StoreError) as exc:
            self.write_errors += 1
            self.index.journal_lost(written)  # its keepalives are refused while writes fail
            return StoreError(f"cannot write {self.path}: {exc}")
        return None

    def _register_shared(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        """Catch up with the other workers, apply the batch, append it: all inside one
        write transaction, so no other worker's rows can slip in between."""
        db = self._require()
        started = time.perf_counter()
        try:
            self._lock.hold_writer()
            db.execute("BEGIN IMMEDIATE")
        except (OSError, sqlite3.Error) as exc:
            self._lock.drop_writer()
            self.write_errors += 1
            return [StoreError(f"cannot write {self.path}: {exc}")] * len(batch)
        try:
            self._catch_up(db, now)
            results, written, _evicted = self.index.register_batch(batch, now)
            if written:
                rows = _rows(written)
                db.executemany(_APPEND, rows)
                self._tail_seq = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                self.appended += len(rows)
            db.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self.write_errors += 1
            error = StoreError(f"cannot write {self.path}: {exc}")
            return [error] * len(batch)
        finally:
            self._lock.drop_writer()
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started
        return results

    def _catch_up(self, db: sqlite3.Connection, now: float) -> None:
        rows = db.execute("SELECT seq, seen, rec FROM log WHERE seq > ? ORDER BY seq", (self._tail_seq,)).fetchall()
        self._replay(rows, now, _sibling_members)

    def _replay(
        self, rows: Iterable[tuple[int, float, str]], now: float, members_of: Callable[[float, str], list[Member]] = _members
    ) -> None:
        """Apply log rows to the index in append order (which reproduces replacement
        by identity and group evictions), and move the tail past them."""
        horizon = now - self.limits.ttl
        index = self.index
        for seq, seen, rec in rows:
            self._tail_seq = seq
            if seen == SNAPSHOT_SEEN:
                # Every member live at a clean close follows: what came before is history.
                index.clear()
                self.snapshot_seq = seq
                self.log_records = 0
                continue
            if seen <= horizon:
                continue
            try:
                members = members_of(seen, rec)
            except (ProtocolError, ValueError, TypeError):
                # Not a record we write: count it, serve nothing made up, and
                # leave the row alone until it is older than the TTL.
                self.bad_rows += 1
                continue
            self.log_records += len(members)
            for member in members:
                try:
                    index.upsert(member, now)
                except LimitError:  # the caps were lowered since the row was written
                    continue

    def _commit(self, written: Sequence[Member]) -> None:
        db = self._log_connection(self._active)
        started = time.perf_counter()
        rows = _rows(written)
        if self._db2 is not None:
            seq = self._next_seq
            if len(rows) == 1:
                db.execute(_APPEND_SEQ, (seq, *rows[0]))
            else:
                self._in_transaction(db, _APPEND_SEQ, [(seq + i, *row) for i, row in enumerate(rows)])
            self._next_seq = seq + len(rows)
            self._after_split_commit(rows)
        elif len(rows) == 1:
            # The usual case (one instant per wake-up): a lone INSERT is its own
            # transaction, one statement instead of three.
            db.execute(_APPEND, rows[0])
        else:
            self._in_transaction(db, _APPEND, rows)
        self.appended += len(rows)
        self.log_records += len(written)
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started

    @staticmethod
    def _in_transaction(db: sqlite3.Connection, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        db.execute("BEGIN")
        try:
            db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _after_split_commit(self, rows: list[tuple[float, str]]) -> None:
        """Count what the commit put in the active file's WAL (a frame a page, the
        row's page at least), and move to the other file once that is enough and
        the other file's checkpoint is complete."""
        page = self._page_size
        self._log_bytes += sum((1 + len(rec) // page) * (page + 24) for _, rec in rows)
        checkpointer = self._checkpointer
        if self._log_bytes < LOG_SWITCH_BYTES or checkpointer is None:
            return
        other = "log2" if self._active == "main" else "main"
        if checkpointer.ready(other):
            # The thread deletes the dead rows of the file left, off the loop.
            checkpointer.request(self._active, rows[-1][0] - self.limits.ttl)
            self._active = other
            self._log_bytes = 0
            self.switches += 1

    async def expire(self, now: float) -> int:
        gone = await expire_in_steps(self.index, now)
        # Keep pace with the appends: delete up to twice what was appended since
        # the last call, and at least one batch, one bounded statement at a time.
        # Between statements the loop gets control back.
        budget = max(EXPIRE_BATCH, 2 * self.appended)
        self.appended = 0
        horizon = now - self.limits.ttl
        deleted = 0
        try:
            while deleted < budget:
                step = self._compact(horizon, min(EXPIRE_BATCH, budget - deleted))
                deleted += step
                if step < EXPIRE_BATCH:
                    break
                await asyncio.sleep(0)
        except sqlite3.Error as exc:
            self.write_errors += 1
            raise StoreError(f"cannot compact {self.path}: {exc}") from None
        return gone

    def _compact(self, horizon: float, budget: int) -> int:
        """Delete dead log rows, EXPIRE_BATCH per statement, up to ``budget``.

        While a split log is served, nothing here: the checkpointer thread deletes
        a file's dead rows when the writer leaves it (a write to the file being
        written would also make its WAL outgrow the estimate that decides the
        switch). Opening compacts both files, before the thread starts."""
        if self._checkpointer is not None:
            return 0
        deleted = 0
        for db in (self._require(), self._db2):
            if db is not None:
                deleted += _delete_dead_rows(db, horizon, EXPIRE_BATCH, budget - deleted)
        self.compacted += deleted
        return deleted

    def _log_connection(self, name: str) -> sqlite3.Connection:
        if name == "log2" and self._db2 is not None:
            return self._db2
        return self._require()

    # -- trackers ----------------------------------------------------------------
    async def save_tracker(self, record: TrackerRecord) -> None:
        if not self.trackers.save(record):
            return
        try:
            self._require().execute(
                "INSERT INTO trackers (endpoint, expires) VALUES (?, ?) "
                "ON CONFLICT (endpoint) DO UPDATE SET expires = excluded.expires",
                (record.endpoint.to_text(), record.expires),
            )
        except sqlite3.Error as exc:
            self.write_errors += 1
            raise StoreError(f"cannot write {self.path}: {exc}") from None

    async def drop_tracker(self, endpoint: Endpoint) -> None:
        self.trackers.drop(endpoint)
        try:
            self._require().execute(
                "DELETE FROM trackers WHERE endpoint = ?", (endpoint.to_text(),)
            )
        except sqlite3.Error as exc:
            self.write_errors += 1
            raise StoreError(f"cannot write {self.path}: {exc}") from None

    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        if self.shared:
            # Another worker may have verified a tracker: the file is the truth.
            try:
                rows = self._require().execute(
                    "SELECT endpoint, expires FROM trackers WHERE expires > ? ORDER BY expires DESC", (now,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read {self.path}: {exc}") from None
            for endpoint_text, expires in rows:
                try:
                    self.trackers.save(TrackerRecord(Endpoint.from_text(endpoint_text), expires))
                except ProtocolError:
                    self.bad_rows += 1
        return self.trackers.load(now)

    async def stats(self) -> StoreStats:
        return StoreStats(
            groups=self.index.group_count,
            members=len(self.index),
            trackers=len(self.trackers),
            extra={
                "commits": float(self.commits),
                "commit_seconds": self.commit_seconds,
                "write_errors": float(self.write_errors),
                "loaded": float(self.loaded),
                "bad_rows": float(self.bad_rows),
                "compacted_rows": float(self.compacted + (self._checkpointer.compacted if self._checkpointer else 0)),
            },
        )


__all__ = ["SCHEMA_VERSION", "SqliteStore", "default_sqlite_path"]
