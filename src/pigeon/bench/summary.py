"""What several runs of one point say together: the median, min and max of its key figures.

This VM's speed drifts by up to 2x within minutes, so one run of a point says little; the
runner writes one of these after ``--repeat K`` runs of a point (K > 1).
"""

from __future__ import annotations

import statistics
from typing import Any

#: Per scenario, the figures a summary covers, as dotted paths into a point's record.
KEY_FIGURES: dict[str, tuple[str, ...]] = {
    "direct": ("delivered_per_s", "latency.p50_ms", "latency.p99_ms", "server_cpu"),
    "fanout": (
        "paced.all_members.p50_ms",
        "paced.all_members.p99_ms",
        "burst.deliveries_per_s",
    ),
    "offline": ("reconnect_to_first_ms", "reconnect_to_last_ms"),
    "storm": ("all_resumed_s", "all_delivered_s"),
    "idle": ("kib_per_connection", "connect_per_s"),
}

#: Counts that must stay zero: a summary adds them up over its runs.
FAULTS = ("loss", "duplicates", "order_violations", "errors")


def figure(record: dict[str, Any], path: str) -> float | None:
    """The number at ``path`` ("a.b.c") in ``record``, or None if it is missing or null."""
    value: Any = record
    for key in path.split("."):
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return float(value) if isinstance(value, int | float) else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for several runs of the same point (same scenario and parameters)."""
    first = records[0]
    scenario = first["scenario"]
    figures: dict[str, dict[str, Any]] = {}
    for path in KEY_FIGURES.get(scenario, ()):
        runs = [value for r in records if (value := figure(r, path)) is not None]
        if runs:
            median = statistics.median(runs)
            figures[path] = {"median": median, "min": min(runs), "max": max(runs), "runs": runs}
    faults = {name: sum(int(r.get(name) or 0) for r in records) for name in FAULTS}
    return {
        "scenario": scenario,
        "summary_of": len(records),
        "started": [r.get("started") for r in records],
        "params": first["params"],
        "figures": figures,
        **faults,
        "git": first.get("git"),
    }
