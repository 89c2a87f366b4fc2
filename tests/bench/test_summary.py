"""A point's summary over repeated runs (pure), and `--repeat` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pigeon.bench.summary import figure, summarize
from pigeon.cli import main


def direct(delivered: float, p99: float | None, loss: int = 0) -> dict[str, object]:
    return {
        "scenario": "direct",
        "started": f"t{delivered}",
        "params": {"rate": 0.0},
        "delivered_per_s": delivered,
        "latency": {"p50_ms": 1.0, "p99_ms": p99},
        "server_cpu": None,  # unknown over a short interval
        "loss": loss,
        "duplicates": 0,
        "order_violations": 0,
    }


def test_a_summary_gives_median_min_and_max_of_each_key_figure() -> None:
    summary = summarize([direct(20_000, 5.0), direct(26_000, None, loss=2), direct(18_000, 9.0)])
    assert summary["summary_of"] == 3 and summary["scenario"] == "direct"
    delivered = summary["figures"]["delivered_per_s"]
    assert (delivered["median"], delivered["min"], delivered["max"]) == (20_000, 18_000, 26_000)
    assert summary["figures"]["latency.p99_ms"]["runs"] == [5.0, 9.0]  # a missing one is left out
    assert "server_cpu" not in summary["figures"]  # never known
    assert (summary["loss"], summary["duplicates"]) == (2, 0)  # faults add up


def test_figure_walks_dotted_paths() -> None:
    record = {"paced": {"all_members": {"p99_ms": 41}}, "burst": None}
    assert figure(record, "paced.all_members.p99_ms") == 41.0
    assert figure(record, "burst.deliveries_per_s") is None
    assert figure(record, "nothing.here") is None


@pytest.mark.timeout(120)
def test_repeat_writes_each_run_and_then_their_summary(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    code = main(["bench", "offline", "--smoke", "--repeat", "2", "--results", str(results)])
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert code == 0
    assert [r.get("summary_of") for r in records] == [None, None, 2]
    summary = records[-1]
    assert summary["figures"]["reconnect_to_last_ms"]["runs"] == [
        r["reconnect_to_last_ms"] for r in records[:2]
    ]
    assert summary["loss"] == 0
