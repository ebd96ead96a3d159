"""Registry of pretraining objectives: name -> "module:Class". One line per objective.

``load_objective(ckpt)`` rebuilds the whole objective of any ``ckpt.pt`` (backbone, heads,
decoder, teacher) for the pictures and tools that need more than the backbone.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Optional, Union

from ..backbone import Backbone, BackboneConfig
from ..checkpoint import CheckpointError, load_checkpoint, load_weights, objective_state
from .base import DataInfo, Objective, StepInfo

OBJECTIVES: dict[str, str] = {
    "supervised": "ssl_vit.objectives.supervised:Supervised",
    "masked_patch": "ssl_vit.objectives.masked_patch:MaskedPatchPrediction",
    "mae": "ssl_vit.objectives.mae:MAE",
    "dino": "ssl_vit.objectives.dino:DINO",
    "msn": "ssl_vit.objectives.msn:MSN",
    "distill": "ssl_vit.objectives.distill:Distill",
}


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def load_objective(ckpt: Union[str, dict], expect: Optional[str] = None) -> Objective:
    """The objective of a ``ckpt.pt`` (a path or a loaded checkpoint), in eval mode, with every
    trained tensor loaded; a checkpoint that lacks some names them. ``expect``: the objective the
    caller needs (a checkpoint of another is refused, naming the recipe that writes the right one)."""
    path = ckpt if isinstance(ckpt, str) else "the checkpoint"
    ckpt = load_checkpoint(ckpt) if isinstance(ckpt, str) else ckpt
    if expect is not None and ckpt["objective"] != expect:
        raise CheckpointError(f"{path} is a {ckpt['objective']} checkpoint; pass a ckpt.pt written by "
                              f"recipes/{expect}.py")
    cls = get_objective(ckpt["objective"])
    data = DataInfo(**{f.name: ckpt["data"][f.name] for f in dataclasses.fields(DataInfo)})
    objective = cls(Backbone(BackboneConfig(**ckpt["arch"])), cls.Config(**ckpt["objective_config"]), data)
    load_weights(objective.export_backbone(), ckpt["state_dict"], path)
    own = objective.objective_state()
    saved = objective_state(ckpt)
    missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: the saved {ckpt['objective']} state does not fit (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}); a checkpoint written before ssl_vit saved them "
                              "loads as a backbone only (load_backbone)")
    objective.load_state_dict(saved, strict=False)  # the exported backbone came from state_dict above
    return objective.eval()


__all__ = ["DataInfo", "OBJECTIVES", "Objective", "StepInfo", "get_objective", "load_objective"]
