"""A study's PNG figures: the final metrics with their seed spread, and each online monitor
(``monitor_*`` keys of the runs' ``metrics.jsonl``) against training FLOPs, one line per
objective (the mean over seeds) with the seeds' range as a band."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report import _order, aggregate  # noqa: E402
from .runs import PlannedRun  # noqa: E402


def _grid(n: int, width: float = 3.6, height: float = 3.0):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def final_metrics(records: list[dict], path: str) -> str:
    """One panel per column: each seed a dot, the mean a bar."""
    rows, columns = _order(records)
    cells = aggregate(records)
    fig, axes = _grid(len(columns))
    for ax, c in zip(axes, columns):
        for x, o in enumerate(rows):
            values = [100 * v for v in cells.get((o, c), [])]
            if values:
                ax.bar(x, sum(values) / len(values), color="C0" if o != "baseline" else "0.7", alpha=0.6)
                ax.scatter([x] * len(values), values, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
        ax.set_title(c, fontsize=9)
        ax.set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def monitor_series(out: str, runs: list[PlannedRun]) -> dict[str, dict[str, list[list[tuple[float, float]]]]]:
    """monitor key -> objective -> one [(FLOPs, value), ...] series per seed."""
    series: dict = defaultdict(lambda: defaultdict(list))
    for run in runs:
        path = os.path.join(out, "runs", run.name, "metrics.jsonl")
        if run.steps == 0 or not os.path.exists(path):
            continue
        points = defaultdict(list)
        for record in map(json.loads, open(path)):
            for key, value in record.items():
                if key.startswith("monitor_"):
                    points[key].append((record["step"] * run.flops_per_step, value))
        for key, pts in points.items():
            series[key][run.objective].append(pts)
    return series


def monitor_curves(out: str, runs: list[PlannedRun], path: str) -> str | None:
    """The monitors against training FLOPs; None when the runs logged none."""
    series = monitor_series(out, runs)
    if not series:
        return None
    fig, axes = _grid(len(series), 4.2, 3.2)
    for ax, (key, by_objective) in zip(axes, sorted(series.items())):
        for i, (objective, seeds) in enumerate(by_objective.items()):
            length = min(len(s) for s in seeds)
            x = [seeds[0][j][0] for j in range(length)]
            values = [[s[j][1] for s in seeds] for j in range(length)]
            ax.plot(x, [sum(v) / len(v) for v in values], color=f"C{i}", label=objective)
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=f"C{i}", alpha=0.2)
        ax.set_xlabel("training FLOPs")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
