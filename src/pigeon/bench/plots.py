"""PNG plots of one point: latency CDF and throughput over time (matplotlib, optional)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            "plots need matplotlib: pip install 'pigeon[bench]' (or pip install matplotlib)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _name(record: dict[str, Any]) -> str:
    p = record["params"]
    size = {
        "idle": p["n"], "direct": p["rate"] or "max", "fanout": p["members"],
        "offline": p["count"], "storm": p["n"],
    }[record["scenario"]]  # fmt: skip
    return f"{record['scenario']}-{size}-{record['started'].replace(':', '')}"


def plot_point(record: dict[str, Any], extra: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    cdfs = {k: v for k, v in extra.items() if k.endswith("latencies") and v}
    if cdfs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, samples in cdfs.items():
            ordered = sorted(samples)
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.plot([s * 1000 for s in ordered], ys, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction")
        ax.set_title(f"{_name(record)}: latency CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        path = out_dir / f"{_name(record)}-cdf.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    series = {k: v for k, v in record.items() if k.endswith("_timeline") and v}
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, values in series.items():
            step = 0.1 if label.startswith("burst") else 0.5
            ax.plot([i * step for i in range(len(values))], values, label=label)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("per second")
        ax.set_title(f"{_name(record)}: throughput")
        ax.grid(True, alpha=0.3)
        ax.legend()
        path = out_dir / f"{_name(record)}-throughput.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
