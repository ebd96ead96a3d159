"""Supervised pretraining, the ViT paper's main recipe.

    accelerate launch recipes/supervised.py                  # digits, ViT-Ti/4 at 32 px, a laptop run
    accelerate launch recipes/supervised.py --data ../shared/data/cifar10 --model vit_tiny \
        --patch-size 4 --img-size 32 --steps 300 --batch-size 64 --out runs/sup

Paper settings (SPEC section 2): Adam(0.9, 0.999), weight decay 0.1, warmup then cosine decay,
gradient clipping at norm 1. The paper trains at batch 4096 for ~90 epochs with 10k warmup
steps; the defaults here are the laptop-sized version (warmup = 10% of the steps).
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("supervised").recipe_defaults
    run_cli(lambda argv: run_recipe("supervised", argv=argv, description=__doc__))
