"""The schema: the SQLite features the writer needs, the packaged migrations, and what
SQLite's errors mean to callers."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from pigeon.store import records
from pigeon.store.errors import Conflict, StoreError, Unavailable

MIGRATIONS_PACKAGE = "pigeon.store.migrations.sqlite"


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
