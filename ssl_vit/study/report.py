"""A study's results: ``results.json`` and ``results.csv`` (one record per run x evaluation x data x
metric), ``results.md`` (objectives x columns, mean ± std over seeds, the best of each column in
bold) and PNG figures (the final metrics with their seed spread; each monitor against FLOPs)."""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from collections import defaultdict

from ..checkpoint import atomic_write_text
from .runs import BASELINE

FIELDS = ("objective", "seed", "eval", "data", "metric", "value", "steps", "images", "flops", "wall_s")


def column(record: dict) -> str:
    """A table column: evaluation, data set (its last path part) and metric."""
    return f"{record['eval']} {os.path.basename(record['data'].rstrip('/')) or record['data']} {record['metric']}"


def aggregate(records: list[dict]) -> dict[tuple[str, str], list[float]]:
    """(objective, column) -> the values over seeds."""
    cells = defaultdict(list)
    for r in records:
        cells[r["objective"], column(r)].append(r["value"])
    return cells


def _order(records: list[dict]) -> tuple[list[str], list[str]]:
    """Rows (the baseline first, then the study's order) and columns, as the records first name them."""
    rows = list(dict.fromkeys(r["objective"] for r in records))
    rows = ([BASELINE] if BASELINE in rows else []) + [o for o in rows if o != BASELINE]
    return rows, list(dict.fromkeys(column(r) for r in records))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown(records: list[dict], budget: str) -> str:
    """The table: mean ± std (percent) over seeds; the best mean of each column in bold."""
    rows, columns = _order(records)
    cells = aggregate(records)
    best = {c: max(mean_std(cells[o, c])[0] for o in rows if (o, c) in cells) for c in columns}
    seeds = {o: len({r["seed"] for r in records if r["objective"] == o}) for o in rows}
    lines = [f"Budget: {budget}. Values: accuracy in %, mean ± std over seeds; the best of each column in bold.", "",
             "| objective | seeds | steps | " + " | ".join(columns) + " |", "|---" * (len(columns) + 3) + "|"]
    for o in rows:
        steps = next(r["steps"] for r in records if r["objective"] == o)
        out = []
        for c in columns:
            if (o, c) not in cells:
                out.append("-")
                continue
            m, s = mean_std(cells[o, c])
            text = f"{100 * m:.2f} ± {100 * s:.2f}"
            out.append(f"**{text}**" if m == best[c] else text)
        lines.append(f"| {o} | {seeds[o]} | {steps} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def write_results(out: str, records: list[dict], budget: str) -> list[str]:
    """results.json, results.csv and results.md in ``out``; returns their paths."""
    paths = [os.path.join(out, f"results.{ext}") for ext in ("json", "csv", "md")]
    atomic_write_text(paths[0], json.dumps(records, indent=1) + "\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(paths[1], buffer.getvalue())
    atomic_write_text(paths[2], markdown(records, budget))
    return paths
