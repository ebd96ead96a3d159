"""Training curves of one or more runs, from their ``metrics.jsonl``, as a PNG.

    python -m ssl_vit.viz.curves runs/dino RUN ... --keys loss teacher_entropy --out curves.png

One panel per metric (``--keys``; default: every metric the first run logged, the monitors'
``monitor_*`` records included), one line per run.
TensorBoard shows the same numbers live; this is the picture to put in a report or a README. For
DINO runs, panels of the loss and the teacher's entropies get a dashed line at ln K (the value at
collapse to a uniform output), read from the run's ``config.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import UserError, run_cli  # noqa: E402
from ..train.run_folder import METRICS_FILE  # noqa: E402

NOT_CURVES = {"step", "epoch"}
AGAINST_LN_K = {"loss", "teacher_entropy", "teacher_batch_entropy"}  # DINO panels that get the ln K line


def read_metrics(run: str) -> list[dict]:
    """The records a run logged, from a run folder or its metrics.jsonl."""
    path = os.path.join(run, METRICS_FILE) if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist: pass a run folder (--out of a recipe) or its {METRICS_FILE}")
    with open(path) as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    if not records:
        raise UserError(f"{path} has no records yet (the first is written after --log-every steps)")
    return records


def ln_k(run: str) -> Optional[float]:
    """ln K of a DINO run (K = its head's outputs), else None."""
    path = os.path.join(run if os.path.isdir(run) else os.path.dirname(run), "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        config = json.load(fh)
    if config.get("objective") != "dino":
        return None
    return math.log(config["objective_config"]["out_dim"])


def curve_keys(records: list[dict]) -> list[str]:
    """Every numeric metric of any record (training, test, ``monitor_*``), in the order first logged."""
    return list(dict.fromkeys(k for r in records for k, v in r.items()
                              if k not in NOT_CURVES and isinstance(v, (int, float))))


def plot_curves(runs: Sequence[str], out: str, keys: Optional[Sequence[str]] = None) -> str:
    """Write the PNG of ``keys`` against step for every run; returns ``out``."""
    metrics = {run: read_metrics(run) for run in runs}
    ln_ks = {run: value for run in runs if (value := ln_k(run)) is not None}  # DINO runs only
    logged = curve_keys(metrics[runs[0]])
    keys = list(keys or logged)
    unknown = [k for k in keys if not any(k in r for records in metrics.values() for r in records)]
    if unknown:
        raise UserError(f"no run logged {unknown}; metrics logged: {sorted(logged)}")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run, records in metrics.items():
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=os.path.basename(os.path.normpath(run)))
            if key in AGAINST_LN_K and run in ln_ks:
                ax.axhline(ln_ks[run], color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(key + (" (dashed: ln K)" if key in AGAINST_LN_K and ln_ks else ""))
        ax.set_xlabel("step")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (a recipe's --out) or metrics.jsonl files")
    parser.add_argument("--keys", nargs="+", help="metrics to plot (default: all the first run logged)")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    args = parser.parse_args(argv)
    print(plot_curves(args.runs, args.out, args.keys))


if __name__ == "__main__":
    run_cli(main)
