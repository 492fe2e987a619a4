"""The SQLite store of a lone tracker: one process, the log in two files.

What made commits cost more than they had to, and what was done about each:

- SQLite checkpoints inside a commit: 1-1.5 ms (fsyncs, mostly) about ten times a
  second under a half-rate registration load, most of the registration p99
  then. A lone tracker splits the log over two files and a thread checkpoints the
  one not being written (log_checkpoint.py); no checkpoint runs in the loop while
  the thread keeps up. When it does not (it runs only on a CPU that has nothing
  better to do), the writer stays on its file and SQLite's own checkpoint, at
  four times the switch size, bounds that file's WAL.
- AUTOINCREMENT rewrote the sqlite_sequence page in every commit: schema 3 drops
  it and keeps seq growing by never deleting the newest row (20 -> 13 us a commit).
- The files are taken with ``locking_mode=EXCLUSIVE``: the WAL index lives in this
  process's memory, with no -shm file and no lock calls per commit.

Dead rows are deleted by the checkpointer thread, from each file when the writer
leaves it; a clean close leaves a snapshot: one record per live member.
"""

from __future__ import annotations

import heapq
import sqlite3
import time
from operator import itemgetter
from typing import Iterable, Iterator, Sequence

from nattool.errors import StoreError
from nattool.store.base import KeepaliveLane, Member, Registration, RegisterResult, StoreLimits
from nattool.store.log_checkpoint import LogCheckpointer
from nattool.store.memory import expire_in_steps
from nattool.store.sqlite_codec import SNAPSHOT_MARK, SNAPSHOT_SEEN, encode_rows
from nattool.store.sqlite_common import SqliteStore, StorePath, connect, live_rows
from nattool.store.sqlite_schema import (
    APPEND_SEQ,
    create_second_log,
    delete_dead_rows,
    second_log_holds_log,
    second_log_path,
)

# WAL bytes written to one file before the writer moves to the other, whose
# checkpoint must be complete by then (log_checkpoint.py).
LOG_SWITCH_BYTES = 4 << 20
# SQLite's own checkpoint, inside a commit, when the thread falls behind: a file's
# WAL stays under this many times LOG_SWITCH_BYTES (plus one commit's frames).
SAFETY_CHECKPOINT_SWITCHES = 4
# A clean close writes the live members again as the newest rows, after a marker
# row, and deletes every older row: the next start replays one record per member
# instead of one per registration within the TTL. Replay starts afresh at the
# newest marker, so a close cut short (some older rows left in one file or both)
# still loads exactly what the marker's rows hold.
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
# Rows per statement when the checkpointer thread compacts an idle file: it holds
# no loop, but a statement is one transaction and one WAL's worth of pages.
IDLE_COMPACT_BATCH = 1024


def compact_idle_file(db: sqlite3.Connection, horizon: float) -> int:
    """Every dead row of one log file (the checkpointer thread, on a file the store
    is not writing)."""
    return delete_dead_rows(db, horizon, IDLE_COMPACT_BATCH, 1 << 62)


class LoneSqliteStore(SqliteStore):
    """A lone tracker's store: the log in two files, "main" (PATH) and "log2"
    (PATH-log2), each with a connection of its own, written in turn while a thread
    checkpoints the other (log_checkpoint.py says why)."""

    removes_unused_files = True
    _exclusive = True
    # The file is locked only when some other program has it open.
    _open_timeout = 0.2

    def __init__(self, limits: StoreLimits, path: StorePath = None, *, shared: bool = False) -> None:
        super().__init__(limits, path)
        self._db2: sqlite3.Connection | None = None
        self._active = "main"
        self._log_bytes = 0  # WAL bytes written to the active file, estimated
        self._next_seq = 1
        self._checkpointer: LogCheckpointer | None = None
        self.switches = 0

    def _autocheckpoint_bytes(self) -> int:
        # The checkpoints run in the checkpointer thread, each file's while the
        # other one is written; SQLite's own is then only a safety net.
        return SAFETY_CHECKPOINT_SWITCHES * LOG_SWITCH_BYTES

    # -- lifecycle ---------------------------------------------------------------
    def _open_log_files(self, db: sqlite3.Connection) -> None:
        second = second_log_path(self.path)
        if second.exists():
            second_log_holds_log(db, second)  # refuse a file that is not ours
        else:
            self._create_file(second)
        db2 = connect(second, self._exclusive, self._open_timeout)
        self._db2 = db2
        self._configure(db2)
        create_second_log(db2)

    def _replay_log(self, now: float, horizon: float) -> None:
        db, db2 = self._log_files()
        # Each file is in seq order; together they are one log.
        self._replay(heapq.merge(live_rows(db, horizon), live_rows(db2, horizon), key=itemgetter(0)), now)
        last = "SELECT coalesce(max(seq), 0) FROM log"
        self._next_seq = 1 + max(db.execute(last).fetchone()[0], db2.execute(last).fetchone()[0])

    def _load(self, now: float) -> None:
        super()._load(now)  # compacts both files, before the thread starts
        db, db2 = self._log_files()
        self._checkpointer = LogCheckpointer({"main": db, "log2": db2}, compact_idle_file)
        self._checkpointer.start()

    def _log_files(self) -> list[sqlite3.Connection]:
        return [db for db in (self._db, self._db2) if db is not None]

    def _forget_connections(self) -> None:
        self._db = self._db2 = None

    def _finish_writing(self) -> None:
        if self._db is not None:
            self.commit_now()  # best effort: nothing pending was acknowledged yet
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._db2 is not None and self.log_records > SNAPSHOT_WORTH * len(self.index):
            # Nobody else reads the log, and nothing writes it now.
            self._write_snapshot()

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
                for seen, rec in encode_rows(members[start : start + SNAPSHOT_CHUNK]):
                    seq += 1
                    yield seq, seen, rec

        try:
            _in_transaction(db, APPEND_SEQ, rows())
            self.snapshot_seq = first
            self._forget_before(first)
        except sqlite3.Error:
            self.write_errors += 1

    # -- members -----------------------------------------------------------------
    def register_now(self, batch: Sequence[Registration], now: float) -> list[RegisterResult]:
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
            self.index.journal_lost(written)  # its keepalives are refused while writes fail
            return self._write_error(exc)
        return None

    def _commit(self, written: Sequence[Member]) -> None:
        db = self._log_connection(self._active)
        started = time.perf_counter()
        rows = encode_rows(written)
        seq = self._next_seq
        if len(rows) == 1:
            # The usual case (one instant per wake-up): a lone INSERT is its own
            # transaction, one statement instead of three.
            db.execute(APPEND_SEQ, (seq, *rows[0]))
        else:
            _in_transaction(db, APPEND_SEQ, [(seq + i, *row) for i, row in enumerate(rows)])
        self._next_seq = seq + len(rows)
        self._after_commit(rows)
        self.log_records += len(written)
        self.commits += 1
        self.commit_seconds += time.perf_counter() - started

    def _after_commit(self, rows: list[tuple[float, str]]) -> None:
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

    def _log_connection(self, name: str) -> sqlite3.Connection:
        if name == "log2" and self._db2 is not None:
            return self._db2
        return self._require()

    async def expire(self, now: float) -> int:
        """Members only: the checkpointer thread deletes a file's dead rows when the
        writer leaves it (a write to the file being written would also make its WAL
        outgrow the estimate that decides the switch). Opening compacts both files,
        before the thread starts."""
        return await expire_in_steps(self.index, now)

    def _compacted_rows(self) -> int:
        return self.compacted + (self._checkpointer.compacted if self._checkpointer else 0)


def _in_transaction(db: sqlite3.Connection, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
    db.execute("BEGIN")
    try:
        db.executemany(sql, rows)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


__all__ = ["LOG_SWITCH_BYTES", "REFRESH_PERIOD_OF_TTL", "LoneSqliteStore"]
