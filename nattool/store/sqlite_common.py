"""What the two SQLite stores share: reads from memory, writes to an SQLite log.

Every read is served by the same :class:`MemberIndex` as the memory store, so the
hot path never waits on a query. Each ``register()`` batch (everything one event
loop turn received) is written as ONE transaction: group commit.

The file is an append-only log of registrations, not a table updated in place:
appending to the end of a rowid b-tree costs about 1 us a row, an upsert into a
(group, identity) table with a ``seen`` index 15-25 us (benchmarks/store_bench.py
measures this). A row holds every member that one batch registered at one instant
(the server stamps a whole event-loop wake-up with one clock reading), so a commit
inserts one row, not one per registration (sqlite_codec.py). Opening replays the
log through the same index, which reproduces replacement by identity and group
evictions. Compaction is trivial because of soft state: a row whose ``seen`` is
older than the TTL is dead -- its member either expired or registered again
since, in a later row -- so dead rows are deleted from the head of the log. The
log holds about (registration rate x TTL) rows. With ``journal_mode=WAL`` and
``synchronous=NORMAL`` a commit is a ``write()`` into the WAL file with no fsync,
so a committed batch survives ``kill -9`` of the process (the data sit in the
kernel's page cache); only a power loss can take the commits since a file's last
checkpoint (at most a few MB of WAL, under a second under load), which soft state
with a TTL of two minutes tolerates.

The commit runs in the event-loop thread. Measured with benchmarks/store_bench.py,
a hop to a worker thread and back costs more than the commit itself (batches of
one: ~10k registrations/s through a thread vs ~47k in the loop), and staying in
one thread keeps the write order equal to the batch order for free.

Two stores fill this: a lone tracker's (sqlite_lone.py: one process, the log in
two files written in turn, checkpoints in a thread) and the workers' of
``serve --workers N`` (sqlite_shared.py: several processes, one file). The files
hold members' addresses: they are created readable by their owner only.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from nattool.errors import LimitError, ProtocolError, StoreError, StoreLocked
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import Member, Registration, RegisterResult, Store, StoreLimits, StoreStats, TrackerRecord
from nattool.store.filelock import FULL_DISK_WAY_OUT, PRIVATE_FILE_MODE, FileLock
from nattool.store.memory import MemberIndex, TrackerTable
from nattool.store.sqlite_codec import SNAPSHOT_SEEN, decode_row
from nattool.store.sqlite_schema import check_and_migrate, delete_dead_rows, is_busy

# Rows deleted per statement when compacting in the loop: bounds the time one
# statement holds the loop (and the size of one WAL transaction). A row holds one
# wake-up's batch, up to a few hundred members in several KB of overflow pages: 16
# such rows take 0.2-0.5 ms to delete.
EXPIRE_BATCH = 16
# The state directory, when the store creates it: its owner's only.
PRIVATE_DIR_MODE = 0o700
StorePath = Union[str, "os.PathLike[str]", None]  # None: default_sqlite_path()
# SQLite's primary result codes that say the disk, not the file, is the trouble.
_DISK_TROUBLE = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM}


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


def _way_out(where: Path, exc: sqlite3.Error) -> str:
    """What the operator can do: a damaged file is moved aside, a full or unwritable
    disk is not the file's fault (moving a good file aside would lose its members)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
        return FULL_DISK_WAY_OUT
    if code is not None and code & 0xFF in _DISK_TROUBLE:
        return f"check the disk and the permissions of {where.parent}, or use --store memory"
    return f"move it aside (mv '{where}' '{where}.corrupt') or use --store memory"


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty and readable by its owner only, unless it exists (an
    empty file is an empty database to SQLite, which gives the WAL and -shm files
    it creates later the database file's mode). True if this created it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    except OSError as exc:
        raise StoreError(
            f"cannot create {path}: {exc.strerror}; check the permissions of {path.parent}, or use --store memory"
        ) from None
    os.close(fd)
    return True


class SqliteStore(Store):
    """Members and trackers in memory, every batch committed to an SQLite log.

    ``SqliteStore(limits, path, shared=...)`` builds the store for the job: a
    :class:`~nattool.store.sqlite_lone.LoneSqliteStore`, or with ``shared`` (serve
    --workers) a :class:`~nattool.store.sqlite_shared.SharedSqliteStore`.
    """

    kind = "sqlite"
    supports_sync = True
    #: a store that held nothing at its close removes the files and directories
    #: its open created (a server that failed to bind leaves nothing behind)
    removes_unused_files = False

    def __new__(cls, limits: StoreLimits, path: StorePath = None, *, shared: bool = False) -> Any:
        if cls is SqliteStore:
            from nattool.store.sqlite_lone import LoneSqliteStore
            from nattool.store.sqlite_shared import SharedSqliteStore

            cls = SharedSqliteStore if shared else LoneSqliteStore
        return super().__new__(cls)

    def __init__(self, limits: StoreLimits, path: StorePath = None, *, shared: bool = False) -> None:
        # ``shared`` picked the class (__new__); the class says what it is.
        super().__init__(limits)
        self.path = Path(path) if path is not None else default_sqlite_path()
        self.index = MemberIndex(limits)
        self.trackers = TrackerTable(limits.max_trackers)
        self._db: sqlite3.Connection | None = None
        self._page_size = 4096
        self._tail_seq = 0  # the newest row replayed or appended
        self._lock = FileLock(Path(str(self.path) + ".lock"), shared=self.shared)
        # What the last open created, for _remove_created: files, and directories deepest first.
        self._created_files: list[Path] = []
        self._created_dirs: list[Path] = []
        self.commits = 0
        self.commit_seconds = 0.0
        self.write_errors = 0
        self.loaded = 0
        self.bad_rows = 0
        self.compacted = 0
        self.snapshot_seq = 0  # the newest marker row's seq, once loaded or written
        self.log_records = 0  # member records replayed and appended (deleted ones not subtracted)

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # -- what each store does its own way ---------------------------------------------
    #: SQLite's exclusive locking mode (one process on the file) and how long an
    #: open waits for a lock held elsewhere
    _exclusive = False
    _open_timeout = 5.0

    def _autocheckpoint_bytes(self) -> int:
        raise NotImplementedError

    def _open_log_files(self, db: sqlite3.Connection) -> None:
        """After the first file is checked and migrated: the rest of the log."""

    def _replay_log(self, now: float, horizon: float) -> None:
        self._replay(live_rows(self._require(), horizon), now)

    def _log_files(self) -> list[sqlite3.Connection]:
        """The open connections, the first file's first."""
        return [self._db] if self._db is not None else []

    def _forget_connections(self) -> None:
        self._db = None

    def _finish_writing(self) -> None:
        """At close, before the files are checkpointed and closed."""

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        self._open(time.time())

    def _open(self, now: float) -> None:
        where = self.path
        self._created_files = []
        self._created_dirs = self._make_directory(where.parent)
        try:
            self._lock.acquire()
        except StoreError:
            self._remove_created()
            raise
        if self._lock.created:
            self._created_files.append(self._lock.path)
        try:
            self._create_file(where)
            db = connect(where, self._exclusive, self._open_timeout)
        except sqlite3.Error as exc:
            self._abandon_open()
            raise StoreError(f"cannot open {where}: {exc}; {_way_out(where, exc)}") from None
        except StoreError:
            self._abandon_open()
            raise
        self._db = db
        try:
            check_and_migrate(db, where)
            self._configure(db)
            self._open_log_files(db)
            self._load(now)
        except sqlite3.DatabaseError as exc:
            self._abandon_open()
            if is_busy(exc):
                raise StoreLocked(
                    f"{where} is open in another program (an sqlite3 shell?); close it, "
                    "or give nattool its own --store sqlite:PATH"
                ) from None
            raise StoreError(f"cannot use {where}: {exc}; {_way_out(where, exc)}") from None
        except StoreError:
            self._abandon_open()
            raise

    def _make_directory(self, directory: Path) -> list[Path]:
        """Create the state directory (its owner's only) and any missing parent;
        return what was created, deepest first."""
        missing = []
        for parent in (directory, *directory.parents):
            if parent.exists():
                break
            missing.append(parent)
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create directory {directory}: {exc.strerror}") from None
        return missing

    def _create_file(self, path: Path) -> None:
        """Create a file of the log (0600) unless it exists, and note it (with the
        files SQLite may add beside it) for :meth:`_remove_created`."""
        if create_private_file(path):
            self._created_files += [path, Path(f"{path}-wal"), Path(f"{path}-shm")]

    def _abandon_open(self) -> None:
        """A failed open leaves nothing behind: connections closed, files it
        created removed, lock released."""
        for db in self._log_files():
            db.close()
        self._forget_connections()
        self._remove_created()
        self._lock.release()

    def _remove_created(self) -> None:
        try:
            for path in self._created_files:
                path.unlink(missing_ok=True)
            for directory in self._created_dirs:
                directory.rmdir()  # only if empty: never someone else's files
        except OSError:
            pass  # a directory that is not empty: its parents are not either
        self._created_files, self._created_dirs = [], []

    def _configure(self, db: sqlite3.Connection) -> None:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint={self._autocheckpoint_bytes() // self._page_size}")
        db.execute("PRAGMA journal_size_limit=67108864")
        db.execute("PRAGMA busy_timeout=2000")

    def _load(self, now: float) -> None:
        """Replay the live part of the log through the index (replacement and
        evictions come out as they did), bring back unexpired trackers, then
        delete what is dead."""
        db = self._require()
        horizon = now - self.limits.ttl
        self._replay_log(now, horizon)
        if self.snapshot_seq:
            # Normally nothing: the close that wrote the marker deleted what came before.
            self._forget_before(self.snapshot_seq)
        self._read_trackers(now)
        db.execute("DELETE FROM trackers WHERE expires <= ?", (now,))
        self._compact_files(horizon, 1 << 62)
        self.loaded = len(self.index)

    def _forget_before(self, seq: int) -> None:
        for db in self._log_files():
            db.execute("DELETE FROM log WHERE seq < ?", (seq,))

    def _compact_files(self, horizon: float, budget: int) -> int:
        """Delete dead log rows, EXPIRE_BATCH per statement, up to ``budget``."""
        deleted = 0
        for db in self._log_files():
            deleted += delete_dead_rows(db, horizon, EXPIRE_BATCH, budget - deleted)
        self.compacted += deleted
        return deleted

    def _read_trackers(self, now: float) -> None:
        rows = self._require().execute(
            "SELECT endpoint, expires FROM trackers WHERE expires > ? ORDER BY expires DESC", (now,)
        ).fetchall()
        for endpoint_text, expires in rows:
            try:
                self.trackers.save(TrackerRecord(Endpoint.from_text(endpoint_text), expires))
            except ProtocolError:
                self.bad_rows += 1

    def _replay(
        self, rows: Iterable[tuple[int, float, str]], now: float, members_of: Callable[[float, str], list[Member]] = decode_row
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

    async def close(self) -> None:
        self._finish_writing()
        unused = self.removes_unused_files and bool(self._created_files) and self._holds_nothing()
        for db in self._log_files():
            try:
                # A clean close folds the WAL back into the database file.
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is still valid; the next open replays it
            db.close()
        self._forget_connections()
        if unused:
            self._remove_created()  # while the lock is still held
        self._lock.release()

    def _holds_nothing(self) -> bool:
        """No log row and no tracker in any file (False when that cannot be read)."""
        try:
            return not any(
                db.execute("SELECT EXISTS (SELECT 1 FROM log)").fetchone()[0] for db in self._log_files()
            ) and not self._require().execute("SELECT EXISTS (SELECT 1 FROM trackers)").fetchone()[0]
        except (sqlite3.Error, StoreError):
            return False

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("sqlite store used before open()")
        return self._db

    def _write_error(self, exc: Exception) -> StoreError:
        """A failed write, counted."""
        self.write_errors += 1
        return StoreError(f"cannot write {self.path}: {exc}")

    # -- members -----------------------------------------------------------------
    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        return self.register_now(batch, now)

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
            raise self._write_error(exc) from None

    async def drop_tracker(self, endpoint: Endpoint) -> None:
        self.trackers.drop(endpoint)
        try:
            self._require().execute("DELETE FROM trackers WHERE endpoint = ?", (endpoint.to_text(),))
        except sqlite3.Error as exc:
            raise self._write_error(exc) from None

    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        return self.trackers.load(now)

    def _compacted_rows(self) -> int:
        return self.compacted

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
                "compacted_rows": float(self._compacted_rows()),
            },
        )


def live_rows(db: sqlite3.Connection, horizon: float) -> sqlite3.Cursor:
    """One file's log rows still live at ``horizon``, and its snapshot markers, in order."""
    return db.execute(
        "SELECT seq, seen, rec FROM log WHERE seen > ? OR seen = ? ORDER BY seq", (horizon, SNAPSHOT_SEEN)
    )


def connect(path: Path, exclusive: bool, timeout: float) -> sqlite3.Connection:
    """A connection to one file of the log.

    isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
    ``timeout``: how long a lock held by another program may delay the open.
    ``exclusive``: one process per file (the .lock file sees to that), so SQLite
    may keep the WAL index in this process's memory: no -shm file and no lock
    calls on it in every commit, 14 us a commit instead of 20 under load. Nothing
    else can read the file while we serve.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=timeout)
    if exclusive:
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
    return db


__all__ = [
    "EXPIRE_BATCH",
    "SqliteStore",
    "StorePath",
    "connect",
    "create_private_file",
    "default_sqlite_path",
    "live_rows",
]
