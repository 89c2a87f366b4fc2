"""`pigeon cluster up` / `pigeon cluster down`: a local scaled set-up in one command."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from pigeon.devcluster.cluster import LocalCluster

STATE_FILE = "cluster.json"


async def cluster_up(root: Path, gateways: int, workers: int, base_port: int | None) -> None:
    """Start everything, print the URLs, run until SIGTERM/SIGINT (or `cluster down`)."""
    cluster = LocalCluster(root, gateways=gateways, workers=workers, base_port=base_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with cluster:
        assert cluster.postgres is not None and cluster.redis is not None
        state = {
            "pid": os.getpid(),
            "gateways": cluster.urls,
            "store": cluster.store_url,
            "bus": cluster.redis.url,
            "logs": str(root),
        }
        (root / STATE_FILE).write_text(json.dumps(state, indent=2))
        print("Pigeon cluster is up")
        for url in cluster.urls:
            print(f"  gateway  {url}")
        print(f"  workers  {len(cluster.worker_members)}")
        print(f"  store    {cluster.store_url}")
        print(f"  bus      {cluster.redis.url}")
        print(f"  logs     {root}/*.log")
        print("Stop it with Ctrl-C or `pigeon cluster down`.", flush=True)
        await stop.wait()
        print("Pigeon cluster is stopping", flush=True)
    (root / STATE_FILE).unlink(missing_ok=True)


def cluster_down(root: Path, timeout_s: float = 60.0) -> int:
    """Stop the cluster started in ``root``; 0 once everything it started has exited."""
    state_file = root / STATE_FILE
    if not state_file.exists():
        print(f"no cluster running from {root}")
        return 1
    pid = int(json.loads(state_file.read_text())["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_file.unlink(missing_ok=True)
        print("the cluster's supervisor was already gone")
        return 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("Pigeon cluster stopped")
            return 0
        time.sleep(0.1)
    print(f"the cluster (pid {pid}) did not stop within {timeout_s:.0f} s")
    return 1
