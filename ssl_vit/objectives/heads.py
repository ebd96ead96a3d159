"""Projection heads of the objectives that compare embeddings with learned prototypes (DINO, MSN; later iBOT).

- ``projection_mlp``: 3 linear layers with GELU between them (DINO's head; MSN's adds BatchNorm);
- ``cosine_prototypes``: a weight-normed linear layer without bias whose outputs, on an
  L2-normalised input, are cosine similarities to K unit-norm prototypes (DINO's last layer,
  MSN's prototypes);
- ``DINOHead``: the MLP, a bottleneck, L2 normalisation and the prototypes, with the last layer
  frozen for the first epochs by dropping its gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = False) -> nn.Sequential:
    """[B, in_dim] -> [B, out_dim]: Linear (BatchNorm) GELU, Linear (BatchNorm) GELU, Linear; the linear
    layers truncated-normal (std 0.02) with zero biases, as DINO's and MSN's heads initialise them."""
    def block(d_in: int) -> list[nn.Module]:
        return [nn.Linear(d_in, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if batch_norm else []), nn.GELU()]

    mlp = nn.Sequential(*block(in_dim), *block(hidden_dim), nn.Linear(hidden_dim, out_dim))
    for layer in mlp:
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
    return mlp


def cosine_prototypes(dim: int, num: int, fixed_norm: bool = True) -> nn.Linear:
    """[B, dim] -> [B, num], weight-normed: w = g * v / |v|. With ``fixed_norm`` g stays 1, so on a
    unit-norm input the outputs are cosine similarities to ``num`` prototypes v / |v| (MSN's
    ``normalize(z) @ normalize(prototypes).T``). v starts as nn.Linear's: uniform in +-1/sqrt(dim),
    MSN's initialisation of its prototypes."""
    layer = weight_norm(nn.Linear(dim, num, bias=False))
    scale = layer.parametrizations.weight.original0  # g: [num, 1]
    with torch.no_grad():
        scale.fill_(1.0)
    scale.requires_grad_(not fixed_norm)
    return layer


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> bottleneck -> L2 normalisation -> weight-normed linear layer to K.

    [B, D] -> [B, K]. With ``norm_last_layer`` the weight-norm scale g is fixed at 1, so the
    outputs are cosine similarities to K unit-norm prototypes.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = projection_mlp(in_dim, hidden_dim, bottleneck_dim)
        self.last_layer = cosine_prototypes(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))

    def freeze_last_layer(self) -> None:
        """Drop the last layer's gradients (as DINO does; toggling requires_grad would break DDP), so
        the optimizer leaves it, and its weight decay, alone this step."""
        for p in self.last_layer.parameters():
            p.grad = None
