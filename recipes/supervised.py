"""Supervised pretraining, the ViT paper's main recipe.

    accelerate launch recipes/supervised.py                  # digits, ViT-Ti/4 at 32 px, a laptop run
    accelerate launch recipes/supervised.py --data ../shared/data/cifar10 --model vit_tiny \
        --patch-size 4 --img-size 32 --steps 300 --batch-size 64 --out runs/sup

Paper settings (SPEC section 2): Adam(0.9, 0.999), weight decay 0.1, warmup then cosine decay,
gradient clipping at norm 1. The paper trains at batch 4096 for ~90 epochs with 10k warmup
steps; the defaults here are the laptop-sized version (warmup = 10% of the steps).
"""

from ssl_vit.train import run_recipe

DEFAULTS = dict(
    model="vit_tiny", patch_size=4, img_size=32,
    steps=200, batch_size=64,
    optimizer="adamw", lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1, clip_grad=1.0,
    crop_scale=(0.35, 1.0),  # a 32 px image has little to spare: milder than ImageNet's 0.08
)

if __name__ == "__main__":
    run_recipe("supervised", DEFAULTS, description=__doc__)
