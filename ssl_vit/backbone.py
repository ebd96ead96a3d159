"""The one Vision Transformer backbone shared by every objective and every evaluation.

It wraps timm's ``VisionTransformer`` (plain or hybrid ResNet+ViT) and exposes the token
contract the objectives need, in the order the forward pass runs:

1. ``embed(images)``: patch embeddings ``[B, N, D]`` without position embeddings (for a hybrid
   the convolution stem runs here), so an objective can replace chosen embeddings;
2. ``encode(tokens, grid, keep=None)``: add (resampled) position embeddings, optionally keep
   only a subset of patch tokens, prepend the prefix tokens (class token first, then DeiT's
   distillation token or register tokens, as timm places them), run the blocks and the final norm;
3. ``pool(features)``: the representation (class token, or mean of patch tokens; with a
   distillation token the mean of the class and distillation tokens, DeiT's test-time choice);
   ``class_token``, ``distillation_token`` and ``patch_tokens`` read the other outputs.

For hybrids, masked objectives must hide patches before the stem (``blank_patches``): the
convolutions see neighbouring pixels, so masking after the stem would leak masked content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import timm
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import resample_abs_pos_embed
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .errors import ConfigError


@dataclass(frozen=True)
class Preset:
    timm_name: str
    patch_size: int  # on the image for a ViT, on the CNN feature map for a hybrid
    hybrid: bool = False
    distilled: Optional[str] = None  # timm's DeiT model of the same shape with a distillation token


# Our preset names -> timm models. ``r_vit_tiny`` embeds the ResNet root's stride-4 map with
# 4x4 patches, so its total stride is 16 as the paper's name "R+ViT-Ti/16" says (timm's own
# ``vit_tiny_r_s16_p8_224`` uses 8x8 patches, total stride 32: pass ``--patch-size 8`` for it).
PRESETS: dict[str, Preset] = {
    "vit_tiny": Preset("vit_tiny_patch16_224", 16, distilled="deit_tiny_distilled_patch16_224"),
    "vit_small": Preset("vit_small_patch16_224", 16, distilled="deit_small_distilled_patch16_224"),
    "vit_base": Preset("vit_base_patch16_224", 16, distilled="deit_base_distilled_patch16_224"),
    "vit_large": Preset("vit_large_patch16_224", 16),
    "vit_huge": Preset("vit_huge_patch14_224", 14),
    "r50_vit_base": Preset("vit_base_r50_s16_224", 1, hybrid=True),
    "r26_vit_small": Preset("vit_small_r26_s32_224", 1, hybrid=True),
    "r_vit_tiny": Preset("vit_tiny_r_s16_p8_224", 4, hybrid=True),
}


class BackboneError(ConfigError):
    """A backbone setting that cannot work; the message says what would."""


@dataclass
class BackboneConfig:
    """Everything needed to rebuild a backbone; saved in every checkpoint as plain values."""

    model: str = "vit_tiny"  # a preset name or any timm ViT name
    patch_size: Optional[int] = None  # None: the preset's
    img_size: int = 224
    depth: Optional[int] = None  # None: the preset's; fewer layers make quick CPU runs
    global_pool: str = "token"  # "token" (class token) or "avg" (mean of patch tokens)
    # False: the final LayerNorm normalises every token, and "avg" averages normalised tokens (big_vision,
    # MAE). True: timm's default for "avg", unnormalised tokens and a norm after averaging (checkpoints
    # written before this setting existed: see checkpoint.upgrade_arch).
    fc_norm: bool = False
    # DeiT's distillation token after the class token (timm's VisionTransformerDistilled; presets vit_tiny,
    # vit_small, vit_base); checkpoints written before this setting existed have none.
    distillation_token: bool = False
    pos_embed: str = "learned"  # "learned", or "sincos": fixed 2-D sin-cos (MAE)
    drop_path_rate: float = 0.0
    in_chans: int = 3

    def __post_init__(self):
        if self.global_pool not in ("token", "avg"):
            raise BackboneError(f"--global-pool {self.global_pool!r}: use 'token' or 'avg'")
        if self.distillation_token and self.global_pool != "token":
            raise BackboneError(f"--distillation-token with --global-pool {self.global_pool}: the representation "
                                "of a distilled ViT is the mean of its class and distillation tokens; use "
                                "--global-pool token")
        if self.pos_embed not in ("learned", "sincos"):
            raise BackboneError(f"--pos-embed {self.pos_embed!r}: use 'learned' or 'sincos'")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise BackboneError(f"--drop-path-rate {self.drop_path_rate}: use a value in [0, 1)")


def _timm_kwargs(cfg: BackboneConfig) -> tuple[str, dict]:
    kwargs = dict(
        img_size=cfg.img_size,
        num_classes=0,
        global_pool=cfg.global_pool,
        fc_norm=cfg.fc_norm,
        drop_path_rate=cfg.drop_path_rate,
        in_chans=cfg.in_chans,
        dynamic_img_size=True,  # any grid at run time: position embeddings are resampled
    )
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    if cfg.model in PRESETS:
        preset = PRESETS[cfg.model]
        kwargs["patch_size"] = cfg.patch_size or preset.patch_size
        return _preset_timm_name(cfg.model, cfg.distillation_token), kwargs
    if cfg.model in timm.list_models():
        if cfg.patch_size is not None:
            kwargs["patch_size"] = cfg.patch_size
        return cfg.model, kwargs
    raise BackboneError(
        f"unknown model {cfg.model!r}: use a preset ({', '.join(PRESETS)}) "
        "or a timm ViT name (see timm.list_models('vit_*'))"
    )


def _preset_timm_name(model: str, distillation_token: bool) -> str:
    """The timm model of a preset, with a distillation token: timm's DeiT of the same shape."""
    preset = PRESETS[model]
    if not distillation_token:
        return preset.timm_name
    if preset.distilled is None:
        distilled = ", ".join(name for name, p in PRESETS.items() if p.distilled)
        raise BackboneError(f"--distillation-token: timm has no distilled {model} (DeiT distilled {distilled}); "
                            "use one of those presets or drop --distillation-token")
    return preset.distilled


def token_width(cfg: BackboneConfig) -> int:
    """The width D of the tokens of ``cfg``'s model, found without allocating its weights."""
    name, kwargs = _timm_kwargs(cfg)
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).embed_dim


def _check_divisible(model: str, img_size: int, stem_stride: int, embed_patch: int) -> None:
    """Refuse an image size that the model's pixels per token (stem stride x patch) do not divide."""
    p = stem_stride * embed_patch
    what = (f"{model}'s total stride {p} (stem stride {stem_stride} x patch {embed_patch})"
            if stem_stride > 1 else f"the patch size {p}")
    if img_size % p != 0:
        nearest = max(p, round(img_size / p) * p)
        raise BackboneError(f"image size {img_size} is not divisible by {what}; use a multiple of {p} such as {nearest}")


def _stem_stride(embed: nn.Module, in_chans: int) -> int:
    """Total stride of a hybrid's CNN stem, found by running it once on a probe image."""
    probe = 256
    with torch.no_grad():
        out = embed.backbone(torch.zeros(1, in_chans, probe, probe))
    if isinstance(out, (list, tuple)):
        out = out[-1]
    return probe // out.shape[-1]


class Backbone(nn.Module):
    """A timm ViT (``self.vit``, timm key names) with the token contract of the module docstring."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        name, kwargs = _timm_kwargs(cfg)
        try:
            vit = timm.create_model(name, pretrained=False, **kwargs)
        except (TypeError, AssertionError) as err:
            self._explain_build_error(name, kwargs)
            raise BackboneError(f"timm could not build {name!r} with {kwargs}: {err}") from err
        if not isinstance(vit, VisionTransformer):
            raise BackboneError(f"{cfg.model!r} is a {type(vit).__name__}, not a timm VisionTransformer")
        self.vit = vit
        self._check_prefix_tokens(name)
        self.is_hybrid = hasattr(vit.patch_embed, "backbone")
        embed_patch = vit.patch_embed.patch_size[0]
        self.stem_stride = _stem_stride(vit.patch_embed, cfg.in_chans) if self.is_hybrid else 1
        self.pixel_patch_size = self.stem_stride * embed_patch  # pixels per token side
        self.check_img_size(cfg.img_size)
        # How the position table reaches another grid: "timm" (resample_abs_pos_embed, antialiased), "dino"
        # (DINO's interpolate_pos_encoding) or "msn" (MSN's: DINO's without the +0.1); an objective's setting.
        self.pos_interpolation = "timm"
        if cfg.pos_embed == "sincos":
            self._fix_sincos_pos_embed()

    def _explain_build_error(self, name: str, kwargs: dict) -> None:
        """timm asserts when a hybrid's feature map does not tile into patches: find the stride on a
        probe size that works and raise our own message about the image size instead."""
        try:
            probe = timm.create_model(name, **{**kwargs, "img_size": 256, "depth": 1})
        except (TypeError, AssertionError):
            return
        if hasattr(probe.patch_embed, "backbone"):
            stem_stride = _stem_stride(probe.patch_embed, self.cfg.in_chans)
            _check_divisible(self.cfg.model, self.cfg.img_size, stem_stride, probe.patch_embed.patch_size[0])

    def _check_prefix_tokens(self, name: str) -> None:
        """Refuse a model whose prefix tokens ``encode`` cannot place as timm does (a class token, then a
        distillation token or register tokens), and --distillation-token on a timm model without one."""
        vit = self.vit
        dist = getattr(vit, "dist_token", None)
        if self.cfg.distillation_token and dist is None:
            raise BackboneError(f"--distillation-token: timm's {name} has no distillation token; use a preset "
                                "(vit_tiny, vit_small, vit_base) or a distilled timm ViT such as "
                                "deit_tiny_distilled_patch16_224")
        placed = sum(t.shape[1] for t in (vit.cls_token, dist, vit.reg_token) if t is not None)
        if placed != vit.num_prefix_tokens or (dist is not None and vit.reg_token is not None):
            raise BackboneError(f"{name} has {vit.num_prefix_tokens} prefix tokens that the token contract cannot "
                                "place (it places a class token, then a distillation token or register tokens, as "
                                "timm does); use a preset or a timm ViT without other prefix tokens")

    # ----- geometry -----
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def num_prefix_tokens(self) -> int:
        return self.vit.num_prefix_tokens

    @property
    def has_distillation_token(self) -> bool:
        return getattr(self.vit, "dist_token", None) is not None

    @property
    def base_grid(self) -> tuple[int, int]:
        """Grid the learned position embeddings were made for."""
        return tuple(self.vit.patch_embed.grid_size)

    def check_img_size(self, img_size: int) -> None:
        _check_divisible(self.cfg.model, img_size, self.stem_stride, self.vit.patch_embed.patch_size[0])

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        h, w = images.shape[-2:]
        p = self.pixel_patch_size
        if h % p or w % p:
            raise BackboneError(f"input of {h}x{w} pixels is not divisible by the patch size {p}")
        return h // p, w // p

    # ----- pixel space -----
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, N, p*p*C], patches in raster order, pixels (p, p, C) inside."""
        p = self.pixel_patch_size
        return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W], the inverse of ``patchify``."""
        p = self.pixel_patch_size
        return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=p, p2=p)

    def blank_patches(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Set the pixels of masked patches to 0 (the data mean after normalisation).

        images: [B, C, H, W]; mask: [B, N] bool, True = blank. Used before a hybrid's stem so
        masked content cannot leak into visible tokens through the convolutions.
        """
        patches = self.patchify(images)
        patches = patches.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.unpatchify(patches, self.grid_size(images))

    # ----- token contract -----
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch embeddings without position: [B, C, H, W] -> [B, N, D]."""
        self.grid_size(images)  # clear error for a bad size
        tokens = self.vit.patch_embed(images)  # [B, h, w, D] (dynamic size -> NHWC)
        return rearrange(tokens, "b h w d -> b (h w) d")

    def position_embedding(self, grid: tuple[int, int]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(prefix position embeddings [1, P, D] or None, patch position embeddings [1, h*w, D])."""
        vit = self.vit
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        prefix, table = vit.pos_embed[:, :n_prefix], vit.pos_embed[:, n_prefix:]
        if tuple(grid) != self.base_grid:
            if self.pos_interpolation == "dino":
                table = dino_interpolate(table, self.base_grid, grid)
            elif self.pos_interpolation == "msn":
                table = dino_interpolate(table, self.base_grid, grid, offset=0.0)
            else:
                table = resample_abs_pos_embed(table, new_size=grid, old_size=self.base_grid, num_prefix_tokens=0)
        return (prefix if n_prefix else None), table

    def encode(
        self, tokens: torch.Tensor, grid: tuple[int, int], keep: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Run the Transformer on patch embeddings.

        tokens: [B, N, D] from ``embed`` (possibly with some embeddings replaced);
        keep: optional [B, K] indices of the patch tokens to encode (MAE encodes visible ones only).
        Returns [B, P + K, D]: P prefix tokens (class token first, then the distillation token or the
        register tokens), then the kept patch tokens.
        """
        vit = self.vit
        prefix_pos, patch_pos = self.position_embedding(grid)
        x = tokens + patch_pos
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # [B, K, D]
        prefix = []
        if vit.cls_token is not None:
            prefix.append(vit.cls_token.expand(x.shape[0], -1, -1))
        if self.has_distillation_token:
            prefix.append(vit.dist_token.expand(x.shape[0], -1, -1))
        if vit.reg_token is not None:
            prefix.append(vit.reg_token.expand(x.shape[0], -1, -1))
        if prefix:
            prefix = torch.cat(prefix, dim=1)
            if prefix_pos is not None:
                prefix = prefix + prefix_pos
            x = torch.cat([prefix, x], dim=1)
        x = vit.norm_pre(vit.pos_drop(x))
        if vit.grad_checkpointing and self.training:
            x = checkpoint_seq(vit.blocks, x)
        else:
            x = vit.blocks(x)
        return vit.norm(x)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, P + N, D] output tokens."""
        return self.encode(self.embed(images), self.grid_size(images))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, D]: the representation (class token, or the mean of the class and
        distillation tokens, or the mean of patch tokens): timm's ``forward_head`` before the head."""
        return self.vit.forward_head(features, pre_logits=True)

    def pooled_prefix(self, prefix: torch.Tensor) -> torch.Tensor:
        """[B, P, D] prefix tokens (e.g. of an intermediate block) -> [B, D], as token pooling reads them:
        the class token, or with a distillation token the mean of the two."""
        return prefix[:, :2].mean(dim=1) if self.has_distillation_token else prefix[:, 0]

    def class_token(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, D]."""
        assert self.vit.cls_token is not None, "this backbone has no class token"
        return features[:, 0]

    def distillation_token(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, D]: the output of DeiT's distillation token (after the class token)."""
        assert self.has_distillation_token, "this backbone has no distillation token"
        return features[:, 1]

    def patch_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P + N, D] -> [B, N, D]."""
        return features[:, self.num_prefix_tokens:]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, D] representation."""
        return self.pool(self.forward_features(images))

    # ----- position embedding variants -----
    def _fix_sincos_pos_embed(self) -> None:
        """Fixed 2-D sin-cos position embeddings (MAE); prefix positions get zeros."""
        vit = self.vit
        if self.embed_dim % 4:
            raise BackboneError(f"sincos position embeddings need a width divisible by 4, got {self.embed_dim}")
        grid = build_sincos2d_pos_embed(list(self.base_grid), dim=self.embed_dim)  # [h*w, D]
        n_prefix = vit.pos_embed.shape[1] - grid.shape[0]
        table = torch.cat([torch.zeros(n_prefix, self.embed_dim), grid], dim=0)
        with torch.no_grad():
            vit.pos_embed.copy_(table.unsqueeze(0))
        vit.pos_embed.requires_grad_(False)


def dino_interpolate(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int], offset: float = 0.1
                     ) -> torch.Tensor:
    """[1, h*w, D] -> [1, h'*w', D] as DINO's ``interpolate_pos_encoding``: bicubic with the scale factor
    (new + offset) / old and no antialiasing (MSN's ``deit.py``: offset 0). Hand-written because timm's
    ``resample_abs_pos_embed`` antialiases when shrinking, which blurs the positions of DINO's small
    local crops, and no library offers DINO's variant."""
    grid = rearrange(table, "1 (h w) d -> 1 d h w", h=old[0], w=old[1])
    scale = ((new[0] + offset) / old[0], (new[1] + offset) / old[1])  # DINO's +0.1: its issue 8, no off-by-one size
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    assert tuple(grid.shape[-2:]) == tuple(new), (grid.shape, new)
    return rearrange(grid, "1 d h w -> 1 (h w) d")


def build_backbone(cfg: BackboneConfig) -> Backbone:
    return Backbone(cfg)
