"""Registry of pretraining objectives: name -> "module:Class". One line per objective."""

from __future__ import annotations

import importlib

from .base import DataInfo, Objective, StepInfo

OBJECTIVES: dict[str, str] = {
    "supervised": "ssl_vit.objectives.supervised:Supervised",
    "masked_patch": "ssl_vit.objectives.masked_patch:MaskedPatchPrediction",
    "mae": "ssl_vit.objectives.mae:MAE",
    "dino": "ssl_vit.objectives.dino:DINO",
}


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; registered: {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["DataInfo", "OBJECTIVES", "Objective", "StepInfo", "get_objective"]
