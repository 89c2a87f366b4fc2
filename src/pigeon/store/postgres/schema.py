"""The database under the store: the types shared by the modules of this package, what
database errors mean to a caller, and the schema migrations."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from pigeon.store import records
from pigeon.store.errors import Conflict, StoreError, Unavailable

Clock = Callable[[], float]
Row = Sequence[Any]  # an asyncpg Record, or a slice of one
Conn = Any  # asyncpg.Connection (asyncpg ships no type information)
#: `PostgresStore._statement` or ``_call``: one statement in its own implicit transaction.
Statement = Callable[..., Awaitable[list[Row]]]

MIGRATIONS_PACKAGE = "pigeon.store.migrations.postgresql"
#: pg_advisory_lock key held while migrating ("pigeon" in ASCII).
MIGRATION_LOCK = 0x706967656F6E

#: Errors that mean "the database cannot be reached right now"; the call may succeed later.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08: connection failures
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutting down, cannot connect now
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.InterfaceError,  # connection closed under us, pool closing
    asyncpg.InternalClientError,  # e.g. the server killed the session between our calls
    OSError,  # refused, reset, unreachable (ConnectionRefusedError is one)
    TimeoutError,  # pool acquire or command timeout
)
RETRY_ERRORS = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)


def map_error(exc: BaseException) -> StoreError:
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return Conflict(str(exc))
    # Connection trouble, timeouts, contention...: the same call may succeed later.
    return Unavailable(str(exc))


def fresh(exc: Exception) -> Exception:
    """A fresh instance per caller of a shared failure: one would share its traceback."""
    return type(exc)(*exc.args) if isinstance(exc, StoreError) else exc


# -- migrations ------------------------------------------------------------------------------


async def migrate(conn: Conn, clock: Clock) -> None:
    """Apply each migration above the current schema version, each in its own transaction.

    Under a session advisory lock: processes starting at once take turns, and each sees
    the versions the previous one applied (CREATE TABLE IF NOT EXISTS alone can race).
    """
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer PRIMARY KEY,"
            " name text NOT NULL, applied_at double precision NOT NULL)"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
        for number, name, script in records.packaged_migrations(MIGRATIONS_PACKAGE):
            if number <= current:
                continue
            async with conn.transaction():
                await conn.execute(script)  # no arguments: may hold several statements
                await conn.execute(
                    "INSERT INTO schema_version (version, name, applied_at) VALUES ($1, $2, $3)",
                    number,
                    name,
                    clock(),
                )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
