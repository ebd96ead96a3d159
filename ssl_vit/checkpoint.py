"""``ckpt.pt``: what the eval modules read, and how any backbone is rebuilt from it.

A checkpoint holds plain tensors and plain Python values only, so it loads with
``torch.load(weights_only=True)``: the backbone's architecture (a ``BackboneConfig`` as a dict),
its state dict with timm key names, the objective and its config, the step and the data set, and
under ``objective_state`` the objective's own tensors (heads, decoder, [mask] embedding; for DINO
and MSN the student, DINO's centre, MSN's prototypes) with the objective's parameter names, minus the
saved backbone.
Files are written atomically (temporary file, then rename): a crash never leaves half a file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import tempfile
from typing import Any, Optional

import torch

from .backbone import Backbone, BackboneConfig
from .errors import UserError

FORMAT = "ssl_vit"
VERSION = 2  # 2: objective_state replaces the per-objective keys of version 1 (LEGACY_STATE_KEYS)
OBJECTIVE_STATE = "objective_state"
STUDENT_PREFIX = "backbone.vit."  # a DINO or MSN student's timm weights inside objective_state
# Version-1 keys -> the prefix their tensors have in the objective's own state dict.
LEGACY_STATE_KEYS = {"head_state_dict": "head.", "mae_state_dict": "decoder.", "masked_patch_state_dict": "",
                     "student_state_dict": STUDENT_PREFIX}
# Objective settings added after checkpoints were written -> the value that keeps those checkpoints' behaviour.
ADDED_OBJECTIVE_SETTINGS = {
    "dino": {"pos_interpolation": "timm"},
    "masked_patch": {"hybrid_mask": "blank"},
    "supervised": {"head_init_std": 0.0},
}


class CheckpointError(UserError):
    """A file that is not a usable ssl_vit checkpoint; the message says why."""


def disk_full(err: BaseException) -> bool:
    """Whether an error from writing a file means the disk is full (torch's writer says so its own way)."""
    return getattr(err, "errno", None) == errno.ENOSPC or any(
        text in str(err) for text in ("No space left", "unexpected pos", "file write failed"))


class DiskFullError(UserError):
    """No space left where a file was being written; nothing half-written is kept."""

    def __init__(self, path: str, kept: str = ""):
        super().__init__(f"no space left on the disk of {path}: nothing was written there{kept}; free space and "
                         "run the same command again")


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path`` in one step; a full disk is a
    ``DiskFullError`` and leaves neither a partial file nor a changed ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it, not mkstemp's private 0600
        os.replace(tmp, path)
    except Exception as err:  # torch's and safetensors' writers have their own error types
        if disk_full(err):
            raise DiskFullError(path) from err
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    """``text`` written to ``path`` atomically (``atomic_write``), the file closed before the rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
    atomic_write(path, write)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def save_checkpoint(path: str, backbone: Backbone, *, objective: str, objective_config: dict,
                    train_config: dict, step: int, data: dict, objective_state: Optional[dict] = None,
                    extra: Optional[dict] = None, backbone_state: Optional[dict] = None) -> None:
    """Write ``ckpt.pt`` atomically (see the module docstring for its contents). ``backbone_state``:
    ``backbone.vit``'s full state dict, where the module holds shards (FSDP)."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": dataclasses.asdict(backbone.cfg),
        "state_dict": _cpu_state(backbone.vit) if backbone_state is None else backbone_state,
        "objective": objective,
        "objective_config": objective_config,
        "train_config": train_config,
        "step": int(step),
        "data": data,
        OBJECTIVE_STATE: objective_state or {},
        **(extra or {}),
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str, mmap: bool = False) -> dict[str, Any]:
    """Read a ``ckpt.pt`` safely (weights_only) with errors that say what is wrong. ``mmap``: map the
    tensors from the file, read only when used (for a look at the metadata)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        raise CheckpointError(
            f"{path} is not a readable ssl_vit checkpoint (truncated, or another kind of file): {err}"
        ) from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a PyTorch file but not an ssl_vit checkpoint (no 'format': 'ssl_vit' entry); "
            "pass a ckpt.pt written by an ssl_vit recipe, timm:MODEL_NAME, or a .safetensors export"
        )
    ckpt["arch"] = upgrade_arch(ckpt["arch"], ckpt["state_dict"])
    ckpt["objective_config"] = {**ADDED_OBJECTIVE_SETTINGS.get(ckpt["objective"], {}), **ckpt["objective_config"]}
    return ckpt


def upgrade_arch(arch: dict, weight_names) -> dict:
    """An architecture saved before ``BackboneConfig.fc_norm`` existed had timm's default: a norm after
    averaging exactly when its weights hold ``fc_norm`` (average pooling); keep that behaviour."""
    if "fc_norm" in arch:
        return arch
    return {**arch, "fc_norm": "fc_norm.weight" in weight_names}


def objective_state(ckpt: dict) -> dict[str, torch.Tensor]:
    """The objective's own tensors of a loaded checkpoint, with the objective's parameter names;
    version-1 checkpoints' per-objective keys are converted."""
    if OBJECTIVE_STATE in ckpt:
        return ckpt[OBJECTIVE_STATE]
    return {prefix + k: v for key, prefix in LEGACY_STATE_KEYS.items() for k, v in ckpt.get(key, {}).items()}


def backbone_from_checkpoint(ckpt: dict, state_key: str = "state_dict") -> Backbone:
    """Rebuild the backbone a checkpoint describes and load its weights."""
    backbone = Backbone(BackboneConfig(**ckpt["arch"]))
    load_weights(backbone, ckpt[state_key])
    return backbone


def load_weights(backbone: Backbone, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load timm-named weights into ``backbone``, resampling the position embeddings in 2-D
    (class token kept apart) when the grid differs, e.g. fine-tuning at a higher resolution."""
    from timm.layers import resample_abs_pos_embed

    state = dict(state_dict)
    vit = backbone.vit
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != vit.pos_embed.shape:
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        old = int(round((pos.shape[1] - n_prefix) ** 0.5))
        state["pos_embed"] = resample_abs_pos_embed(pos, new_size=backbone.base_grid, old_size=(old, old),
                                                    num_prefix_tokens=n_prefix)
    try:
        vit.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights of {source} do not fit the backbone {dataclasses.asdict(backbone.cfg)} "
            f"(a checkpoint of another architecture?): {err}"
        ) from err


def init_weights(backbone: Backbone, source: Backbone) -> dict[str, torch.Tensor]:
    """``source``'s weights for starting ``backbone`` (--init). A backbone that normalises after
    averaging (``fc_norm``) from a source that normalised every token drops the source's final norm
    and starts its own norm fresh, as MAE's fine-tuning does with its pretrained encoder."""
    state = source.vit.state_dict()
    own = backbone.vit.state_dict()
    if "fc_norm.weight" in own and "fc_norm.weight" not in state:
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
        state.update({k: v for k, v in own.items() if k.startswith("fc_norm.")})
    return state


def student_weights(ckpt: dict, path: str) -> dict[str, torch.Tensor]:
    """A DINO or MSN checkpoint's student backbone (timm key names); its saved backbone is the teacher."""
    weights = {k[len(STUDENT_PREFIX):]: v for k, v in objective_state(ckpt).items() if k.startswith(STUDENT_PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} is a {ckpt['objective']} checkpoint: only DINO and MSN runs have a student "
                              "besides their backbone; drop --student")
    return weights


def exported_weights(ckpt: dict, path: str, student: bool = False) -> dict[str, torch.Tensor]:
    """The backbone weights an export of ``ckpt`` holds (timm key names): its saved backbone (for DINO the
    teacher), or with ``student`` a DINO run's student."""
    return student_weights(ckpt, path) if student else ckpt["state_dict"]


def export_safetensors(ckpt_path: str, out_path: str, student: bool = False) -> None:
    """Write the backbone alone as safetensors, loadable by ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=dict(file=out_path), **timm_kwargs)``; both are stored in the metadata.
    ``student``: a DINO or MSN run's student instead of its teacher."""
    from safetensors.torch import save_file

    from .backbone import _timm_kwargs

    ckpt = load_checkpoint(ckpt_path)
    cfg = BackboneConfig(**ckpt["arch"])
    timm_name, timm_kwargs = _timm_kwargs(cfg)
    metadata = {
        "format": FORMAT,
        "arch": json.dumps(ckpt["arch"]),
        "timm_name": timm_name,
        "timm_kwargs": json.dumps(timm_kwargs),
        "objective": ckpt["objective"],
        "step": str(ckpt["step"]),
        "data": json.dumps(ckpt.get("data", {})),
    }
    tensors = {k: v.contiguous() for k, v in exported_weights(ckpt, ckpt_path, student).items()}
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _read_spec(spec: str) -> tuple[dict[str, Any], Optional[dict]]:
    """(what is known about the backbone ``spec`` names, its ssl_vit ckpt.pt if it is one): the
    files' checks run here, nothing is built."""
    if spec.startswith("timm:"):
        arch = dataclasses.asdict(BackboneConfig(model=spec[len("timm:"):]))
        return {"arch": arch, "objective": "random-init", "step": 0, "data": {}}, None
    if spec.endswith(".safetensors"):
        if not os.path.exists(spec):
            raise CheckpointError(f"checkpoint {spec} does not exist")
        from safetensors import safe_open

        try:
            with safe_open(spec, "pt") as fh:
                meta, names = fh.metadata() or {}, list(fh.keys())
        except Exception as err:  # safetensors' own error types: a truncated or foreign file
            raise CheckpointError(f"{spec} is not a readable safetensors file ({err})") from err
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{spec} has no ssl_vit metadata; export it with python -m ssl_vit.export")
        return {"arch": upgrade_arch(json.loads(meta["arch"]), names), "objective": meta.get("objective"),
                "step": int(meta.get("step", 0)), "data": json.loads(meta.get("data", "{}"))}, None
    ckpt = load_checkpoint(spec)
    return {k: v for k, v in ckpt.items() if not k.endswith("state_dict") and k != OBJECTIVE_STATE}, ckpt


def backbone_info(spec: str) -> dict[str, Any]:
    """What ``load_backbone(spec)`` would report (architecture, objective, step, data) without
    building the model; missing or foreign files raise the same ``CheckpointError``."""
    return _read_spec(spec)[0]


def load_backbone(spec: str) -> tuple[Backbone, dict[str, Any]]:
    """Any backbone by name: an ssl_vit ``ckpt.pt``, ``timm:MODEL_NAME`` (random init) or a
    ``.safetensors`` export. Returns the backbone in eval mode and what is known about it."""
    info, ckpt = _read_spec(spec)
    if spec.startswith("timm:"):
        backbone = Backbone(BackboneConfig(**info["arch"]))
    elif ckpt is None:  # a safetensors export
        from safetensors.torch import load_file

        backbone = backbone_from_checkpoint({"arch": info["arch"], "state_dict": load_file(spec)})
    else:
        backbone = backbone_from_checkpoint(ckpt)
    return backbone.eval(), info
