"""The bench scenarios, by name."""

from __future__ import annotations

from pigeon.bench.scenarios import direct, fanout, idle, offline, storm
from pigeon.bench.scenarios.base import Params, Run, Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (idle.SCENARIO, direct.SCENARIO, fanout.SCENARIO, offline.SCENARIO, storm.SCENARIO)
}

__all__ = ["SCENARIOS", "Params", "Run", "Scenario"]
