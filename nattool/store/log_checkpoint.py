"""Checkpoint the idle half of the SQLite log from a background thread.

A checkpoint copies the WAL back into the database file and fsyncs both; SQLite
runs it inside a commit, in the event-loop thread, and under a half-rate
registration load those checkpoints held the loop for 1-1.5 ms about ten times a
second, most of the registration p99 then (0.4-0.5 ms without them).

Doing the same checkpoint from another thread is not enough. The WAL can only
restart once a checkpoint has caught up with the last commit, and the writer
commits every 100 us or so: whoever finishes the catching-up (three fsyncs, about
1 ms under load) does it in the writer's path. So the log lives in two files
(the store writes one while this thread checkpoints the other), and a file is
written again only once its checkpoint is complete, and this thread then starts
the file's WAL afresh itself (see :meth:`LogCheckpointer._restart_wal`), so the
store's first commit there appends to a short WAL like any other commit.

Each file has a connection of its own in SQLite's exclusive locking mode (the WAL
index in this process's memory, no -shm file, no other program on the file), and
this thread checkpoints a file through that file's connection while the store
leaves it alone: the store writes the other file meanwhile. (The tracker table's
rare writes may reach the first file during its checkpoint: SQLite serializes
calls on one connection, so they only wait.)

Before the checkpoint, the thread also deletes the file's dead log rows (those
older than the horizon the store gave with the request). Done in the loop, that
compaction took 1.5 s of a 150 s run in statements of up to 20 ms, and its
scattered page writes made the active WAL outgrow the store's estimate until
SQLite checkpointed inside a commit; here it costs the loop nothing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from typing import Callable

BUSY_RETRY = 0.005  # a file whose checkpoint was busy is tried again after this


class LogCheckpointer:
    """A daemon thread that checkpoints the files behind named connections."""

    def __init__(
        self,
        connections: dict[str, sqlite3.Connection],
        compact: Callable[[sqlite3.Connection, float], int],
    ) -> None:
        """``compact(connection, horizon)`` deletes a file's rows that are dead at
        ``horizon`` and returns how many; the store knows the schema, not this."""
        self._connections = connections
        self._compact = compact
        self._horizon = {name: float("-inf") for name in connections}
        # Requests and completions are counted, not flagged: a request made while
        # that file's checkpoint runs must not be marked done by it.
        self._asked = {name: 0 for name in connections}
        self._done = {name: 0 for name in connections}
        self.checkpoints = 0
        self.compacted = 0  # rows deleted
        self.errors = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nattool-log-checkpoint", daemon=True)
        self._thread.start()

    def request(self, name: str, horizon: float) -> None:
        """Checkpoint file ``name`` soon, after deleting its rows dead at ``horizon``.
        Until ``ready(name)``, the caller must not use that file's connection (the
        thread is using it)."""
        self._horizon[name] = horizon
        self._asked[name] += 1
        self._wake.set()

    def ready(self, name: str) -> bool:
        """True when every frame written to file ``name`` before the last request is
        back in its database file (or nothing was ever requested)."""
        return self._done[name] == self._asked[name]

    def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self._stop = True
            self._wake.set()
            thread.join(10)
            self._thread = None

    def _restart_wal(self, connection: sqlite3.Connection) -> None:
        """Restart a fully checkpointed WAL with one write: the file's header page,
        rewritten as it is. SQLite restarts such a WAL at the next write and, with
        synchronous=NORMAL, fsyncs the new WAL header there; left to the store, that
        fsync held the loop for 0.3-0.6 ms at the first commit after every switch."""
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute(f"PRAGMA user_version={int(version)}")
        except sqlite3.Error:
            self.errors += 1  # the store's first commit restarts it, as before

    def _run(self) -> None:
        _yield_to_the_event_loop()
        wake = self._wake
        while True:
            wake.wait()
            wake.clear()
            if self._stop:
                return
            for name, asked in list(self._asked.items()):
                if asked == self._done[name]:
                    continue
                connection = self._connections[name]
                try:
                    self.compacted += self._compact(connection, self._horizon[name])
                except sqlite3.Error:
                    # The rows stay until the file's next turn; the checkpoint
                    # still runs, so the writer can come back to the file.
                    self.errors += 1
                try:
                    # fetchall() finishes the statement: no read transaction is left
                    # open on the connection the store writes next.
                    busy = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()[0][0]
                except sqlite3.Error:
                    self.errors += 1
                    busy = 1
                if busy:
                    # Not done (an I/O error, say): the file stays not ready, and
                    # the writer stays on the other one (SQLite's own checkpoints
                    # bound its WAL meanwhile). Try again shortly.
                    wake.set()
                    continue
                self.checkpoints += 1
                self._restart_wal(connection)
                self._done[name] = asked
            if wake.is_set() and not self._stop:
                time.sleep(BUSY_RETRY)


def _yield_to_the_event_loop() -> None:
    """Run this thread only when a CPU has nothing better to do (Linux SCHED_IDLE).

    The thread is woken by the loop's thread, and the scheduler likes to run a
    woken thread where its waker runs: at normal priority a 5 ms checkpoint then
    took the loop's own core for a time slice. On a machine with no CPU to spare
    the thread may then wait long for its turn: the writer stays on its file
    meanwhile, and SQLite's own checkpoint bounds that file's WAL."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return
    try:
        os.sched_setscheduler(0, policy, os.sched_param(0))  # 0: the calling thread
    except OSError:
        pass  # not allowed here: the thread runs at normal priority


__all__ = ["LogCheckpointer"]
