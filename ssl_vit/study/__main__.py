"""Run a study: a grid of pretraining runs at one shared budget, every one evaluated, one table.

    python -m ssl_vit.study STUDY.toml --out DIR
    accelerate launch -m ssl_vit.study STUDY.toml --out DIR     # every run on all processes, one after another

The file format is in ``ssl_vit/study/spec.py``. Rerunning the same command resumes: finished runs
and evaluations are skipped, a killed run resumes from its saved state, and a changed study file
is refused with the differences named. Writes ``DIR/results.{json,csv,md}`` and PNG figures.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from ..checkpoint import atomic_write_text
from ..data import load_data
from ..errors import ConfigError, run_cli
from ..train import end_processes
from .budget import allot
from .evaluate import check_evaluations, evaluate
from .figures import final_metrics, monitor_curves
from .report import markdown, write_results
from .runs import PlannedRun, checkpoint_path, describe, finished, plan, pretrain, read_times
from .spec import Study, parse_study

STUDY_FILE = "study.json"


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The settings (dotted names) whose values differ between two study dicts."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def claim_folder(out: str, study: Study) -> None:
    """Write DIR/study.json, or refuse when DIR holds a study with other settings."""
    path, now = os.path.join(out, STUDY_FILE), json.loads(json.dumps(study.as_dict()))
    if os.path.exists(path):
        changed = differences(json.load(open(path)), now)
        if changed:
            raise ConfigError(f"{out} holds a study with other settings ({'; '.join(changed)}); use a new --out, "
                              "or restore the study file")
        return
    os.makedirs(out, exist_ok=True)
    atomic_write_text(path, json.dumps(now, indent=1))


def check_data(study: Study):
    """The pretraining data (returned) and every evaluation's data load, before anything runs."""
    source = load_data(study.data)
    for e in study.evals:
        for data in e.data:
            load_data(data)
    return source


def evaluate_all(study: Study, out: str, runs: list[PlannedRun], device: torch.device) -> list[dict]:
    """One record per run x evaluation x data x metric."""
    times, records = read_times(out), []
    for run in runs:
        fields = describe(run, times.get(run.name))
        for e in study.evals:
            for data in e.data:
                metrics = evaluate(out, run.name, checkpoint_path(out, run), e, data, device)
                records += [{**fields, "eval": e.kind, "data": data, "metric": m, "value": v}
                            for m, v in metrics.items()]
    return records


def budget_text(study: Study, runs: list[PlannedRun]) -> str:
    steps = ", ".join(f"{r.objective} {r.steps} steps ({r.flops:.3g} FLOPs)" for r in runs
                      if r.seed == study.seeds[0] and r.steps)
    return f"{study.budget_kind} = {study.budget:g} per run: {steps}"


def run_study(path: str, out: str, device: Optional[str] = None) -> list[dict]:
    """Train what is missing, evaluate what is missing, write the results; returns the records."""
    try:
        text = open(path).read()
    except OSError as err:
        raise ConfigError(f"study file {path}: cannot read it ({err.strerror})") from err
    study = parse_study(text, path)
    check_evaluations(study)
    source = check_data(study)
    if study.budget_kind == "epochs" and not hasattr(source.train, "__len__"):
        raise ConfigError(f"{path} budget: epochs need a data set of known size; {study.data} is streamed")
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # as the runs' Accelerator will see it
    if state.num_processes > 1 and any(e.kind == "finetune" for e in study.evals):
        raise ConfigError(f"{path}: a study evaluates on the main process alone, where a finetune evaluation cannot "
                          "train across processes; run the study in one process (python -m ssl_vit.study)")
    runs = plan(study, allot(study, len(source.train), source.num_classes or 10))
    if state.is_main_process:
        claim_folder(out, study)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"study {path}: {len(runs)} runs on {state.num_processes} process(es), {out}", flush=True)
    for run in runs:
        if not finished(out, run):
            pretrain(study, out, run)
    records = []
    if state.is_main_process:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        records = evaluate_all(study, out, runs, dev)
        report(study, out, runs, records)
    state.wait_for_everyone()
    end_processes()
    return records


def report(study: Study, out: str, runs: list[PlannedRun], records: list[dict]) -> None:
    budget = budget_text(study, runs)
    paths = write_results(out, records, budget)
    figures = [final_metrics(records, os.path.join(out, "final_metrics.png")),
               monitor_curves(out, runs, os.path.join(out, "monitors.png"))]
    print(markdown(records, budget))
    print("results: " + ", ".join(paths))
    print("figures: " + ", ".join(p for p in figures if p))
    print(f"next: open {paths[2]}; add seeds or raise the budget in {study.source} and rerun with a new --out, "
          f"or evaluate one run further with python -m eval.linear {out}/runs/<run>/ckpt.pt")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="the study file (TOML)")
    parser.add_argument("--out", required=True, help="the study's folder (a rerun resumes it)")
    parser.add_argument("--device", help="device of the evaluations (default: cuda when there is one)")
    args = parser.parse_args(argv)
    return run_study(args.study, args.out, args.device)


if __name__ == "__main__":
    run_cli(main)
