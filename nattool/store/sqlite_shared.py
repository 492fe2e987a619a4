"""The SQLite store of ``serve --workers N``: several processes share one file.

Each worker keeps its own index and, inside every write transaction, first applies
the rows the others appended since it last looked (it tails the log), so every
worker answers from the same member set. Workers keep SQLite's normal locking mode,
one file and SQLite's own checkpoints, queue for writing on a lock of their own
(filelock.py), and delete dead rows in ``expire()``, in bounded batches.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Sequence

from nattool.errors import StoreError
from nattool.store.base import Registration, RegisterResult, StoreLimits, TrackerRecord
from nattool.store.memory import expire_in_steps
from nattool.store.sqlite_codec import decode_sibling_row, encode_rows
from nattool.store.sqlite_common import EXPIRE_BATCH, SqliteStore, StorePath
from nattool.store.sqlite_schema import APPEND, fold_second_log, second_log_holds_log, second_log_path

# WAL bytes before SQLite checkpoints inside a commit (SQLite's default, 1000 pages
# of 4 KB). 1 MB made each checkpoint shorter, but four times as many of them cost
# more at full load (closed-loop p99 2.2-2.8 ms against 1.5-1.7 ms).
WAL_AUTOCHECKPOINT_BYTES = 4 << 20


class SharedSqliteStore(SqliteStore):
    """One worker's store; the other workers write the same file."""

    #: the server re-reads the tracker list from the store: another worker may
    #: have verified a tracker
    shared = True
    # Workers wait for the one that migrates the file.
    _open_timeout = 5.0

    def __init__(self, limits: StoreLimits, path: StorePath = None, *, shared: bool = True) -> None:
        super().__init__(limits, path)
        self.appended = 0  # rows appended since the last expire()

    def _autocheckpoint_bytes(self) -> int:
        return WAL_AUTOCHECKPOINT_BYTES

    def _open_log_files(self, db: sqlite3.Connection) -> None:
        # A lone tracker's second log file: its rows move into the first, which
        # is the only one workers write.
        second = second_log_path(self.path)
        if second.exists() and second_log_holds_log(db, second):
            fold_second_log(db, second)

    # -- members -----------------------------------------------------------------
    def register_now(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
        """Catch up with the other workers, apply the batch, append it: all inside one
        write transaction, so no other worker's rows can slip in between."""
        db = self._require()
        started = time.perf_counter()
        try:
            self._lock.hold_writer()
            db.execute("BEGIN IMMEDIATE")
        except (OSError, sqlite3.Error) as exc:
            self._lock.drop_writer()
            return [self._write_error(exc)] * len(batch)
        try:
            self._catch_up(db, now)
            results, written, _evicted = self.index.register_batch(batch, now)
            if written:
                rows = encode_rows(written)
                db.executemany(APPEND, rows)
                self._tail_seq = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                self.appended += len(rows)
            db.execute("COMMIT")
        except (sqlite3.Error, StoreError) as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            return [self._write_error(exc)] * len(batch)
        finally:
            self._lock.drop_writer()
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started
        return results

    def keepalive_lane(self) -> None:
        # A worker applies nothing before catching up with the others' rows,
        # inside its write transaction: no lane outside it.
        return None

    def _catch_up(self, db: sqlite3.Connection, now: float) -> None:
        rows = db.execute("SELECT seq, seen, rec FROM log WHERE seq > ? ORDER BY seq", (self._tail_seq,)).fetchall()
        self._replay(rows, now, decode_sibling_row)

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
                step = self._compact_files(horizon, min(EXPIRE_BATCH, budget - deleted))
                deleted += step
                if step < EXPIRE_BATCH:
                    break
                await asyncio.sleep(0)
        except sqlite3.Error as exc:
            self.write_errors += 1
            raise StoreError(f"cannot compact {self.path}: {exc}") from None
        return gone

    # -- trackers ----------------------------------------------------------------
    async def load_trackers(self, now: float) -> list[TrackerRecord]:
        # Another worker may have verified a tracker: the file is the truth.
        try:
            self._read_trackers(now)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read {self.path}: {exc}") from None
        return await super().load_trackers(now)


__all__ = ["WAL_AUTOCHECKPOINT_BYTES", "SharedSqliteStore"]
