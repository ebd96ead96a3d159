"""Shared test helpers: tiny backbones and the real data folder (skipped where it is absent)."""

import os
from pathlib import Path

import pytest
import torch

from ssl_vit.backbone import BackboneConfig, build_backbone

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(**kw):
    """ViT-Ti with 2 layers on 16 px images and 4 px patches: a 4x4 grid, fast on a CPU."""
    cfg = dict(model="vit_tiny", patch_size=4, img_size=16, depth=2)
    cfg.update(kw)
    return build_backbone(BackboneConfig(**cfg))


def tiny_hybrid(**kw):
    """R+ViT-Ti (ResNet root, stride 16) with 2 layers on 64 px images: a 4x4 grid."""
    cfg = dict(model="r_vit_tiny", img_size=64, depth=2)
    cfg.update(kw)
    return build_backbone(BackboneConfig(**cfg))


@pytest.fixture
def cifar10_dir():
    path = SHARED_DATA / "cifar10"
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (only on the project's machines)")
    return str(path)


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """Tests never reach the Hugging Face hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
