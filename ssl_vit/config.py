"""Typed run configuration and the command line built from it.

Flags come from three dataclasses: ``TrainConfig`` (data, optimisation, run folder),
``BackboneConfig`` and the objective's own ``Config``. Precedence: the recipe's defaults, then
``--config FILE`` (JSON or TOML with the same keys), then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .backbone import PRESETS, BackboneConfig
from .data.subsets import check_fraction
from .errors import ConfigError

CHOICES = {"precision": ("auto", "no", "bf16", "fp16"), "lr_scaling": ("linear", "sqrt"), "on_nonfinite": ("stop", "skip"),
           "clip_grad_mode": ("norm", "per_param")}
AT_LEAST = {"steps": 0, "batch_size": 1, "grad_accum": 1, "log_every": 1, "save_every": 0, "eval_every": 0,
            "max_skipped_steps": 1, "monitor_every": 1, "monitor_max_train": 1,
            "monitor_max_test": 1}  # 0 for save_every / eval_every: at the end only
AUTO = "auto"


def count_or_auto(value, name: str = "num_workers", where: str = "") -> Union[int, str]:
    """A setting that is a whole number >= 0 or "auto" (resolved when the run starts), from a flag or a file."""
    if value == AUTO:
        return AUTO
    try:
        count = int(value) if not isinstance(value, (bool, float)) else None
    except (TypeError, ValueError):
        count = None
    if count is None or count < 0:
        raise ConfigError(f"{_flag(name)} {value!r}{where}: use auto or a whole number >= 0")
    return count


COUNT_OR_AUTO = {"num_workers"}  # settings that count_or_auto reads
TRACKERS = ("tensorboard", "wandb", "mlflow")  # --report-to also takes "all" (every one) and "none"
MONITORS = ("knn", "fewshot", "rankme")  # --monitor: a comma-separated subset, or "none"


def requested_trackers(report_to: str) -> tuple[str, ...]:
    """The trackers ``--report-to`` names: one of TRACKERS or a comma-separated list of them, "all" or "none"."""
    names = [name.strip() for name in report_to.split(",")]
    if names in (["all"], ["none"]):
        return TRACKERS if names == ["all"] else ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report-to {report_to}: unknown tracker {', '.join(map(repr, unknown))}; use one of "
                          f"{', '.join(TRACKERS)}, a comma-separated list of them (wandb,mlflow), all or none")
    return tuple(dict.fromkeys(names))


def requested_monitors(monitor: str) -> tuple[str, ...]:
    """The online monitors ``--monitor`` names: a comma-separated subset of MONITORS, or "none"."""
    names = [name.strip() for name in monitor.split(",")]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in MONITORS]
    if unknown:
        raise ConfigError(f"--monitor {monitor}: unknown monitor {', '.join(map(repr, unknown))}; use one of "
                          f"{', '.join(MONITORS)}, a comma-separated list of them (knn,rankme) or none")
    return tuple(dict.fromkeys(names))


@dataclass
class TrainConfig:
    # data
    data: str = "default"  # "default", a local folder or Parquet file, or a Hugging Face hub name
    image_column: Optional[str] = None  # detected when not given
    label_column: Optional[str] = None  # detected when not given
    streaming: bool = False  # stream a hub data set instead of downloading it
    skip_bad_images: bool = False  # skip and count unreadable images instead of stopping
    num_workers: Union[int, str] = AUTO  # loader workers per process; auto: the CPUs per process, less one, at most 16
    data_on_device: bool = False  # decode the train split once onto the training device and augment batches there
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop scale range
    hflip: bool = True
    randaugment: Optional[str] = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" (MAE fine-tuning)
    random_erasing: float = 0.0  # probability of timm's RandomErasing (pixel mode, one box; MAE fine-tuning: 0.25)
    label_fraction: float = 1.0  # objectives trained on labels: this class-balanced fraction of the train split (0.01, 0.1)
    # optimisation
    steps: int = 1000  # optimizer steps; 0 writes the random-init checkpoint
    stop_at: Optional[int] = None  # stop early at this step and write ckpt.pt (the schedule keeps --steps)
    batch_size: int = 64  # images per optimizer step, over all processes and accumulation
    grad_accum: int = 1  # micro-batches per optimizer step
    init: Optional[str] = None  # start the backbone from a checkpoint (ckpt.pt, timm:NAME, .safetensors)
    optimizer: str = "adamw"  # any timm optimizer name: adamw, adam, sgd, lamb...
    layer_decay: Optional[float] = None  # layer-wise lr decay (e.g. 0.65), layers from timm's group_matcher
    lr: float = 1e-3  # peak learning rate (at --lr-ref-batch when that is set)
    lr_ref_batch: Optional[int] = None  # lr is for this batch size; other batches scale it (--lr-scaling)
    lr_scaling: str = "linear"  # linear: lr * batch/ref (SGD, AdamW recipes); sqrt: lr * sqrt(batch/ref) (Adam)
    min_lr: float = 0.0
    warmup_steps: Optional[int] = None  # None: 10% of the steps, at most 10,000 (the paper's)
    weight_decay: float = 0.1  # none on biases and norms; tokens and position embeddings per objective
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping
    clip_grad_mode: str = "norm"  # norm: of all gradients together; per_param: of each parameter's (DINO)
    precision: str = "auto"  # auto (bf16 on a GPU, float32 on a CPU) | no (float32) | bf16 | fp16 (GPU only)
    seed: int = 0
    # run folder
    out: Optional[str] = None  # run folder; default runs/<objective>-<data>-<model>
    save_every: int = 500  # training state every N steps (resume point; 0: at the end only)
    log_every: int = 10
    eval_every: int = 0  # test metric every N steps (0: at the end only)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient does
    max_skipped_steps: int = 10  # with --on-nonfinite skip: skip at most this many non-finite steps in a row
    compile: bool = False  # torch.compile the objective
    report_to: str = "tensorboard"  # experiment trackers: tensorboard, wandb, mlflow, a list (wandb,mlflow), all, none
    # online monitors of the representation (ssl_vit.evaluation.monitor)
    monitor: str = "none"  # knn, fewshot, rankme, a comma-separated subset (knn,rankme) or none
    monitor_every: int = 200  # monitor every N steps (and at the last step)
    monitor_data: Optional[str] = None  # data set the monitors read (default: the run's own data)
    monitor_max_train: int = 1000  # fixed random subset of the monitor data's train split (kNN memory, few-shot pool)
    monitor_max_test: int = 250  # fixed random subset of its test split (kNN and few-shot queries)

    def __post_init__(self):
        for name, valid in CHOICES.items():
            if getattr(self, name) not in valid:
                raise ConfigError(f"{_flag(name)} {getattr(self, name)!r}: use one of {', '.join(valid)}")
        for name, low in AT_LEAST.items():
            if getattr(self, name) < low:
                raise ConfigError(f"{_flag(name)} {getattr(self, name)}: must be >= {low}"
                                  + (" (0: at the end only)" if low == 0 and name.endswith("_every") else ""))
        if not 0.0 <= self.random_erasing <= 1.0:
            raise ConfigError(f"--random-erasing {self.random_erasing}: use a probability in [0, 1]")
        check_fraction(self.label_fraction)
        self.num_workers = count_or_auto(self.num_workers)
        if self.stop_at is not None and self.stop_at < 0:
            raise ConfigError(f"--stop-at {self.stop_at}: must be >= 0")
        requested_trackers(self.report_to)
        requested_monitors(self.monitor)


@dataclass
class RunConfig:
    objective: str
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    objective_config: Any = None

    def to_dict(self) -> dict:
        return {
            "objective": self.objective,
            "train": dataclasses.asdict(self.train),
            "backbone": dataclasses.asdict(self.backbone),
            "objective_config": dataclasses.asdict(self.objective_config),
        }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_fields(parser: argparse.ArgumentParser, cls, defaults: dict, group: str) -> None:
    hints = typing.get_type_hints(cls)
    g = parser.add_argument_group(group)
    for f in dataclasses.fields(cls):
        tp, _ = unwrap_optional(hints[f.name])
        default = defaults.get(f.name, f.default)
        origin = typing.get_origin(tp)
        if f.name in COUNT_OR_AUTO:
            g.add_argument(_flag(f.name), type=str, default=default, metavar="N|auto")  # checked by the config
        elif tp is bool:
            g.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default)
        elif origin is tuple:
            args = typing.get_args(tp)
            g.add_argument(_flag(f.name), type=args[0], nargs=len(args), default=default, metavar=f.name.upper())
        else:
            g.add_argument(_flag(f.name), type=tp, default=default)


def _read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh) if path.endswith(".toml") else json.load(fh)
    except OSError as err:
        raise ConfigError(f"--config {path}: cannot read it ({err.strerror})") from err
    except (ValueError, tomllib.TOMLDecodeError) as err:  # json's errors are ValueErrors
        kind = "TOML" if path.endswith(".toml") else "JSON"
        raise ConfigError(f"--config {path} is not valid {kind}: {err}") from err
    flat = {}
    for key, value in data.items():  # accept both a flat file and a saved config.json
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return {k.replace("-", "_"): v for k, v in flat.items() if k != "objective"}


KIND_NAMES = {int: "whole number", float: "number", bool: "boolean (true or false)", str: "string"}


def unwrap_optional(tp):
    """(X, whether None is allowed) for Optional[X]; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _typed(name: str, value, tp, path: str):
    """``value`` from a config file as the field's type, or a ConfigError naming the setting and the file."""
    tp, optional = unwrap_optional(tp)
    if value is None and optional:
        return None
    kinds = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, (list, tuple)) and len(value) == len(kinds):
            return tuple(_typed(name, v, k, path) for v, k in zip(value, kinds))
        wanted = f"a list of {len(kinds)} {KIND_NAMES[kinds[0]]}s"
    else:
        if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        wanted = f"a {KIND_NAMES[tp]}"
    raise ConfigError(f"{name} = {value!r} in {path}: expected {wanted}{' or null' if optional else ''}")


def parse_run_config(objective: str, objective_config_cls, defaults: Optional[dict] = None,
                     argv: Optional[list[str]] = None, description: str = "") -> RunConfig:
    """Build the parser from the three dataclasses, apply the recipe's defaults, parse argv."""
    defaults = dict(defaults or {})
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--patch-size")  # named by the user (as --patch-size N or --patch-size=N)?
    known, _ = pre.parse_known_args(argv)
    file_settings = _read_config_file(known.config) if known.config else {}

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     allow_abbrev=False)  # --step is not --steps
    parser.add_argument("--config", help="JSON or TOML file of settings (flags override it)")
    groups = [(TrainConfig, "training"), (BackboneConfig, "backbone"), (objective_config_cls, objective)]
    names = [f.name for cls, _ in groups for f in dataclasses.fields(cls)]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"config fields defined twice: {dup}"
    hints = {f.name: typing.get_type_hints(cls)[f.name] for cls, _ in groups for f in dataclasses.fields(cls)}
    defaults.update({k: count_or_auto(v, k, f" in {known.config}") if k in COUNT_OR_AUTO
                     else _typed(k, v, hints[k], known.config) for k, v in file_settings.items() if k in hints})
    defaults.update({k: v for k, v in file_settings.items() if k not in hints})  # refused below, by name
    unknown = set(defaults) - set(names)
    if unknown:
        raise ConfigError(f"unknown settings {sorted(unknown)} (from the recipe or --config); "
                          f"valid: {', '.join(sorted(names))}")
    for cls, title in groups:
        _add_fields(parser, cls, defaults, title)
    args = vars(parser.parse_args(argv))

    def build(cls):
        kw = {f.name: args[f.name] for f in dataclasses.fields(cls)}
        for k, v in kw.items():
            if isinstance(v, list):
                kw[k] = tuple(v)
        return cls(**kw)

    run = RunConfig(objective, build(TrainConfig), build(BackboneConfig), build(objective_config_cls))
    # A recipe's small-image patch size is meant for plain ViTs; a hybrid preset keeps its own patch
    # on the CNN feature map unless the user names one (e.g. r50_vit_base: 1, total stride 16).
    named_patch = known.patch_size is not None or "patch_size" in file_settings
    preset = PRESETS.get(run.backbone.model)
    if preset is not None and preset.hybrid and not named_patch:
        run.backbone.patch_size = None
    return run


def recipe_defaults(objective: str) -> RunConfig:
    """The settings a recipe runs with when given no flags: the dataclasses' defaults under the objective's
    ``recipe_defaults``."""
    from .objectives import get_objective  # the objectives import this module

    cls = get_objective(objective)
    return parse_run_config(objective, cls.Config, cls.recipe_defaults, argv=[])


def flag_args(name: str, value) -> list[str]:
    """One setting as the recipe's flag: ``--x`` / ``--no-x`` for booleans, ``--x a b`` for tuples."""
    if isinstance(value, bool):
        return [_flag(name) if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, (list, tuple)):
        return [_flag(name), *map(str, value)]
    return [_flag(name), str(value)]


def recipe_argv(config: dict) -> tuple[list[str], dict]:
    """The flags that make ``config["objective"]``'s recipe run with the settings of ``config`` (a
    ``RunConfig.to_dict()``, as a run's config.json holds): one per setting that differs from the recipe's
    defaults, the run folder (``out``) left to the user. Also returned: the settings no flag can give (a
    null where the default is a value, or a setting this version no longer has), for a --config file."""
    defaults = json.loads(json.dumps(recipe_defaults(config["objective"]).to_dict()))
    given = json.loads(json.dumps(config))
    argv, rest = [], {}
    for section in ("train", "backbone", "objective_config"):
        for name, value in given[section].items():
            if name == "out" or (name in defaults[section] and value == defaults[section][name]):
                continue
            if name not in defaults[section] or value is None:
                rest[name] = value
            else:
                argv += flag_args(name, value)
    return argv, rest
