"""Measurements: latency percentiles, throughput over time, CPU and RSS of processes (/proc)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")

#: A generator process above this share of one core may have limited the figure.
SATURATED = 0.9


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def latency_summary(samples_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds."""
    ordered = sorted(samples_s)
    out = {f"p{q}_ms": round(percentile(ordered, q) * 1000, 3) for q in (50, 90, 99)}
    out["max_ms"] = round((ordered[-1] if ordered else 0.0) * 1000, 3)
    out["samples"] = len(ordered)
    return out


def timeline(times: Iterable[float], start: float, bucket_s: float = 0.5) -> list[int]:
    """Counts of events per bucket since ``start`` (throughput over time)."""
    counts: list[int] = []
    for t in times:
        index = max(0, int((t - start) / bucket_s))
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += 1
    return counts


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its threads included)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def service_pids(pid: int) -> list[int]:
    """``pid`` and its children (e.g. the PostgreSQL postmaster and its backends)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            pids.append(int(entry))
    return pids


@dataclass
class CpuMeter:
    """CPU share (1.0 = one full core) of some processes between start() and read()."""

    pids: list[int]
    _cpu0: float = 0.0
    _t0: float = 0.0

    def _total(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                total += cpu_seconds(pid)
        return total

    def start(self) -> None:
        self._cpu0, self._t0 = self._total(), time.monotonic()

    def read(self) -> float | None:
        """None over less than half a second: the kernel counts in 10 ms ticks."""
        elapsed = time.monotonic() - self._t0
        return round((self._total() - self._cpu0) / elapsed, 3) if elapsed >= 0.5 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total_gib() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return 0.0


def machine_info() -> dict[str, object]:
    cores = os.cpu_count() or 0
    return {
        "cores": cores,
        "cpu": cpu_model(),
        "mem_gib": mem_total_gib(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "shared_cores": f"server and generator share the same {cores} cores",
    }


#: Python additions timed by `speed_probe` (~0.1 s on this kind of VM at its fastest).
PROBE_LOOP = 1_000_000
#: 4 KiB write + fdatasync pairs timed by `speed_probe`.
PROBE_SYNCS = 20


def speed_probe(directory: Path) -> dict[str, float]:
    """How fast this machine is right now, taken just before a point.

    A shared VM's speed drifts by up to 2x within minutes; with this in every record, two
    records can be told apart by the machine, not only by the code. ``cpu_loop_ms`` is
    the time of a fixed Python loop; ``fdatasync_*_ms`` the disk's flush latency in
    ``directory`` (where the server's data lives).
    """
    start = time.perf_counter()
    total = 0
    for i in range(PROBE_LOOP):
        total += i
    cpu_ms = (time.perf_counter() - start) * 1000
    path = directory / "speed-probe.dat"
    syncs: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(PROBE_SYNCS):
            os.pwrite(fd, b"x" * 4096, 0)
            start = time.perf_counter()
            os.fdatasync(fd)
            syncs.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    syncs.sort()
    return {
        "cpu_loop_ms": round(cpu_ms, 1),
        "fdatasync_p50_ms": round(percentile(syncs, 50) * 1000, 2),
        "fdatasync_max_ms": round(syncs[-1] * 1000, 2),
    }
