"""The evaluations of a study: each ``[[eval]]`` on each of its data sets for every run's checkpoint,
through the library's evaluators, with the features cached (``DIR/features``) and each result
saved (``DIR/evals``) so that a rerun evaluates only what is missing."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

import torch

from ..checkpoint import atomic_write
from ..errors import ConfigError
from ..evaluation.features import FeatureExtractor
from ..evaluation.fewshot import fewshot
from ..evaluation.knn import knn
from ..evaluation.linear import ProbeSettings, linear_probe
from .spec import Evaluation, Study

EXTRACTION = ("max_train", "max_test", "batch_size")  # settings of the feature extraction, for every kind


def _knn(features, s: dict) -> dict[str, float]:
    ks = s.get("k", [20])
    return {f"k{r['k']}_top1": r["accuracy"] for r in knn(features, ks, s.get("temperature", 0.07))}


def _fewshot(features, s: dict) -> dict[str, float]:
    records = fewshot(features, s.get("shots", [10]), s.get("seeds", 3))
    return {f"{r['shots']}shot": r["accuracy"] for r in records}


LINEAR = ("epochs", "lr", "probe_batch_size", "bn", "momentum", "weight_decay", "seed", "label_fraction")


def _linear(features, s: dict) -> dict[str, float]:
    """The cached-features probe; ``probe_batch_size`` as in ``eval.linear`` (``batch_size`` extracts)."""
    given = {("batch_size" if k == "probe_batch_size" else k): v for k, v in s.items() if k in LINEAR}
    return {"top1": linear_probe(features, ProbeSettings(**given))["accuracy"]}


# kind -> (metrics from features and settings, the settings it takes)
EVALUATORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "knn": (_knn, ("k", "temperature")),
    "fewshot": (_fewshot, ("shots", "seeds")),
    "linear": (_linear, LINEAR),
}


def check_evaluations(study: Study) -> None:
    """Every evaluation kind is one a study runs, and every setting one it takes."""
    for i, e in enumerate(study.evals):
        where = f"{study.source} [[eval]] #{i + 1} ({e.kind})"
        if e.kind not in EVALUATORS:
            raise ConfigError(f"{where}: a study cannot run {e.kind} yet (it runs {', '.join(EVALUATORS)}); run "
                              f"python -m eval.{e.kind} on the study's runs/*/ckpt.pt")
        valid = (*EVALUATORS[e.kind][1], *EXTRACTION)
        unknown = sorted(set(e.settings) - set(valid))
        if unknown:
            raise ConfigError(f"{where}: unknown settings {unknown}; valid: {', '.join(valid)}")


def result_path(out: str, run_name: str, e: Evaluation, data: str) -> str:
    key = json.dumps({"kind": e.kind, "data": data, "settings": e.settings}, sort_keys=True)
    return os.path.join(out, "evals", run_name, f"{e.kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def evaluate(out: str, run_name: str, checkpoint: str, e: Evaluation, data: str, device: torch.device,
             num_workers: int = 0) -> dict[str, float]:
    """Metrics of one evaluation of one checkpoint on one data set, from ``DIR/evals`` when saved."""
    path = result_path(out, run_name, e, data)
    if os.path.exists(path):
        return json.load(open(path))["metrics"]
    extractor = FeatureExtractor.from_checkpoint(checkpoint, device, os.path.join(out, "features"),
                                                 batch_size=e.settings.get("batch_size", 256),
                                                 num_workers=num_workers)
    features = extractor.features(data, max_train=e.settings.get("max_train"), max_test=e.settings.get("max_test"))
    metrics = EVALUATORS[e.kind][0](features, e.settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"checkpoint": checkpoint, "kind": e.kind, "data": data, "settings": e.settings, "metrics": metrics}
    atomic_write(path, lambda tmp: open(tmp, "w").write(json.dumps(record, indent=1)))
    return metrics
