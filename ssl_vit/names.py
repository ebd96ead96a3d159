"""Short names for checkpoints and data sets, for run folders, table rows and figure panels."""

from __future__ import annotations

import os
import re

SPEC_SUFFIXES = (".pt", ".safetensors", ".parquet")  # dropped from a file's name


def short_name(spec: str) -> str:
    """``runs/x/ckpt.pt`` -> ``x`` (the run folder), ``timm:NAME`` -> ``NAME``, ``a/b.safetensors``
    -> ``b``, ``../data/cifar10`` -> ``cifar10``, a hub name ``user/set`` -> ``set``."""
    if spec.startswith("timm:"):
        return spec[len("timm:"):]
    path = os.path.normpath(spec)
    if os.path.basename(path) == "ckpt.pt":
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    name = os.path.basename(path)
    for suffix in SPEC_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def folder_safe(name: str) -> str:
    """Letters and digits kept, every other run of characters one underscore."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
