"""DINO self-distillation (Caron et al. 2021) with an EMA teacher and multi-crop.

    accelerate launch recipes/dino.py                  # digits, ViT-Ti/4 at 32 px, a laptop run
    accelerate launch recipes/dino.py --data ../shared/data/cifar10 --steps 3000 --out runs/dino

Paper settings (SPEC section 2): AdamW, lr 5e-4 x batch/256, 10 warmup epochs of 100 (here
--warmup-steps defaults to 10% of --steps, the same share), cosine to 1e-6, weight decay on a
cosine from 0.04 to 0.4, gradient clipping 3.0, drop-path 0.1 on the student, teacher
temperature 0.04, student 0.1, centre momentum 0.9, 2 global + 8 local crops.

Small-image defaults (32 px data, CPU):
- ViT-Ti with 4 px patches at 32 px (an 8x8 grid) and 6 layers; local crops of 16 px (a 4x4
  grid: the paper's 96/224 ratio rounded up to whole patches), see ``ssl_vit.data.multicrop``.
- K = 4096 prototypes instead of the paper's 65536: at 65536 the last layer and the
  [crops, batch, K] softmaxes about double the step on a CPU, for data with a handful of
  classes (docs/results/README.md). Pass --out-dim 65536 for the paper's.
- Teacher momentum 0.9995, the official advice for small batches (0.996 is tuned for batch 1024).
  Its EMA horizon is ~2000 steps, so in runs of a few hundred steps the teacher hardly moves from
  its initialisation; for such short runs pass --momentum-teacher 0.996.

Short CPU runs: the paper's rule gives lr 1.25e-4 at batch 64, which leaves the loss flat for
hundreds of steps. What learned on CIFAR-10 in 1.5 epochs (figures and curves in
docs/results/README.md):

    python recipes/dino.py --data ../shared/data/cifar10 --steps 1200 --lr 2e-3 \
        --momentum-teacher 0.996 --freeze-last-layer-epochs 0.2 --precision bf16

that is the paper's 5e-4 unscaled at batch 64, a teacher that keeps up, and the last layer frozen
for the first 0.2 epoch (13% of the run; the paper's default freezes 1 epoch of 100). bf16
autocast is faster on CPUs with AVX512-BF16.
The checkpoint's backbone is the teacher; ``python -m ssl_vit.export CKPT OUT --student`` exports
the student.
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("dino").recipe_defaults
    run_cli(lambda argv: run_recipe("dino", argv=argv, description=__doc__))
