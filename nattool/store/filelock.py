"""The lock file beside a SQLite store: one server per database file.

Two trackers writing one file would each serve only their own memory and
overwrite each other's rows. The OS drops the lock when the process dies, kill -9
included, so it never goes stale. The workers of one server (serve --workers)
share it, and queue for writing on a byte of it (:meth:`FileLock.hold_writer`).
"""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path
from typing import IO

from nattool.errors import StoreError, StoreLocked

FULL_DISK_WAY_OUT = "free space on that disk, give nattool another --store sqlite:PATH, or use --store memory"
# Files of the store hold members' addresses: readable by the tracker's user only.
PRIVATE_FILE_MODE = 0o600
# How often a worker looks again for the write lock, and for how long.
WRITER_POLL = 50e-6
WRITER_WAIT = 2.0


class FileLock:
    """Held from a store's open to its close: exclusively by a lone tracker, shared
    by the workers of one server."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self.shared = shared  # the workers of one server share the file
        self.created = False  # this process created the lock file
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        existed = self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, PRIVATE_FILE_MODE)
        except OSError as exc:
            raise StoreError(
                f"cannot create {self.path}: {exc.strerror}; "
                "use a writable --store sqlite:PATH, or --store memory"
            ) from None
        fh = open(fd, "a+", encoding="ascii")
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
            raise StoreLocked(
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
                raise StoreError(f"cannot write {self.path}: {exc.strerror}; {FULL_DISK_WAY_OUT}") from None
        self.created = not existed
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


__all__ = ["FULL_DISK_WAY_OUT", "PRIVATE_FILE_MODE", "FileLock"]
