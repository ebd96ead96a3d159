"""Masked patch prediction, the self-supervised objective of the ViT paper (section 4.6).

    accelerate launch recipes/masked_patch.py                # digits, ViT-Ti/4 at 32 px, a laptop run
    accelerate launch recipes/masked_patch.py --data ../shared/data/cifar10 --model vit_tiny \
        --patch-size 4 --img-size 32 --steps 300 --batch-size 64 --out runs/mpp
    accelerate launch recipes/masked_patch.py --model r_vit_tiny --img-size 64   # hybrid: a 4x4 grid

Corrupt 50% of the patch embeddings (80% [mask], 10% a random patch, 10% unchanged) and predict
each corrupted patch's 3-bit mean colour (--target color3bit | color3bit_4x4 | pixels_l2).
Watch color_accuracy against baseline_accuracy (always the batch's most frequent colour) in
metrics.jsonl. Picture: python -m ssl_vit.viz.masked_patch RUN/ckpt.pt --data ... --out x.png

Paper settings (SPEC section 2): Adam(0.9, 0.999), lr 2e-4 at batch 4096, 10k warmup steps,
cosine decay, inception crop and flip, 1M steps. Here AdamW(0.9, 0.999) with decoupled weight
decay 0.1 (the paper gives none for this objective; 0.1 is its supervised pretraining value),
gradient clipping at norm 1, warmup = 10% of the steps, cosine to 0.

Learning rate: Adam's square-root rule anchored where we measured it, lr = 1e-3 * sqrt(batch_size / 64)
(--lr 1e-3 --lr-ref-batch 64 --lr-scaling sqrt, applied automatically: 2e-3 at batch 256; only
batch 64 was measured). We do not scale down from the paper's 2e-4 at batch 4096: that value
belongs to a 1M-step run, and scaling it to batch 64 gives 3.1e-6 (linear) or 2.5e-5 (square
root), which learns almost nothing in a short run (the measurement: docs/results/README.md). For the paper's
own long large-batch runs give its value at its batch: --batch-size 4096 --lr 2e-4 --lr-ref-batch 4096
--warmup-steps 10000.
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("masked_patch").recipe_defaults
    run_cli(lambda argv: run_recipe("masked_patch", argv=argv, description=__doc__))
