"""Fixtures for the Store contract suite: each test runs once per backend in `BACKENDS`.

To add an embedded backend, add a factory to `BACKENDS`. A factory gets the test's ``tmp_path`` and
clock and returns a new, not yet opened store; called again with the same arguments it
must return a store on the same data (the suite reopens stores to test durability), and
different ``tmp_path`` values must give independent, empty stores. Server backends
(PostgreSQL) get a fresh database per test instead, dropped afterwards.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from pigeon.store.base import Store
from pigeon.store.postgres import PostgresStore
from pigeon.store.sqlite import SqliteStore
from tests.services import create_database, drop_database


class FakeClock:
    """A clock the test moves by hand. Thread-safe enough: stores only read it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[[pathlib.Path, FakeClock], Store]


def _sqlite(tmp_path: pathlib.Path, clock: FakeClock) -> Store:
    return SqliteStore(tmp_path / "pigeon.db", clock=clock)


def _sqlite_queued(tmp_path: pathlib.Path, clock: FakeClock) -> Store:
    """Every message through the leased fan-out rounds, as on the server stores."""
    return SqliteStore(tmp_path / "pigeon.db", clock=clock, fanout_with_send=False)


BACKENDS: dict[str, StoreFactory] = {
    "sqlite": _sqlite,
    "sqlite-queued": _sqlite_queued,
}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


#: Backends on a database server, given by a session fixture yielding its URL.
SERVER_BACKENDS: dict[str, str] = {
    "postgresql": "postgres_url",
}


@pytest.fixture(params=sorted([*BACKENDS, *SERVER_BACKENDS]))
async def make_store(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path, clock: FakeClock
) -> AsyncIterator[Callable[[], Store]]:
    """A function returning a new (unopened) store on this test's data."""
    if request.param in BACKENDS:
        factory = BACKENDS[request.param]
        yield lambda: factory(tmp_path, clock)
        return
    # Requested here, not as an argument: runs with only SQLite start no server.
    server: Any = request.getfixturevalue(SERVER_BACKENDS[request.param])
    dsn = await create_database(server)
    try:
        yield lambda: PostgresStore(dsn, clock=clock, pool_size=4)
    finally:
        await drop_database(server, dsn)


@pytest.fixture
async def store(make_store: Callable[[], Store]) -> AsyncIterator[Store]:
    opened = make_store()
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()
