"""The embedded default store: reads from memory, writes to SQLite (WAL).

Every read is served by the same :class:`MemberIndex` as the memory store, so the
hot path never waits on a query. Each ``register()`` batch (everything one event
loop turn received) is written as ONE transaction: group commit. With
``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is a ``write()`` into the
WAL file with no fsync, so a committed batch survives ``kill -9`` of the process
(the data sit in the kernel's page cache); only a power loss can take the last
few commits, which soft state with a TTL of two minutes tolerates.

The commit runs in the event-loop thread: it costs tens of microseconds (measured
by benchmarks/store_bench.py), less than a hop to a worker thread and back, and it
keeps the write order trivially equal to the order of the batches. What does
fsync -- the WAL checkpoint -- is moved out of the loop: automatic checkpoints
are raised to a large backstop and ``expire()`` runs a PASSIVE checkpoint on a
second connection in a worker thread about once a second.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import IO, Iterable, Sequence

from nattool.errors import LimitError, ProtocolError, StoreError
from nattool.protocol.endpoint import Endpoint
from nattool.store.base import (
    Member,
    Registration,
    RegisterResult,
    Store,
    StoreLimits,
    StoreStats,
    TrackerRecord,
)
from nattool.store.memory import MemberIndex, TrackerTable

SCHEMA_VERSION = 1
# PRAGMA application_id marks the file as ours ("natT"), so that we never migrate
# somebody else's database by mistake.
APPLICATION_ID = 0x6E617454
# Rows deleted per statement when expiring: bounds the time one expire() holds the
# loop (and the size of one WAL transaction).
EXPIRE_BATCH = 2000
# Pages in the WAL before SQLite checkpoints inside a commit (fsync in the loop).
# Normally the background checkpoint keeps the WAL far below this; it only bounds
# the file when the checkpoint thread falls behind.
WAL_BACKSTOP_PAGES = 16384
CHECKPOINT_INTERVAL = 1.0
_LAN_SEP = "\x1f"  # LAN addresses never contain control characters

_SCHEMA_V1 = """
CREATE TABLE members (
    grp      TEXT NOT NULL,
    identity TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    lan      TEXT NOT NULL,
    source   TEXT NOT NULL,
    seen     REAL NOT NULL,
    PRIMARY KEY (grp, identity)
) WITHOUT ROWID;
CREATE INDEX members_seen ON members (seen);
CREATE TABLE trackers (
    endpoint TEXT PRIMARY KEY,
    expires  REAL NOT NULL
) WITHOUT ROWID;
"""

# version found in the file -> script that brings it to the next version
_MIGRATIONS: dict[int, str] = {0: _SCHEMA_V1}

_UPSERT = (
    "INSERT INTO members (grp, identity, endpoint, lan, source, seen) "
    "VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (grp, identity) DO UPDATE SET endpoint = excluded.endpoint, "
    "lan = excluded.lan, source = excluded.source, seen = excluded.seen"
)
_DELETE = "DELETE FROM members WHERE grp = ? AND identity = ?"
_EXPIRE = (
    "DELETE FROM members WHERE (grp, identity) IN "
    "(SELECT grp, identity FROM members WHERE seen <= ? LIMIT ?)"
)


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


def _row(member: Member) -> tuple[str, str, str, str, str, float]:
    return (
        member.group,
        member.identity,
        member.endpoint.to_text(),
        _LAN_SEP.join(member.lan),
        member.source,
        member.seen,
    )


def _member(row: tuple[str, str, str, str, str, float]) -> Member:
    grp, identity, endpoint, lan, source, seen = row
    return Member(
        group=grp,
        identity=identity,
        endpoint=Endpoint.from_text(endpoint),
        lan=tuple(lan.split(_LAN_SEP)) if lan else (),
        source=source,
        seen=float(seen),
    )


class _FileLock:
    """One process per database file: two trackers writing one file would each
    serve only their own memory and overwrite each other's rows. The OS drops the
    lock when the process dies, kill -9 included, so it never goes stale."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+", encoding="ascii")
        try:
            if sys.platform == "win32":
                import msvcrt

                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
            else:
                import fcntl

                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read(32).strip() or "?"
            fh.close()
            raise StoreError(
                f"{self.path.with_suffix('')} is in use by another nattool process "
                f"(pid {holder}); stop it, or give this one its own --store sqlite:PATH"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()  # closing drops flock/msvcrt locks
            self._fh = None


class SqliteStore(Store):
    """Members and trackers in memory, every batch committed to one SQLite file."""

    kind = "sqlite"

    def __init__(self, limits: StoreLimits, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(limits)
        self.path = Path(path) if path is not None else default_sqlite_path()
        self.index = MemberIndex(limits)
        self.trackers = TrackerTable(limits.max_trackers)
        self._db: sqlite3.Connection | None = None
        self._lock = _FileLock(Path(str(self.path) + ".lock"))
        self._last_checkpoint = 0.0
        self._checkpointing: asyncio.Future[None] | None = None
        self.commits = 0
        self.commit_seconds = 0.0
        self.write_errors = 0
        self.loaded = 0

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    # -- lifecycle ---------------------------------------------------------------
    async def open(self) -> None:
        self._open(time.time())

    def _open(self, now: float) -> None:
        where = self.path
        way_out = f"move it aside (mv '{where}' '{where}.corrupt') or use --store memory"
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create directory {where.parent}: {exc.strerror}") from None
        self._lock.acquire()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, one per batch.
            db = sqlite3.connect(where, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            self._lock.release()
            raise StoreError(f"cannot open {where}: {exc}; {way_out}") from None
        try:
            self._check_and_migrate(db)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
            db.execute("PRAGMA journal_size_limit=67108864")
            db.execute("PRAGMA busy_timeout=2000")
            self._db = db
            self._load(now)
        except sqlite3.DatabaseError as exc:
            db.close()
            self._db = None
            self._lock.release()
            raise StoreError(f"cannot use {where}: {exc}; {way_out}") from None
        except StoreError:
            db.close()
            self._db = None
            self._lock.release()
            raise

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
        """Bring back every unexpired member and tracker, oldest first (so that
        the index's age order matches), then drop what has expired."""
        db = self._require()
        horizon = now - self.limits.ttl
        evicted: list[Member] = []
        refused: list[tuple[str, str]] = []
        cursor = db.execute(
            "SELECT grp, identity, endpoint, lan, source, seen FROM members "
            "WHERE seen > ? ORDER BY seen",
            (horizon,),
        )
        for row in cursor:
            try:
                member = _member(row)
            except ProtocolError:
                # A row we cannot parse was not written by us; keep it out of the
                # index but leave it for expiry rather than guessing.
                refused.append((row[0], row[1]))
                continue
            try:
                gone = self.index.upsert(member, now)
            except LimitError:  # the caps were lowered since the row was written
                refused.append((member.group, member.identity))
                continue
            if gone is not None:
                evicted.append(gone)
            self.loaded += 1
        for endpoint_text, expires in db.execute(
            "SELECT endpoint, expires FROM trackers WHERE expires > ? ORDER BY expires DESC",
            (now,),
        ):
            try:
                self.trackers.save(TrackerRecord(Endpoint.from_text(endpoint_text), expires))
            except ProtocolError:
                continue
        db.execute("BEGIN")
        db.executemany(_DELETE, [(m.group, m.identity) for m in evicted] + refused)
        db.execute("DELETE FROM trackers WHERE expires <= ?", (now,))
        db.execute("COMMIT")
        while self._delete_expired(horizon) == EXPIRE_BATCH:
            pass

    async def close(self) -> None:
        if self._checkpointing is not None:
            await asyncio.shield(self._checkpointing)
        if self._db is not None:
            try:
                # A clean close folds the WAL back into the database file.
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL is still valid; the next open replays it
            self._db.close()
            self._db = None
        self._lock.release()

    def _require(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("sqlite store used before open()")
        return self._db

    # -- members -----------------------------------------------------------------
    async def register(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        results, written, evicted = self.index.register_batch(batch, now)
        if not written and not evicted:
            return results
        try:
            self._commit(written, evicted)
        except (sqlite3.Error, StoreError) as exc:
            self.write_errors += 1
            # Nothing of this batch is durable: refuse every entry rather than
            # acknowledge what a restart would forget. The index keeps them; they
            # are soft state and the nodes re-register.
            error = StoreError(f"cannot write {self.path}: {exc}")
            return [error if not isinstance(r, Exception) else r for r in results]
        return results

    def _commit(self, written: Iterable[Member], evicted: Sequence[Member]) -> None:
        db = self._require()
        started = time.perf_counter()
        db.execute("BEGIN")
        try:
            if evicted:
                db.executemany(_DELETE, [(m.group, m.identity) for m in evicted])
            db.executemany(_UPSERT, map(_row, written))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started

    async def expire(self, now: float) -> int:
        gone = self.index.expire(now, EXPIRE_BATCH * 4)
        try:
            self._delete_expired(now - self.limits.ttl)
        except sqlite3.Error as exc:
            self.write_errors += 1
            raise StoreError(f"cannot expire rows in {self.path}: {exc}") from None
        self._maybe_checkpoint()
        return len(gone)

    def _delete_expired(self, horizon: float) -> int:
        """Delete one bounded batch of expired rows; return how many went."""
        db = self._require()
        return db.execute(_EXPIRE, (horizon, EXPIRE_BATCH)).rowcount

    def _maybe_checkpoint(self) -> None:
        clock = time.monotonic()
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        if clock - self._last_checkpoint < CHECKPOINT_INTERVAL:
            return
        self._last_checkpoint = clock
        loop = asyncio.get_running_loop()
        self._checkpointing = loop.run_in_executor(None, _checkpoint, str(self.path))

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
            },
        )


def _checkpoint(path: str) -> None:
    """Copy WAL pages into the database file (this is where the fsyncs are), on
    its own connection in a worker thread so the event loop never waits for the
    disk. PASSIVE never blocks the loop's writer."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=0.5)
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            db.close()
    except sqlite3.Error:
        pass  # the backstop autocheckpoint still bounds the WAL


__all__ = ["SCHEMA_VERSION", "SqliteStore", "default_sqlite_path"]
