"""ssl_vit: pretrain one Vision Transformer backbone under different objectives and compare them."""

from .backbone import PRESETS, Backbone, BackboneConfig, BackboneError, build_backbone
from .checkpoint import CheckpointError, load_backbone, load_checkpoint

__version__ = "0.1.0"
__all__ = [
    "PRESETS", "Backbone", "BackboneConfig", "BackboneError", "CheckpointError", "build_backbone",
    "load_backbone", "load_checkpoint",
]
