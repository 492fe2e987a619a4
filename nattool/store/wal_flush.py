"""Keep SQLite's WAL file flushed to disk from a background thread.

SQLite checkpoints inside a commit, in the event-loop thread, and the checkpoint
starts with an fsync of the WAL. Written as thousands of small commits, 4 MB of
WAL took 2-3.5 ms to flush on the development machine, and that flush was most
of the checkpoint's 3.6 ms; with the WAL already flushed the checkpoint took
0.6 ms (measured with the store's own row shape). Under a half-rate registration
load the commits that held the loop over 1 ms went from 37-38 ms a second to
13-14 ms. This thread
flushes the WAL shortly after commits, so that the data reach the disk while the
loop does other work and the checkpoint's own fsync finds little left to do.

It changes nothing about what is durable when: a commit is still durable against
``kill -9`` when it returns (it is in the page cache), and against a power loss
after the checkpoint, as before. It only moves disk work out of the loop's way.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

# At most one flush per interval: under load the thread wakes ~100 times a second
# and a checkpoint (every 4 MB, a few times a second) finds at most 10 ms of
# commits unflushed. A 2 ms interval cost the loop a few per cent of its
# registration rate in an interleaved A/B (GIL hand-offs).
FLUSH_INTERVAL = 0.010

_sync = getattr(os, "fdatasync", os.fsync)


class WalFlusher:
    """A daemon thread that flushes ``PATH-wal`` after ``nudge()``."""

    def __init__(self, wal_path: Path) -> None:
        self.wal_path = wal_path
        self.flushes = 0
        self.errors = 0
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._fd: int | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start flushing; a platform or file that does not allow it leaves the
        store as it was (checkpoints then flush the WAL themselves)."""
        if sys.platform == "win32":
            return  # FlushFileBuffers needs a handle opened for writing
        try:
            self._fd = os.open(self.wal_path, os.O_RDONLY)
        except OSError:
            self.errors += 1
            return
        self._thread = threading.Thread(target=self._run, name="nattool-wal-flush", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """Called after a commit: cheap when a flush is already due."""
        if self._thread is not None and not self._wake.is_set():
            self._wake.set()

    def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop = True
        self._wake.set()
        thread.join(5)
        self._thread = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _run(self) -> None:
        fd = self._fd
        assert fd is not None
        wake = self._wake
        while True:
            wake.wait()
            if self._stop:
                return
            wake.clear()
            try:
                _sync(fd)
                self.flushes += 1
            except OSError:
                self.errors += 1  # the commit path reports real write errors
            time.sleep(FLUSH_INTERVAL)


__all__ = ["FLUSH_INTERVAL", "WalFlusher"]
