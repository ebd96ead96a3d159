"""The other toolkits' models, built at our settings so one training step compares with ours.

Each builder takes our ``RunConfig`` (backbone, objective config) and the geometry of our built
backbone, and returns a ``Reference``: the module to optimise, the loss of a batch, and the
hooks its own training loop runs (DINO's EMA teacher). The models follow the libraries' own
examples and benchmarks:

* lightly: ``benchmarks/imagenet/vitb16/mae.py`` and ``dino.py`` (timm ViT wrapped in
  ``MaskedVisionTransformerTIMM``, ``MAEDecoderTIMM``, ``DINOProjectionHead``, ``DINOLoss``);
* vit-pytorch: its README's ``ViT``, ``MAE`` and ``MPP``.

They are the libraries as installed; where one crashes the error is what the benchmark records.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ssl_vit.backbone import Backbone, build_backbone
from ssl_vit.config import RunConfig
from ssl_vit.data import MEAN, STD


def _noop(step: int) -> None:
    pass


def _images(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss of a model whose forward takes the images and returns its loss."""
    return model(batch["image"])


@dataclass
class Reference:
    """Another library's model: ``loss(model, batch)`` is its forward pass; the hooks take the step number."""

    model: nn.Module
    loss: Callable[[nn.Module, dict], torch.Tensor]  # (model, possibly compiled; batch) -> loss
    before_optimizer_step: Callable[[int], None] = _noop
    end_step: Callable[[int], None] = _noop
    note: str = ""


@dataclass(frozen=True)
class Geometry:
    """What a reference model must match: read off our built backbone."""

    img_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int

    @classmethod
    def of(cls, backbone: Backbone) -> "Geometry":
        block = backbone.vit.blocks[0]
        return cls(backbone.cfg.img_size, backbone.pixel_patch_size, backbone.embed_dim, len(backbone.vit.blocks),
                   block.attn.num_heads, block.mlp.fc1.out_features)


# ----- vit-pytorch -----
def _vit_pytorch_vit(g: Geometry, num_classes: int = 0, pool: str = "cls") -> nn.Module:
    from vit_pytorch import ViT

    return ViT(image_size=g.img_size, patch_size=g.patch_size, num_classes=num_classes, dim=g.dim, depth=g.depth,
               heads=g.heads, dim_head=g.dim // g.heads, mlp_dim=g.mlp_dim, pool=pool)


def vit_pytorch_supervised(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    vit = _vit_pytorch_vit(g, num_classes)
    return Reference(vit, lambda model, batch: F.cross_entropy(model(batch["image"]), batch["label"]))


def _vit_pytorch_mae(run: RunConfig, g: Geometry, pool: str) -> Reference:
    from vit_pytorch.mae import MAE

    cfg = run.objective_config
    mae = MAE(encoder=_vit_pytorch_vit(g, pool=pool), decoder_dim=cfg.decoder_dim, masking_ratio=cfg.mask_ratio,
              decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
              decoder_dim_head=cfg.decoder_dim // cfg.decoder_heads)
    return Reference(mae, _images, note=f"ViT(pool='{pool}'); no norm_pix_loss")


def vit_pytorch_mae(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    """As its README builds it: ``ViT(pool='cls')``."""
    return _vit_pytorch_mae(run, g, "cls")


def vit_pytorch_mae_mean_pool(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    """``ViT(pool='mean')``: no class token, the one encoder its MAE still runs with (1.26)."""
    return _vit_pytorch_mae(run, g, "mean")


def _vit_pytorch_mpp(run: RunConfig, g: Geometry, old_api_shim: bool) -> Reference:
    from vit_pytorch.mpp import MPP

    cfg = run.objective_config
    vit = _vit_pytorch_vit(g)
    if old_api_shim:
        # MPP indexes cls_token [1, 1, D] and pos_embedding [1, N + 1, D], the ViT layout before
        # vit-pytorch dropped the leading 1 (its issues 253, 351); restore that layout.
        vit.cls_token = nn.Parameter(vit.cls_token.detach().unsqueeze(0))
        vit.pos_embedding = nn.Parameter(vit.pos_embedding.detach().unsqueeze(0))
    mpp = MPP(transformer=vit, patch_size=g.patch_size, dim=g.dim, output_channel_bits=3, channels=3,
              max_pixel_val=1.0, mask_prob=cfg.corruption_rate, replace_prob=cfg.mask_fraction,
              random_patch_prob=cfg.random_fraction, mean=list(MEAN), std=list(STD))
    note = "ViT tokens reshaped to its old layout" if old_api_shim else ""
    return Reference(mpp, _images, note=note + ("; " if note else "") + "corrupts pixels")


def vit_pytorch_mpp(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    return _vit_pytorch_mpp(run, g, old_api_shim=False)


def vit_pytorch_mpp_shim(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    return _vit_pytorch_mpp(run, g, old_api_shim=True)


# ----- lightly -----
class LightlyMAE(nn.Module):
    """lightly's MAE benchmark model on a timm ViT (its MAEDecoderTIMM), with MAE's norm_pix_loss."""

    def __init__(self, vit: nn.Module, cfg):
        from lightly.models.modules import MaskedVisionTransformerTIMM
        from lightly.models.modules.masked_autoencoder_timm import MAEDecoderTIMM

        super().__init__()
        self.mask_ratio, self.norm_pix_loss = cfg.mask_ratio, cfg.norm_pix_loss
        self.patch_size = vit.patch_embed.patch_size[0]
        self.backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.sequence_length = self.backbone.sequence_length
        with warnings.catch_warnings():  # deprecated in lightly 1.6 for a split decoder, same layers
            warnings.simplefilter("ignore")
            self.decoder = MAEDecoderTIMM(
                num_patches=vit.patch_embed.num_patches, patch_size=self.patch_size, embed_dim=vit.embed_dim,
                decoder_embed_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                decoder_num_heads=cfg.decoder_heads, mlp_ratio=4.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from lightly.models import utils

        b = images.shape[0]
        idx_keep, idx_mask = utils.random_token_mask((b, self.sequence_length), self.mask_ratio,
                                                     device=images.device)
        encoded = self.backbone.encode(images=images, idx_keep=idx_keep)
        tokens = utils.repeat_token(self.decoder.mask_token, (b, self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, self.decoder.embed(encoded).type_as(tokens))
        pred = self.decoder.predict(utils.get_at_index(self.decoder.decode(tokens), idx_mask))
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)  # -1: class token
        if self.norm_pix_loss:
            target = utils.normalize_mean_var(target)
        return F.mse_loss(pred, target)


def lightly_mae(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    mae = LightlyMAE(build_backbone(run.backbone).vit, run.objective_config)
    return Reference(mae, _images)


class LightlyDINO(nn.Module):
    """lightly's DINO ViT benchmark model: student and EMA teacher, DINOProjectionHead, DINOLoss."""

    def __init__(self, run: RunConfig):
        from lightly.loss import DINOLoss
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        cfg = run.objective_config
        self.momentum_teacher = cfg.momentum_teacher
        student_vit = build_backbone(run.backbone).vit
        teacher_vit = build_backbone(dataclasses.replace(run.backbone, drop_path_rate=0.0)).vit
        head = dict(input_dim=student_vit.embed_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                    output_dim=cfg.out_dim, norm_last_layer=cfg.norm_last_layer)
        self.student_backbone = MaskedVisionTransformerTIMM(vit=student_vit)
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=teacher_vit)
        with warnings.catch_warnings():  # its head uses the deprecated torch.nn.utils.weight_norm
            warnings.simplefilter("ignore")
            self.student_head = DINOProjectionHead(**head, freeze_last_layer=1)
            self.teacher_head = DINOProjectionHead(**head)  # built apart: that weight_norm cannot be deep-copied
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.warmup_teacher_temp,
                                  teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                                  center_momentum=cfg.center_momentum)

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        global_views, local_views = torch.cat(views[:2]), torch.cat(views[2:])
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(global_views).flatten(start_dim=1))
        student = torch.cat([self.student_head(self.student_backbone(v).flatten(start_dim=1))
                             for v in (global_views, local_views)])
        return self.criterion(teacher_out=teacher.chunk(2), student_out=student.chunk(len(views)), epoch=0)

    def end_step(self, step: int) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=self.momentum_teacher)
        update_momentum(self.student_head, self.teacher_head, m=self.momentum_teacher)


def lightly_dino(run: RunConfig, g: Geometry, num_classes: int) -> Reference:
    dino = LightlyDINO(run)
    return Reference(dino, lambda model, batch: model(list(batch["image"])),
                     before_optimizer_step=lambda step: dino.student_head.cancel_last_layer_gradients(0),
                     end_step=dino.end_step)


# objective -> (name, builder) of the models the other libraries offer for it
REFERENCES: dict[str, list[tuple[str, Callable[..., Reference]]]] = {
    "supervised": [("vit-pytorch ViT", vit_pytorch_supervised)],
    "masked_patch": [("vit-pytorch MPP", vit_pytorch_mpp), ("vit-pytorch MPP+shim", vit_pytorch_mpp_shim)],
    "mae": [("lightly MAE", lightly_mae), ("vit-pytorch MAE", vit_pytorch_mae),
            ("vit-pytorch MAE pool=mean", vit_pytorch_mae_mean_pool)],
    "dino": [("lightly DINO", lightly_dino)],
}
