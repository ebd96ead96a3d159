"""The evaluations of a study: each ``[[eval]]`` on each of its data sets for every run's checkpoint,
through the library's evaluators, with the features cached (``DIR/features``), each fine-tuning
in its own run folders (``DIR/finetune/<run>/``, which a killed one resumes) and each result
saved (``DIR/evals``) so that a rerun evaluates only what is missing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..checkpoint import atomic_write_text
from ..errors import ConfigError, UserError
from ..evaluation.features import Features, FeatureExtractor
from ..evaluation.fewshot import fewshot
from ..evaluation.finetune import FinetuneSettings, build_run, finetune
from ..evaluation.knn import knn
from ..evaluation.linear import ProbeSettings, linear_probe
from .spec import Evaluation, Study

EXTRACTION = ("max_train", "max_test", "batch_size")  # settings of the feature extraction (every kind but finetune)


@dataclass(frozen=True)
class Target:
    """One run's checkpoint on one data set, in the study folder ``out``."""

    out: str
    run_name: str
    checkpoint: str
    data: str
    device: torch.device
    num_workers: int = 0

    def features(self, s: dict) -> Features:
        """The checkpoint's features of the data, cached in ``DIR/features``, as the settings extract them."""
        extractor = FeatureExtractor.from_checkpoint(self.checkpoint, self.device, os.path.join(self.out, "features"),
                                                     batch_size=s.get("batch_size", 256),
                                                     num_workers=self.num_workers)
        return extractor.features(self.data, max_train=s.get("max_train"), max_test=s.get("max_test"))


def _knn(t: Target, s: dict) -> dict[str, float]:
    ks = s.get("k", [20])
    return {f"k{r['k']}_top1": r["accuracy"] for r in knn(t.features(s), ks, s.get("temperature", 0.07))}


def _fewshot(t: Target, s: dict) -> dict[str, float]:
    records = fewshot(t.features(s), s.get("shots", [10]), s.get("seeds", 3))
    return {f"{r['shots']}shot": r["accuracy"] for r in records}


LINEAR = ("epochs", "lr", "probe_batch_size", "bn", "momentum", "weight_decay", "seed", "label_fraction")


def _linear(t: Target, s: dict) -> dict[str, float]:
    """The cached-features probe; ``probe_batch_size`` as in ``eval.linear`` (``batch_size`` extracts)."""
    given = {("batch_size" if k == "probe_batch_size" else k): v for k, v in s.items() if k in LINEAR}
    return {"top1": linear_probe(t.features(s), ProbeSettings(**given))["accuracy"]}


SET_BY_THE_STUDY = ("out", "device", "image_column", "label_column")  # of a fine-tuning: the study's
FINETUNE = tuple(f.name for f in dataclasses.fields(FinetuneSettings) if f.name not in SET_BY_THE_STUDY)


def _finetune(t: Target, s: dict) -> dict[str, float]:
    """``eval.finetune``'s run, in ``DIR/finetune/<run>/`` (a killed one resumes there)."""
    settings = FinetuneSettings(**s, out=os.path.join(t.out, "finetune", t.run_name), device=t.device.type)
    record, _ = finetune(build_run(t.checkpoint, t.data, settings))
    return {"top1": record["accuracy"]}


# kind -> (metrics from the target and the settings, the settings it takes)
EVALUATORS: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "knn": (_knn, ("k", "temperature", *EXTRACTION)),
    "fewshot": (_fewshot, ("shots", "seeds", *EXTRACTION)),
    "linear": (_linear, (*LINEAR, *EXTRACTION)),
    "finetune": (_finetune, FINETUNE),
}


def check_evaluations(study: Study) -> None:
    """Every evaluation kind is one a study runs, and every setting one it takes."""
    for i, e in enumerate(study.evals):
        where = f"{study.source} [[eval]] #{i + 1} ({e.kind})"
        if e.kind not in EVALUATORS:
            raise ConfigError(f"{where}: a study cannot run {e.kind} yet (it runs {', '.join(EVALUATORS)}); run "
                              f"python -m eval.{e.kind} on the study's runs/*/ckpt.pt")
        valid = EVALUATORS[e.kind][1]
        unknown = sorted(set(e.settings) - set(valid))
        if unknown:
            raise ConfigError(f"{where}: unknown settings {unknown}; valid: {', '.join(valid)}")
        if e.kind == "finetune":
            try:
                FinetuneSettings(**e.settings)  # its protocol is one of PROTOCOLS
            except UserError as err:
                raise ConfigError(f"{where}: {err}") from err


def result_path(out: str, run_name: str, e: Evaluation, data: str) -> str:
    key = json.dumps({"kind": e.kind, "data": data, "settings": e.settings}, sort_keys=True)
    return os.path.join(out, "evals", run_name, f"{e.kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def evaluate(out: str, run_name: str, checkpoint: str, e: Evaluation, data: str, device: torch.device,
             num_workers: int = 0) -> dict[str, float]:
    """Metrics of one evaluation of one checkpoint on one data set, from ``DIR/evals`` when saved."""
    path = result_path(out, run_name, e, data)
    if os.path.exists(path):
        return json.load(open(path))["metrics"]
    target = Target(out, run_name, checkpoint, data, device, num_workers)
    metrics = EVALUATORS[e.kind][0](target, e.settings)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    record = {"checkpoint": checkpoint, "kind": e.kind, "data": data, "settings": e.settings, "metrics": metrics}
    atomic_write_text(path, json.dumps(record, indent=1))
    return metrics
