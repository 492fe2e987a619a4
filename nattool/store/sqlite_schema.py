"""The SQLite store's file format: tables, version, migrations, and the statements
that write and compact the log.

The file is an append-only log of registrations (see sqlite_common.py for why),
plus a small table of verified trackers. A lone tracker writes the log to two
files in turn, PATH and PATH-log2; the second holds a log table only.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from nattool.errors import StoreError

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
SECOND_LOG_SUFFIX = "-log2"

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

APPEND = "INSERT INTO log (seen, rec) VALUES (?, ?)"
APPEND_SEQ = "INSERT INTO log (seq, seen, rec) VALUES (?, ?, ?)"
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


def second_log_path(path: Path) -> Path:
    return Path(f"{path}{SECOND_LOG_SUFFIX}")


def delete_dead_rows(db: sqlite3.Connection, horizon: float, batch: int, budget: int) -> int:
    """Delete dead rows from the head of one log file, ``batch`` per statement (each
    its own transaction), up to ``budget``; return how many."""
    deleted = 0
    while deleted < budget:
        step = db.execute(_COMPACT, (min(batch, budget - deleted), horizon)).rowcount
        deleted += step
        if step == 0:
            break
    return deleted


def check_and_migrate(db: sqlite3.Connection, path: Path) -> None:
    """Refuse a file that is not ours or is newer than this nattool; bring an older
    one to SCHEMA_VERSION, a step a transaction."""
    # Reading the header pragmas is what fails on a file that is not SQLite.
    app_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id not in (0, APPLICATION_ID) or (version == 0 and tables and app_id == 0):
        raise StoreError(
            f"{path} is an SQLite database of another program; "
            "give nattool its own file with --store sqlite:PATH"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, written by a newer nattool "
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


def second_log_holds_log(db: sqlite3.Connection, second: Path) -> bool:
    """Refuse a second log file that is not ours, before anything writes to it;
    True if it holds a log table. A busy or locked file raises sqlite3's error."""
    way_out = f"move it aside (mv '{second}' '{second}.corrupt') or use another --store path"
    attached = False
    try:
        db.execute("ATTACH ? AS log2", (str(second),))
        attached = True
        app_id = db.execute("PRAGMA log2.application_id").fetchone()[0]
        tables = {name for (name,) in db.execute("SELECT name FROM log2.sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        if is_busy(exc):
            raise
        raise StoreError(f"cannot use {second} (the second file of the log): {exc}; {way_out}") from None
    finally:
        if attached:
            db.execute("DETACH log2")
    if tables and (app_id != APPLICATION_ID or tables != {"log"}) or app_id not in (0, APPLICATION_ID):
        raise StoreError(f"{second} is not a nattool log file; {way_out}")
    return bool(tables)


def create_second_log(db2: sqlite3.Connection) -> None:
    """Give a lone tracker's second file its log table and our marks."""
    db2.executescript(
        "BEGIN IMMEDIATE;"
        + _SECOND_LOG_TABLE + ";"
        + f"PRAGMA application_id={APPLICATION_ID};"
        + f"PRAGMA user_version={SCHEMA_VERSION};"
        + "COMMIT;"
    )


def fold_second_log(db: sqlite3.Connection, second: Path) -> None:
    """Move a second log file's rows (checked by second_log_holds_log) into the
    first, for workers, which write one file. Rows keep their seq; a fold cut short
    by a crash is simply done again (OR IGNORE)."""
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


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLite could not get a lock on the file: another connection holds it."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


__all__ = [
    "APPEND",
    "APPEND_SEQ",
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "SECOND_LOG_SUFFIX",
    "check_and_migrate",
    "create_second_log",
    "delete_dead_rows",
    "fold_second_log",
    "is_busy",
    "second_log_holds_log",
    "second_log_path",
]
