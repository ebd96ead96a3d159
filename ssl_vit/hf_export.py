"""``python -m ssl_vit.export CKPT OUT_DIR --format hf``: the backbone as a Hugging Face ``transformers`` ViT.

The folder holds what ``ViTModel.from_pretrained(OUT_DIR, add_pooling_layer=False)`` and
``ViTImageProcessor.from_pretrained(OUT_DIR)`` read, written by transformers' own ``save_pretrained``:
``config.json`` (a ``ViTConfig``, plus an ``ssl_vit`` entry: the pooling, the objective, the step),
``model.safetensors``, ``preprocessor_config.json`` (bicubic resize to the checkpoint's image size, its
mean/std), and the model card ``README.md`` (``model_card``). ``add_pooling_layer=False`` because ssl_vit
backbones have no pooler: transformers' default adds a dense + tanh layer with random weights (and
warns). The representation ``backbone(images)`` is ``last_hidden_state[:, 0]`` (the class token) or, for
``--global-pool avg``, ``last_hidden_state[:, 1:].mean(1)``: the final LayerNorm normalises every token
before the average, in ssl_vit as in ViTModel's ``layernorm``.

Only what ViTModel computes is converted. Anything else (a ResNet stem, a norm after averaging, no class
token, register tokens, layer scale, qk-norm...) is refused in one line naming the timm export. Before
anything is written, the converted model runs beside ours on a random batch: every output token and
the representation must agree to float precision.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Optional, Sequence

import torch
from torch import nn

from .backbone import Backbone
from .checkpoint import (DiskFullError, backbone_from_checkpoint, disk_full, exported_weights, load_checkpoint)
from .data import normalization
from .errors import UserError

HF_EXTRA = 'pip install -e ".[hf]"'
PROVENANCE_KEY = "ssl_vit"  # config.json's entry for what transformers' ViTConfig has no field for
# The representation ``backbone(images)`` [B, D] read from transformers' ``last_hidden_state`` [B, 1 + N, D].
POOLED = {"token": "last_hidden_state[:, 0]", "avg": "last_hidden_state[:, 1:].mean(1)"}
TOLERANCE = 1e-4  # largest output difference allowed, relative to the largest output (float32: ~1e-6)
# timm's names -> the Hub names of transformers' ViTModel (those of google/vit-base-patch16-224, which
# every transformers version loads; 5.x renames them when loading and back when saving).
TOP_NAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
BLOCK_NAMES = {  # inside blocks.N. -> inside encoder.layer.N.
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
QKV = ("query", "key", "value")  # the order of timm's fused qkv rows


class HFExportError(UserError):
    """A checkpoint or an output folder that the transformers export cannot take; the message says why."""


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise HFExportError(f"--format hf needs the transformers package: {HF_EXTRA}") from None
    return transformers


def _refusal(ckpt_path: str, what: str) -> HFExportError:
    return HFExportError(f"{ckpt_path}'s backbone has {what}, which transformers' ViTModel has no equivalent of; "
                         f"export it for timm instead: python -m ssl_vit.export {ckpt_path} OUT.safetensors")


# ----- what transformers' ViTModel can hold -----
def _identity(module: nn.Module) -> bool:
    return isinstance(module, nn.Identity)


def _layer_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) and module.elementwise_affine and module.bias is not None


def _model_issue(backbone: Backbone) -> Optional[str]:
    """What outside the blocks ViTModel lacks, or None."""
    vit = backbone.vit
    proj = getattr(vit.patch_embed, "proj", None)
    norms = [vit.norm] + [getattr(b, name, None) for b in vit.blocks for name in ("norm1", "norm2")]  # ViTModel's
    checks = (
        (backbone.is_hybrid, "a ResNet stem (a hybrid)"),
        (not _identity(vit.fc_norm), "a norm after averaging (fc_norm, --fc-norm)"),
        (vit.cls_token is None, "no class token"),
        (vit.num_prefix_tokens > 1, "register or distillation tokens"),
        (vit.pos_embed is None or vit.no_embed_class, "no position embedding for the class token"),
        (not _identity(vit.norm_pre), "a norm before the blocks"),
        (not isinstance(proj, nn.Conv2d) or proj.bias is None
         or not _identity(getattr(vit.patch_embed, "norm", nn.Identity())),
         "a patch embedding other than a convolution with a bias"),
        (not _layer_norm(vit.norm), "no final LayerNorm"),
        (len({m.eps for m in norms if isinstance(m, nn.LayerNorm)}) > 1, "LayerNorms of different eps"),
    )
    return next((what for found, what in checks if found), None)


def _block_issue(block: nn.Module) -> Optional[str]:
    """What a Transformer block has that ViTLayer lacks, or None."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block  # both named here in every timm 1.x

    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if type(block) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
        return f"{type(block).__name__} blocks with {type(attn).__name__} and {type(mlp).__name__}"
    width = attn.qkv.in_features
    probe = torch.linspace(-4, 4, 81)
    checks = (
        (not (_identity(block.ls1) and _identity(block.ls2)), "layer scale"),
        (not (_identity(attn.q_norm) and _identity(attn.k_norm)), "qk-norm"),
        (not (_identity(attn.norm) and _identity(mlp.norm)), "a norm inside attention or the MLP"),
        (getattr(attn, "gate", None) is not None, "gated attention"),
        (attn.num_heads * attn.head_dim != width, "attention heads that do not split the width"),
        (not (_layer_norm(block.norm1) and _layer_norm(block.norm2)), "norms other than LayerNorm"),
        (not torch.allclose(mlp.act(probe), nn.functional.gelu(probe)), f"the activation {mlp.act} (not GELU)"),
        (any(layer.bias is None for layer in (attn.proj, mlp.fc1, mlp.fc2)), "linear layers without a bias"),
    )
    return next((what for found, what in checks if found), None)


def unsupported(backbone: Backbone) -> Optional[str]:
    """What ``backbone`` has that transformers' ViTModel cannot compute, or None when it converts."""
    return _model_issue(backbone) or next(filter(None, map(_block_issue, backbone.vit.blocks)), None)


# ----- the conversion -----
def vit_config(backbone: Backbone, provenance: dict):
    """The ``ViTConfig`` of ``backbone``: its geometry read from the built model, timm's LayerNorm eps."""
    from transformers import ViTConfig

    vit, block = backbone.vit, backbone.vit.blocks[0]
    patch = backbone.pixel_patch_size
    return ViTConfig(hidden_size=backbone.embed_dim, num_hidden_layers=len(vit.blocks),
                     num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                     hidden_act="gelu", layer_norm_eps=vit.norm.eps, image_size=backbone.cfg.img_size,
                     patch_size=patch, num_channels=backbone.cfg.in_chans, qkv_bias=block.attn.qkv.bias is not None,
                     encoder_stride=patch, **{PROVENANCE_KEY: provenance})


def hf_weights(state: dict[str, torch.Tensor], ckpt_path: str) -> dict[str, torch.Tensor]:
    """timm-named weights -> ViTModel's Hub names. A fused ``attn.qkv`` [3D, D] (and its bias [3D]) splits
    into query, key and value [D, D] in that order. Hand-written: neither library offers the conversion as
    an API (transformers' ViT conversion script is not part of its installed package)."""
    out = {}
    for name, tensor in state.items():
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in TOP_NAMES:
            out[TOP_NAMES[name]] = tensor
        elif block and block[2] == "attn.qkv":
            for part, piece in zip(QKV, tensor.chunk(3, dim=0)):
                out[f"encoder.layer.{block[1]}.attention.attention.{part}.{block[3]}"] = piece.contiguous()
        elif block and block[2] in BLOCK_NAMES:
            out[f"encoder.layer.{block[1]}.{BLOCK_NAMES[block[2]]}.{block[3]}"] = tensor
        else:
            raise _refusal(ckpt_path, f"the weight {name}")
    return out


def hf_model(backbone: Backbone, provenance: dict, ckpt_path: str):
    """transformers' ``ViTModel`` (no pooler) holding ``backbone``'s weights, in eval mode."""
    from transformers import ViTModel

    model, info = ViTModel.from_pretrained(None, config=vit_config(backbone, provenance), add_pooling_layer=False,
                                           state_dict=hf_weights(backbone.vit.state_dict(), ckpt_path),
                                           output_loading_info=True)
    unplaced = sorted(set(info["missing_keys"]) | set(info["unexpected_keys"]) | set(info["mismatched_keys"]))
    if unplaced:
        raise _refusal(ckpt_path, f"weights that do not fit ViTModel ({', '.join(map(str, unplaced[:3]))})")
    return model.eval()


def pooled(last_hidden_state: torch.Tensor, global_pool: str) -> torch.Tensor:
    """[B, 1 + N, D] -> [B, D] as ``POOLED`` says: the class token, or the mean of the patch tokens."""
    return last_hidden_state[:, 0] if global_pool == "token" else last_hidden_state[:, 1:].mean(1)


@torch.no_grad()
def check_same_outputs(backbone: Backbone, model, ckpt_path: str) -> None:
    """Our output tokens [B, 1 + N, D] and representation [B, D] against transformers' on a random batch."""
    size = backbone.cfg.img_size
    images = torch.randn(2, backbone.cfg.in_chans, size, size, generator=torch.Generator().manual_seed(0))
    tokens = backbone.forward_features(images)
    theirs = model(pixel_values=images).last_hidden_state
    diff = max((tokens - theirs).abs().max().item(),
               (backbone.pool(tokens) - pooled(theirs, backbone.cfg.global_pool)).abs().max().item())
    if not diff <= TOLERANCE * max(1.0, tokens.abs().max().item()):
        raise _refusal(ckpt_path, f"something the checks above missed (outputs differ by {diff:.2e} after conversion)")


def image_processor(img_size: int, mean: Sequence[float], std: Sequence[float]):
    """A ``ViTImageProcessor``: bicubic resize to img_size x img_size, scale to 0..1, the checkpoint's mean/std."""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    return ViTImageProcessor(do_resize=True, size={"height": img_size, "width": img_size},
                             resample=PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
                             do_normalize=True, image_mean=list(mean), image_std=list(std))


# ----- the folder -----
def is_hf_export(folder: str) -> bool:
    """Whether ``folder`` holds an earlier export of this module (its config.json has the ssl_vit entry)."""
    try:
        with open(os.path.join(folder, "config.json")) as fh:
            return PROVENANCE_KEY in json.load(fh)
    except (OSError, ValueError):
        return False


def check_out_dir(out_dir: str) -> None:
    """Refuse a folder whose files an export would overwrite: only a new, empty or earlier export folder
    is written (a run folder's config.json, say, is never replaced)."""
    if out_dir.endswith(".safetensors") or os.path.isfile(out_dir):
        raise HFExportError(f"{out_dir} names a file: --format hf writes a folder; pass a folder name")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not is_hf_export(out_dir):
        raise HFExportError(f"{out_dir} holds other files and is not an earlier --format hf export; "
                            "pass a new or empty folder")


def write_folder(out_dir: str, model, processor, card) -> None:
    """Save model, processor and card into a temporary folder beside ``out_dir``, then move each file in
    (a rename: a crash never leaves half a file); a full disk is a ``DiskFullError``."""
    stage = None
    try:
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        stage = tempfile.mkdtemp(dir=parent, prefix=".tmp-hf-")
        model.save_pretrained(stage)
        processor.save_pretrained(stage)
        card.save(os.path.join(stage, "README.md"))
        os.makedirs(out_dir, exist_ok=True)
        for name in os.listdir(stage):
            os.replace(os.path.join(stage, name), os.path.join(out_dir, name))
    except Exception as err:  # transformers' and safetensors' writers have their own error types
        if disk_full(err):
            raise DiskFullError(out_dir) from err
        if isinstance(err, PermissionError):
            raise HFExportError(f"cannot write {out_dir} ({err.strerror}): pass a folder you may write to") from err
        raise
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


# ----- the Hub -----
def check_hub_access(repo_id: str) -> None:
    """Refuse, before anything is written, a repository id the Hub would reject or a missing token."""
    import huggingface_hub
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HFExportError(f"--push-to-hub {repo_id!r} is not a Hub repository id ({err}); use NAME or USER/NAME")
    if huggingface_hub.get_token() is None:
        raise HFExportError("--push-to-hub needs a Hugging Face token: run `huggingface-cli login` or set HF_TOKEN")


def push(out_dir: str, repo_id: str, private: bool) -> None:
    """Create the model repository (or keep it) and upload the folder as one commit."""
    import huggingface_hub

    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=out_dir,
                          commit_message="ssl_vit export (python -m ssl_vit.export --format hf)")
    except Exception as err:  # the Hub raises many types (offline, no permission, a name taken)
        raise HFExportError(f"could not upload {out_dir} to {repo_id} ({type(err).__name__}: {err}); the folder is "
                            f"complete: upload it later with huggingface-cli upload {repo_id} {out_dir}") from err


def export_hf(ckpt_path: str, out_dir: str, student: bool = False, eval_json: Sequence[str] = (),
              push_to_hub: Optional[str] = None, private: bool = False) -> None:
    """Write ``out_dir`` (see the module docstring) from ``ckpt_path`` and, with ``push_to_hub``, upload it.
    Every check (transformers, the token, the folder, the evaluation files, the architecture and the
    converted outputs) passes before anything is written."""
    from . import model_card

    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()
    if push_to_hub:
        check_hub_access(push_to_hub)
    check_out_dir(out_dir)
    ckpt = load_checkpoint(ckpt_path)
    records = model_card.eval_records(eval_json, ckpt_path)
    backbone = backbone_from_checkpoint({"arch": ckpt["arch"],
                                         "state_dict": exported_weights(ckpt, ckpt_path, student)}).eval()
    issue = unsupported(backbone)
    if issue:
        raise _refusal(ckpt_path, issue)
    weights = "student" if student else "teacher" if ckpt["objective"] == "dino" else "backbone"
    provenance = {"global_pool": backbone.cfg.global_pool, "representation": POOLED[backbone.cfg.global_pool],
                  "objective": ckpt["objective"], "step": ckpt["step"], "weights": weights, "arch": ckpt["arch"]}
    model = hf_model(backbone, provenance, ckpt_path)
    check_same_outputs(backbone, model, ckpt_path)
    mean, std = normalization(ckpt.get("data") or {})
    card = model_card.build(ckpt, ckpt_path, backbone, records, weights, push_to_hub or out_dir)
    write_folder(out_dir, model, image_processor(backbone.cfg.img_size, mean, std), card)
    if push_to_hub:
        push(out_dir, push_to_hub, private)
