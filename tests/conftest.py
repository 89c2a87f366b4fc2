from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from argon2 import PasswordHasher

from pigeon.auth import Passwords
from pigeon.config import Config, Limits
from pigeon.server import Server, build_server
from tests.services import ServiceUnavailable, postgres_server, redis_server
from tests.support import Api


def fast_passwords() -> Passwords:
    # Real argon2id, with parameters small enough for a test suite.
    return Passwords(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def make_config(data_dir: Path, **limits: object) -> Config:
    return Config(
        host="127.0.0.1",
        port=0,
        data_dir=data_dir,
        heartbeat_s=30.0,
        shutdown_grace_s=5.0,
        limits=replace(Limits(), **limits),  # type: ignore[arg-type]
    )


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # Generous flood limits: tests send bursts; test_bad_input checks the limits themselves.
    config = make_config(tmp_path, sends_per_second=10_000.0, send_burst=10_000, frame_burst=10_000)
    srv = build_server(config, fast_passwords())
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(server: Server, http: aiohttp.ClientSession) -> Api:
    return Api(http, server.url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the whole run: PIGEON_TEST_REDIS_URL, else a throwaway local server.

    Tests share it, so each one keeps to its own key prefix (or database).
    """
    url = os.environ.get("PIGEON_TEST_REDIS_URL")
    if url:
        yield url
        return
    try:
        with redis_server() as server:
            yield server.url
    except ServiceUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for this test session: $PIGEON_TEST_POSTGRES_URL if set, else a
    throwaway server started from the local binaries (skips if there are none). Tests take
    a fresh database each (`services.create_database`)."""
    url = os.environ.get("PIGEON_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    try:
        with postgres_server() as dsn:
            yield dsn
    except ServiceUnavailable as exc:
        pytest.skip(f"PostgreSQL unavailable: {exc}")
