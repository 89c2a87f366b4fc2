"""Connections and the schema: how every connection is set up, the SQLite features the
writers need, the packaged migrations, savepoints, and what SQLite's errors mean to
callers. Shared by the store's threads and the send writer's process."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from pigeon.store import records
from pigeon.store.checkpoint import BACKSTOP_PAGES
from pigeon.store.errors import Conflict, StoreError, Unavailable

MIGRATIONS_PACKAGE = "pigeon.store.migrations.sqlite"
BUSY_TIMEOUT_MS = 5000

T = TypeVar("T")


def connect(path: str, fsync: bool) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; we issue BEGIN/COMMIT ourselves.
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    # FULL: fsync the WAL at each commit, power-loss durable. NORMAL: fsync at checkpoints
    # only; a commit survives a crash of the process, not of the machine.
    conn.execute(f"PRAGMA synchronous = {'FULL' if fsync else 'NORMAL'}")
    conn.execute("PRAGMA cache_size = -65536")  # 64 MiB; helps batched commits (3a)
    # The send round's MATERIALIZED CTE, DISTINCT and GROUP BY build temporary b-trees;
    # kept on disk (the default), each opened, unlinked and closed a file in /var/tmp,
    # five system calls per round. They hold a round's keys: a few KiB.
    conn.execute("PRAGMA temp_store = MEMORY")
    # Checkpoints run in the background (`WalCheckpointer`); a writer's own only as a backstop.
    conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
    return conn


def in_savepoint(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T | Exception:
    """Run ``fn`` inside a savepoint: on failure only its own writes are undone, and the
    failure is returned (database errors as StoreErrors) rather than raised."""
    conn.execute("SAVEPOINT one")
    try:
        result: T | Exception = fn(conn)
    except Exception as exc:
        conn.execute("ROLLBACK TO one")
        result = map_error(exc) if isinstance(exc, sqlite3.Error) else exc
    conn.execute("RELEASE one")
    return result


def require_features(conn: sqlite3.Connection) -> None:
    """Fail at start, not at the first send, on an SQLite without what the writer uses:
    ``UPDATE ... FROM`` (3.33) and the JSON functions."""
    if sqlite3.sqlite_version_info < (3, 33, 0):
        raise sqlite3.NotSupportedError(f"SQLite {sqlite3.sqlite_version}: 3.33 or newer needed")
    conn.execute("SELECT json_extract('[1]', '$[0]') FROM json_each('[1]')").fetchall()


def _statements(script: str) -> list[str]:
    """Split a script into statements, so they can run inside our own transaction
    (``executescript`` would commit first)."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


def migrate(conn: sqlite3.Connection, clock: Callable[[], float]) -> None:
    """Apply each migration above the current schema version, each in its own transaction."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    for number, name, script in records.packaged_migrations(MIGRATIONS_PACKAGE):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read the version under the write lock: another process may be migrating too.
            current = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
            if number > int(current.fetchone()[0]):
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES (?, ?, ?)",
                    (number, name, clock()),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def map_error(exc: sqlite3.Error) -> StoreError:
    if isinstance(exc, sqlite3.IntegrityError):
        return Conflict(str(exc))
    # Locked, busy, I/O, disk full...: the same call may succeed later.
    return Unavailable(str(exc))
