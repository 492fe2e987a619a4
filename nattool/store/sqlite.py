"""The embedded default store: reads from memory, writes to SQLite (WAL).

``SqliteStore(limits, path, shared=...)`` picks the store for the job:

- sqlite_lone.py: a lone tracker (one process, the log in two files written in
  turn, checkpoints in a thread);
- sqlite_shared.py: the workers of ``serve --workers N`` (one file, shared);
- sqlite_common.py: what both share (the index, replay, trackers, open and close);
- sqlite_schema.py, sqlite_codec.py, filelock.py: the file format, the log's rows,
  and the lock file that keeps other servers out.
"""

from __future__ import annotations

from nattool.store.sqlite_codec import SNAPSHOT_MARK, SNAPSHOT_SEEN
from nattool.store.sqlite_common import SqliteStore, default_sqlite_path
from nattool.store.sqlite_lone import REFRESH_PERIOD_OF_TTL, LoneSqliteStore
from nattool.store.sqlite_schema import APPLICATION_ID, SCHEMA_VERSION
from nattool.store.sqlite_shared import SharedSqliteStore

__all__ = [
    "APPLICATION_ID",
    "REFRESH_PERIOD_OF_TTL",
    "SCHEMA_VERSION",
    "SNAPSHOT_MARK",
    "SNAPSHOT_SEEN",
    "LoneSqliteStore",
    "SharedSqliteStore",
    "SqliteStore",
    "default_sqlite_path",
]
