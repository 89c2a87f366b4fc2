"""Server configuration: every limit in one place, with defaults, overridable by env and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame_bytes: int = 64 * 1024  # a larger frame gets `frame_too_large`
    hard_frame_bytes: int = 1024 * 1024  # above this the socket is closed (1009)
    max_body_chars: int = 16 * 1024
    max_group_members: int = 1024
    sends_per_second: float = 50.0  # per device, sustained
    send_burst: int = 200  # per device, bucket size
    frames_per_second: float = 200.0  # any frame, per connection
    frame_burst: int = 400
    max_bad_frames: int = 50  # consecutive errors before the socket is closed
    send_buffer_bytes: int = 4 * 1024 * 1024  # per connection; overflow = slow consumer
    presence_max_group: int = 256  # presence is shared through groups up to this size
    receipt_detail_max_group: int = 100  # bigger groups: senders get aggregate receipts only
    history_page_max: int = 500
    login_attempts_per_minute: int = 20  # per username, across gateways (password guessing)


@dataclass(frozen=True, slots=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("pigeon-data")
    store_url: str = ""  # empty: SQLite under data_dir
    # SQLite: fsync every commit (power-loss durable). False: only at checkpoints (a `sent`
    # survives a crash of Pigeon, not of the machine), for disks with slow, erratic flushes.
    sqlite_fsync: bool = True
    bus_url: str = "memory://"
    workers: int = 1  # in-process fan-out workers
    gateway_id: str = ""  # empty: generated
    heartbeat_s: float = 30.0  # clients ping at least this often; silent 2x this = closed
    hello_timeout_s: float = 10.0
    presence_ttl_s: float = 60.0
    typing_ttl_ms: int = 5000
    inbox_retention_days: float = 30.0
    replay_page: int = 500
    ack_flush_s: float = 0.1  # a socket's acks are written at most this often (receipt delay)
    fanout_batch: int = 256  # messages per fan-out transaction
    fanout_lease_s: float = 10.0  # a dead worker's conversations are taken over after this
    shutdown_grace_s: float = 10.0
    # Pending connections the kernel queues: a reconnect storm overflows a small queue, and
    # dropped SYNs are retried only after 1, 2, 4... seconds (net.core.somaxconn caps it).
    listen_backlog: int = 4096
    limits: Limits = Limits()

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "pigeon.sqlite3"


_ENV_PREFIX = "PIGEON_"


def from_env(base: Config | None = None, environ: dict[str, str] | None = None) -> Config:
    """Apply PIGEON_<FIELD> variables (e.g. PIGEON_PORT, PIGEON_MAX_BODY_CHARS)."""
    env = os.environ if environ is None else environ
    config = base or Config()
    top: dict[str, object] = {}
    for f in fields(Config):
        raw = env.get(_ENV_PREFIX + f.name.upper())
        if raw is not None and f.name != "limits":
            top[f.name] = _parse(raw, getattr(config, f.name))
    limits: dict[str, object] = {}
    for f in fields(Limits):
        raw = env.get(_ENV_PREFIX + f.name.upper())
        if raw is not None:
            limits[f.name] = _parse(raw, getattr(config.limits, f.name))
    return replace(config, **top, limits=replace(config.limits, **limits))  # type: ignore[arg-type]


def _parse(raw: str, current: object) -> object:
    if isinstance(current, bool):
        return raw.lower() in {"1", "true", "yes", "on"}
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, Path):
        return Path(raw)
    return raw
