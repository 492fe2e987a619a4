"""The tracker's log: one ``key=value`` line per event on stderr.

Its own module, below every floor, so that the server and its worker processes set up
logging without importing the command line.
"""

from __future__ import annotations

import logging
import sys

# The names accepted by --log-level and the serve.log_level key, quietest last.
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class KeyValueFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = "" if worker is None else f" worker={worker}"

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        return f"ts={stamp} level={record.levelname.lower()}{self.worker} {record.getMessage()}"


def setup_logging(level: str, worker: int | None = None) -> None:
    """Send the ``nattool`` loggers to stderr at ``level`` (one of LOG_LEVELS)."""
    if level not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {LOG_LEVELS}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(worker))
    root = logging.getLogger("nattool")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
