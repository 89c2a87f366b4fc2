"""Smoke run of every `pigeon bench` scenario: tiny sizes against a real server process.

Checks that the bench works end to end and that nothing is lost, duplicated or reordered.
No timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pigeon.cli import main

SCENARIOS = {"idle", "direct", "fanout", "offline", "storm"}


@pytest.mark.timeout(120)
def test_every_scenario_smoke(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    code = main(["bench", "all", "--smoke", "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert {r["scenario"] for r in records} == SCENARIOS
    for record in records:
        name = record["scenario"]
        assert record["loss"] == 0, (name, record)
        assert record["duplicates"] == 0, (name, record)
        assert record["order_violations"] == 0, (name, record)
        assert record["errors"] == 0, (name, record)
        assert record["machine"]["cores"] >= 1
        assert record["machine"]["speed_probe"]["cpu_loop_ms"] > 0
        assert "generator_saturated" in record
        assert record["server_exit"] == 0, (name, record)
    by_name = {r["scenario"]: r for r in records}
    assert by_name["idle"]["dropped"] == 0
    assert by_name["offline"]["received"] == by_name["offline"]["messages"]
    assert by_name["fanout"]["paced"]["deliveries"] == 5 * 9
    assert all(r["delivered"] == r["sent"] for r in records if r["scenario"] == "direct")
    assert code == 0
