"""Throwaway real services for tests, on top of `pigeon.devcluster.services`."""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import asyncpg

from pigeon.devcluster.services import (
    PostgresServer,
    RedisServer,
    ServiceUnavailable,
    find_redis_server,
)

__all__ = [
    "RedisServer",
    "ServiceUnavailable",
    "create_database",
    "drop_database",
    "find_redis_server",
    "postgres_server",
    "redis_server",
]

_database_names = itertools.count()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Run a throwaway PostgreSQL server (fsync off); yield a DSN for its ``postgres`` db."""
    server = PostgresServer(durable=False)
    try:
        server.start()
        yield server.dsn
    finally:
        server.close()


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run a throwaway Redis server for the duration of the block."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


def _with_database(dsn: str, database: str) -> str:
    base, _, last = dsn.rpartition("/")
    query = "?" + last.split("?", 1)[1] if "?" in last else ""
    return f"{base}/{database}{query}"


async def create_database(server_dsn: str) -> str:
    """A new, empty database on the server; returns its DSN. Tests get one each, so they
    never see each other's rows (cheaper than dropping tables between tests)."""
    name = f"pigeon_test_{os.getpid()}_{next(_database_names)}"
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    return _with_database(server_dsn, name)


async def drop_database(server_dsn: str, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
