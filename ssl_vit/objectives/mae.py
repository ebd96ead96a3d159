"""Masked autoencoders (He et al. 2021, facebookresearch/mae ``models_mae.py``) on the shared backbone.

The forward pass runs in the order of the paper's figure:

1. ``random_masking``: hide 75% of the patches, a fresh random subset per image;
2. ``forward_encoder``: the shared backbone encodes the class token and the *visible* patch
   tokens only (``Backbone.encode(..., keep=...)``): the encoder's cost falls with the mask ratio,
   which is the whole speed advantage of MAE. Hybrids blank the masked patches in pixel space
   before their convolution stem, so no masked pixel leaks into a visible token;
3. ``forward_decoder``: a light Transformer (timm ``Block``s) gets the encoded tokens plus a shared
   learnable mask token at every hidden position, with fixed 2-D sin-cos position embeddings,
   and predicts the pixels of every patch;
4. ``forward_loss``: mean squared error on the masked patches only. The target is the patch of
   the *normalised* input image (as in MAE, whose input is normalised with the data mean and
   std), itself normalised by its own mean and variance when ``norm_pix_loss`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from ..backbone import Backbone
from ..errors import ConfigError
from ..masking import Masking, random_masking
from .base import DataInfo, Objective

NORM_PIX_EPS = 1e-6  # MAE's eps in the per-patch variance normalisation


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    # The ViT-B recipe's decoder is 512 wide, 8 blocks, 16 heads. For ViT-Ti on 32 px images
    # (192 wide, 64 tokens) a 128-wide, 2-block decoder keeps the decoder a small fraction of the
    # full encoder's cost, so the step stays ~3x cheaper than encoding all tokens; MAE's ablations
    # (Table 1a, 1b) find fine-tuning accuracy nearly flat in decoder depth and width (only linear
    # probing wants a deeper decoder). 4 heads keep MAE's 32 dimensions per head (512 / 16).
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # targets normalised per patch (mean 0, variance 1)

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"--mask-ratio {self.mask_ratio}: must lie strictly between 0 and 1 (MAE uses 0.75)")
        if self.decoder_dim % 4:
            raise ConfigError(f"--decoder-dim {self.decoder_dim}: sin-cos position embeddings need a multiple of 4")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"--decoder-dim {self.decoder_dim} is not divisible by --decoder-heads {self.decoder_heads}")


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and standard deviation, as MAE's norm_pix_loss computes them.

    patches: [B, N, p*p*C] -> (mean [B, N, 1], std [B, N, 1]); std = sqrt(unbiased var + eps).
    """
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()
    return mean, std


class MAEDecoder(nn.Module):
    """The light decoder: encoder width -> decoder width, mask tokens, blocks, pixels per patch."""

    def __init__(self, encoder_dim: int, patch_pixels: int, cfg: MAEConfig):
        super().__init__()
        self.dim = cfg.decoder_dim
        self.embed = nn.Linear(encoder_dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.blocks = nn.Sequential(*[
            Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
            for _ in range(cfg.decoder_depth)
        ])
        self.norm = nn.LayerNorm(cfg.decoder_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_dim, patch_pixels)
        self._init_weights()

    def _init_weights(self) -> None:
        """MAE's initialisation: normal(0.02) mask token, xavier-uniform linears, zero biases."""
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """Fixed 2-D sin-cos embeddings for ``grid``, [1, h*w, decoder_dim] in raster order."""
        pos = build_sincos2d_pos_embed(list(grid), dim=self.dim, device=like.device, dtype=like.dtype)
        return pos.unsqueeze(0)


class MAE(Objective):
    Config = MAEConfig
    needs_labels = False
    # facebookresearch/mae's pretraining recipe (AdamW(0.9, 0.95), wd 0.05, lr 1.5e-4 x batch / 256,
    # crop scale (0.2, 1), no clipping) on ViT-Ti/4 at 32 px with sin-cos positions.
    recipe_defaults = dict(
        model="vit_tiny", patch_size=4, img_size=32, pos_embed="sincos",
        steps=200, batch_size=64,
        optimizer="adamw", lr=1.5e-4, lr_ref_batch=256, betas=(0.9, 0.95), weight_decay=0.05,
        clip_grad=0.0, min_lr=0.0,
        crop_scale=(0.2, 1.0), hflip=True,
    )

    def __init__(self, backbone: Backbone, cfg: MAEConfig, data: DataInfo):
        super().__init__(backbone, cfg, data)
        patch_pixels = backbone.pixel_patch_size ** 2 * backbone.cfg.in_chans
        self.decoder = MAEDecoder(backbone.embed_dim, patch_pixels, cfg)

    @classmethod
    @torch.no_grad()
    def initialise(cls, backbone: Backbone) -> None:
        """MAE's encoder initialisation (``models_mae.initialize_weights``): xavier-uniform for every
        linear layer (zero bias) and for the patch embedding's flattened weight, normal(0.02) for
        the class token. By hand: timm's modes differ (truncated normal 0.02; its ``moco`` mode
        splits qkv and keeps the class token at 1e-6)."""
        vit = backbone.vit
        for module in vit.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        proj = vit.patch_embed.proj.weight  # [D, C, p, p] (a hybrid's: its 1x1 projection after the stem)
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        if vit.cls_token is not None:
            nn.init.normal_(vit.cls_token, std=0.02)

    # ----- the method, in the order it runs -----
    def forward_encoder(self, images: torch.Tensor, masking: Masking | None = None
                        ) -> tuple[torch.Tensor, Masking, tuple[int, int]]:
        """Mask, then encode the visible patches only.

        images: [B, C, H, W] normalised. Returns (latent [B, P + K, D]: P prefix tokens then the
        K visible tokens in ``masking.keep`` order; the masking; the token grid (h, w)).
        """
        grid = self.backbone.grid_size(images)
        if masking is None:
            masking = random_masking(images.shape[0], grid[0] * grid[1], self.cfg.mask_ratio, images.device)
        if self.backbone.is_hybrid:  # hide masked pixels from the convolution stem
            images = self.backbone.blank_patches(images, masking.mask)
        tokens = self.backbone.embed(images)  # [B, N, D]
        return self.backbone.encode(tokens, grid, keep=masking.keep), masking, grid

    def unshuffle(self, visible: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens and put every token back in raster order.

        visible: [B, K, d] tokens in ``keep`` order; restore: [B, N]. Returns [B, N, d] where
        position i holds its visible token, or the mask token where i was masked.
        """
        b, k, d = visible.shape
        hidden = self.decoder.mask_token.to(visible.dtype).expand(b, restore.shape[1] - k, d)
        shuffled = torch.cat([visible, hidden], dim=1)  # [B, N, d] in cat(keep, masked) order
        return torch.gather(shuffled, 1, restore.unsqueeze(-1).expand(-1, -1, d))

    def forward_decoder(self, latent: torch.Tensor, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """latent: [B, P + K, D] from the encoder; restore: [B, N]. Returns pixels [B, N, p*p*C].

        The prefix tokens (class token) go through the decoder without a position embedding,
        as in MAE, and are dropped before the prediction.
        """
        dec = self.decoder
        x = dec.embed(latent)  # [B, P + K, d]
        n_prefix = self.backbone.num_prefix_tokens
        patches = self.unshuffle(x[:, n_prefix:], restore) + dec.position_embedding(grid, x)  # [B, N, d]
        x = dec.norm(dec.blocks(torch.cat([x[:, :n_prefix], patches], dim=1)))
        return dec.pred(x[:, n_prefix:])

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] normalised input -> [B, N, p*p*C] patches, normalised per patch if norm_pix_loss."""
        patches = self.backbone.patchify(images)
        if not self.cfg.norm_pix_loss:
            return patches
        mean, std = patch_stats(patches)
        return (patches - mean) / std

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W]; pred: [B, N, p*p*C]; mask: [B, N] bool (True = masked).

        Mean squared error per patch, averaged over the masked patches only.
        """
        per_patch = (pred.float() - self.target(images).float()).pow(2).mean(dim=-1)  # [B, N]
        mask = mask.float()
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch):
        images = batch["image"]
        latent, masking, grid = self.forward_encoder(images)
        pred = self.forward_decoder(latent, masking.restore, grid)
        with torch.no_grad():  # the trivial answer, for comparison: every pixel at its patch's mean
            target = self.target(images)
            flat = self.forward_loss(images, target.mean(dim=-1, keepdim=True).expand_as(target), masking.mask)
        return self.forward_loss(images, pred, masking.mask), {"patch_mean_loss": flat}

    def headline(self, record, results):
        if "patch_mean_loss" not in record:
            return None
        return (f"MAE: reconstruction loss {record['loss']:.4f} on the masked patches against "
                f"{record['patch_mean_loss']:.4f} for filling each with its own mean (training batches at step {record['step']})")

    def no_weight_decay(self) -> set[str]:
        """MAE's rule (``optim_factory.add_weight_decay`` with no skip list): every parameter with
        more than one dimension decays, the class and mask tokens included (the sin-cos position
        embedding is frozen)."""
        return set()
