"""A study file (TOML), read and checked before anything runs: every objective, flag and evaluation
is named in the error when it is wrong, with the valid ones.

    objectives = ["masked_patch", "mae"]
    seeds = [0, 1]
    budget = { flops = 2e13 }            # or { steps = N }, { epochs = N }, { images = N }
    data = "../shared/data/cifar10"      # any --data form
    [common]                             # flags of every run, as in the recipes' --help, with underscores
    model = "vit_tiny"
    [objective.mae]                      # flags of one objective's runs
    mask_ratio = 0.75
    [[eval]]
    kind = "knn"                         # knn | fewshot | linear | finetune
    data = ["../shared/data/cifar10"]    # one --data form or a list (default: the study's data)
    # and the evaluation's own settings (its command's flags, with underscores): max_train = 2000
    # (finetune: eval.finetune's flags but out, device and the columns: steps = 500, lr = 0.003;
    # each run fine-tunes in DIR/finetune/<run>/, reporting top1)
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from typing import Any

from ..backbone import BackboneConfig
from ..config import RunConfig, TrainConfig, _typed, parse_run_config
from ..errors import ConfigError
from ..objectives import OBJECTIVES, get_objective

BUDGET_KINDS = ("steps", "epochs", "images", "flops")
EVAL_KINDS = ("knn", "fewshot", "linear", "finetune")
TOP_LEVEL = ("objectives", "seeds", "budget", "data", "common", "objective", "eval")
FIXED_BY_THE_STUDY = ("steps", "seed", "out", "data", "stop_at")  # each run's are the study's


@dataclass(frozen=True)
class Evaluation:
    """One ``[[eval]]`` table: an evaluation kind on one or more data sets, with its settings."""

    kind: str
    data: tuple[str, ...]
    settings: dict = field(default_factory=dict)


@dataclass
class Study:
    objectives: list[str]
    seeds: list[int]
    budget_kind: str  # one of BUDGET_KINDS
    budget: float
    data: str
    common: dict
    per_objective: dict[str, dict]
    evals: list[Evaluation]
    source: str = "study.toml"

    def flags(self, objective: str) -> dict:
        """The flags of ``objective``'s runs: the recipe's defaults, then [common], then [objective.X]."""
        return {**get_objective(objective).recipe_defaults, **self.common, **self.per_objective.get(objective, {})}

    def run_config(self, objective: str, seed: int, steps: int, out: str) -> RunConfig:
        """The ``RunConfig`` of one run, as its recipe would parse it."""
        run = parse_run_config(objective, get_objective(objective).Config, self.flags(objective), argv=[])
        run.train = dataclasses.replace(run.train, steps=steps, seed=seed, out=out, data=self.data)
        return run

    def as_dict(self) -> dict:
        """What a rerun compares: a changed study is refused, naming the differences."""
        return {"objectives": self.objectives, "seeds": self.seeds, "budget": {self.budget_kind: self.budget},
                "data": self.data, "common": self.common, "objective": self.per_objective,
                "eval": [dataclasses.asdict(e) | {"data": list(e.data)} for e in self.evals]}


def _one_of(name: str, value: Any, valid, where: str) -> None:
    if value not in valid:
        raise ConfigError(f"{where}: unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")


def _check_flags(objective: str, flags: dict, where: str) -> dict:
    """Flags typed as the recipe's fields; an unknown or fixed one is refused by name."""
    hints = {name: tp for cls in (TrainConfig, BackboneConfig, get_objective(objective).Config)
             for name, tp in typing.get_type_hints(cls).items()}
    for name in flags:
        if name in FIXED_BY_THE_STUDY:
            raise ConfigError(f"{where}: {name} is set by the study for every run (budget, seeds, data); remove it")
        if name not in hints:
            raise ConfigError(f"{where}: unknown flag {name!r} for the {objective} recipe; valid: "
                              f"{', '.join(sorted(n for n in hints if n not in FIXED_BY_THE_STUDY))}")
    return {name: _typed(name, value, hints[name], where) for name, value in flags.items()}


def _budget(table: Any, where: str) -> tuple[str, float]:
    if not isinstance(table, dict) or len(table) != 1:
        raise ConfigError(f"{where}: budget must be one of {{ steps = N }}, {{ epochs = N }}, {{ images = N }} "
                          "or { flops = N }")
    (kind, value), = table.items()
    _one_of("budget", kind, BUDGET_KINDS, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where}: budget {kind} = {value!r}: use a positive number")
    return kind, float(value)


def _evaluation(table: dict, default_data: str, where: str) -> Evaluation:
    table = dict(table)
    kind = table.pop("kind", None)
    _one_of("evaluation kind", kind, EVAL_KINDS, where)
    data = table.pop("data", default_data)
    data = (data,) if isinstance(data, str) else tuple(data)
    if not data or not all(isinstance(d, str) for d in data):
        raise ConfigError(f"{where}: data = {data!r}: use a --data form or a list of them")
    return Evaluation(kind, data, table)


def parse_study(text: str, source: str = "study.toml") -> Study:
    """A ``Study`` from a study file's text; every error names the file, the table and the fix."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source} is not valid TOML: {err}") from err
    for key in doc:
        _one_of("key", key, TOP_LEVEL, source)
    for key in ("objectives", "seeds", "budget", "eval"):
        if key not in doc:
            raise ConfigError(f"{source}: {key} is missing (a study names its objectives, seeds, budget and evals)")
    objectives = list(doc["objectives"])
    for name in objectives:
        _one_of("objective", name, list(OBJECTIVES), f"{source} objectives")
    if not objectives or len(set(objectives)) != len(objectives):
        raise ConfigError(f"{source}: objectives = {objectives}: list each objective once")
    seeds = doc["seeds"]
    if not seeds or not all(type(s) is int for s in seeds) or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{source}: seeds = {seeds!r}: use a list of distinct whole numbers")
    per = doc.get("objective", {})
    for name in per:
        if name not in objectives:
            raise ConfigError(f"{source} [objective.{name}]: {name} is not among the objectives {objectives}")
    common = {o: _check_flags(o, doc.get("common", {}), f"{source} [common]") for o in objectives}
    data = doc.get("data", "default")
    budget_kind, budget = _budget(doc["budget"], f"{source} budget")
    return Study(objectives=objectives, seeds=list(seeds), budget_kind=budget_kind, budget=budget, data=data,
                 common=common[objectives[0]],
                 per_objective={o: _check_flags(o, per[o], f"{source} [objective.{o}]") for o in per},
                 evals=[_evaluation(e, data, f"{source} [[eval]] #{i + 1}") for i, e in enumerate(doc["eval"])],
                 source=source)
