"""Masked autoencoder pretraining (He et al. 2021), facebookresearch/mae's recipe.

    accelerate launch recipes/mae.py                         # digits, ViT-Ti/4 at 32 px, a few minutes
    accelerate launch recipes/mae.py --data ../shared/data/cifar10 --depth 6 --steps 300 \
        --batch-size 128 --out runs/mae-cifar10
    python -m ssl_vit.viz.mae runs/mae-cifar10/ckpt.pt --data ../shared/data/cifar10 \
        --out docs/mae_reconstruction.png

Paper settings (SPEC section 2): 75% random masking, fixed 2-D sin-cos position embeddings,
norm_pix_loss; AdamW(0.9, 0.95), weight decay 0.05 (none on biases and norms), lr =
1.5e-4 x batch / 256, warmup then cosine to 0, RandomResizedCrop scale (0.2, 1) and flip, no
drop-path, no gradient clipping. The paper trains ViT-B/16 at batch 4096 for 800-1600 epochs with
40 warmup epochs and a 512-wide, 8-block decoder; the defaults here are the laptop-sized version
(ViT-Ti/4 at 32 px, a 128-wide 2-block decoder, warmup = 10% of the steps).
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("mae").recipe_defaults
    run_cli(lambda argv: run_recipe("mae", argv=argv, description=__doc__))
