"""The frozen teacher of distillation: any classifier over the data's classes, by name.

``--teacher`` takes what the evaluations take, where it has a class head:

- a ``ckpt.pt`` of ``recipes/supervised.py`` or ``recipes/distill.py`` (the head is in its
  ``objective_state``; a distilled checkpoint predicts with the mean of its two heads);
- a timm classifier name with ``--teacher-weights FILE`` (``.safetensors`` or ``.pth`` in timm's key
  names, e.g. a RegNet or ResNet), loaded by ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay=dict(file=FILE))``;
- ``timm:NAME`` (or ``NAME``) without weights: timm's pretrained weights, downloaded.

A ``.safetensors`` export of ``python -m ssl_vit.export`` holds the backbone without its head, so it
cannot teach. The teacher must predict the data's classes (their number, and their names where both
are known); it runs frozen, in eval mode, without gradients, and sees the student's batch resized
(bicubic, antialiased) to its own input size and renormalised to its own mean and std.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .base import DataInfo


class TeacherError(UserError):
    """A --teacher that cannot teach this data; the message says what would."""


class FrozenTeacher(nn.Module):
    """A frozen classifier on the student's batches: [B, C, h, w] images normalised as the student's
    data -> [B, K] float32 logits, computed at the teacher's input size and normalisation."""

    def __init__(self, model: nn.Module, classify: Callable[[torch.Tensor], torch.Tensor],
                 input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], student: DataInfo,
                 name: str):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.classify, self.input_size, self.name = classify, tuple(input_size), name
        # pixels = x * student_std + student_mean, teacher input = (pixels - mean) / std: one affine map
        mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        s_mean, s_std = torch.tensor(student.mean).view(1, -1, 1, 1), torch.tensor(student.std).view(1, -1, 1, 1)
        self.register_buffer("scale", s_std / std, persistent=False)
        self.register_buffer("shift", (s_mean - mean) / std, persistent=False)
        self.student_size = (student.img_size, student.img_size)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * self.scale + self.shift
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False, antialias=True)
        return self.classify(x).float()

    def describe(self) -> str:
        """One line on what the teacher is and what its inputs go through."""
        size = (f"the student's {self.student_size[0]} px images resized to {self.input_size[0]} px (bicubic)"
                if self.input_size != self.student_size else f"the student's {self.input_size[0]} px images")
        return f"teacher: {self.name}, frozen in eval mode, on {size}, renormalised to its own mean and std"


def load_teacher(spec: str, weights: Optional[str], data: DataInfo, img_size: Optional[int] = None) -> FrozenTeacher:
    """The teacher ``spec`` names (see the module docstring), checked against ``data``'s classes.
    ``img_size``: its input size (None: its own, from its checkpoint or timm's pretrained config)."""
    if spec.endswith(".safetensors"):
        raise TeacherError(f"--teacher {spec}: a .safetensors export holds the backbone without its class head; pass "
                           "the run's ckpt.pt, or a timm classifier name with --teacher-weights FILE")
    if os.path.exists(spec):
        if weights is not None:
            raise TeacherError(f"--teacher-weights {weights}: {spec} is a ckpt.pt that holds its own weights; drop "
                               "--teacher-weights (it is for a timm model name)")
        return _checkpoint_teacher(spec, data, img_size)
    return _timm_teacher(spec.removeprefix("timm:"), weights, data, img_size)


def _check_classes(spec: str, num_classes: int, class_names: Optional[list], data: DataInfo) -> None:
    if num_classes != data.num_classes:
        raise TeacherError(f"--teacher {spec} predicts {num_classes} classes and {data.name} has {data.num_classes}: "
                           "pass a teacher trained on the same classes")
    if class_names and data.class_names and list(class_names) != list(data.class_names):
        raise TeacherError(f"--teacher {spec} was trained on the classes {list(class_names)[:5]}..., "
                           f"{data.name} has {list(data.class_names)[:5]}...: pass a teacher of the same classes")


def _checkpoint_teacher(path: str, data: DataInfo, img_size: Optional[int]) -> FrozenTeacher:
    from . import load_objective  # the registry imports the objectives that import this module
    from .supervised import Supervised

    objective = load_objective(path)
    if not isinstance(objective, Supervised):
        raise TeacherError(f"--teacher {path} is a {type(objective).__name__} checkpoint, without a class head; pass a "
                           "ckpt.pt of recipes/supervised.py or recipes/distill.py, or a timm classifier")
    own = objective.data
    _check_classes(path, own.num_classes, own.class_names, data)
    size = img_size or own.img_size
    return FrozenTeacher(objective, objective.logits, (size, size), own.mean, own.std, data, path)


def _timm_teacher(name: str, weights: Optional[str], data: DataInfo, img_size: Optional[int]) -> FrozenTeacher:
    if not timm.is_model(name):
        raise TeacherError(f"--teacher {name}: no such file, and not a timm model name; pass a ckpt.pt of "
                           "recipes/supervised.py or recipes/distill.py, or a timm classifier name (with "
                           "--teacher-weights FILE, or timm:NAME for timm's pretrained weights)")
    with torch.device("meta"):  # its classifier and classes, without allocating weights
        probe = timm.create_model(name)
    if weights is None:
        _check_classes(name, probe.pretrained_cfg.get("num_classes", probe.num_classes), None, data)
        model = _download(name)
    else:
        classes = _classes_in_file(name, weights, probe.pretrained_cfg.get("classifier"))
        _check_classes(f"{name} --teacher-weights {weights}", classes, None, data)
        try:
            model = timm.create_model(name, pretrained=True, num_classes=classes,
                                      pretrained_cfg_overlay=dict(file=weights, num_classes=classes))
        except RuntimeError as err:  # torch's load_state_dict: missing, unexpected or mis-shaped weights
            raise TeacherError(f"--teacher-weights {weights} are not {name}'s weights: {str(err).splitlines()[0]}")
    config = timm.data.resolve_model_data_config(model)
    size = (img_size, img_size) if img_size else tuple(config["input_size"][1:])
    return FrozenTeacher(model, model.forward, size, config["mean"], config["std"], data, name)


def _classes_in_file(name: str, weights: str, classifier) -> int:
    """The number of classes of the classifier weights in ``weights`` (timm's key names)."""
    if not os.path.isfile(weights):
        raise TeacherError(f"--teacher-weights {weights} does not exist")
    try:
        state = timm.models.load_state_dict(weights)
    except Exception as err:  # safetensors' and torch's readers have their own error types
        raise TeacherError(f"--teacher-weights {weights} is not a readable weights file ({err})") from err
    key = f"{classifier[0] if isinstance(classifier, (tuple, list)) else classifier}.weight"
    if key not in state:
        raise TeacherError(f"--teacher-weights {weights} has no {key} (the classifier of {name}): pass {name}'s "
                           "weights with timm's key names")
    return state[key].shape[0]


def _download(name: str) -> nn.Module:
    """timm's pretrained classifier ``name`` (from the Hugging Face hub or its URL)."""
    try:
        return timm.create_model(name, pretrained=True)
    except Exception as err:  # the hub's and urllib's errors: offline, no such weights, no access
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TeacherError(f"--teacher timm:{name}: timm could not fetch its pretrained weights ({first}); on a "
                           "machine without internet pass --teacher-weights FILE") from err
