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
