"""MSN: Masked Siamese Networks (Assran et al. 2022), facebookresearch/msn's recipe.

    accelerate launch recipes/msn.py                   # digits, ViT-Ti/4 at 32 px, a laptop run
    accelerate launch recipes/msn.py --data ../shared/data/cifar10 --steps 3000 --out runs/msn

Official settings (configs/pretrain/msn_vits16.yaml, src/msn_train.py): a target view and a random
anchor view (224 px, scale 0.3-1) and 10 focal anchor views (96 px, scale 0.05-0.3), colour jitter
0.5, blur p 0.5; 15% of the random anchor's patches dropped for ViT-S/16 (--patch-drop; by model
size: 0.3 for ViT-B/16, 0.7 for ViT-B/4); a 3-layer projection head with BatchNorm (2048 wide, 256
out) and 1024 prototypes, temperature 0.1, targets sharpened at 0.25 and balanced by Sinkhorn, me-max
weight 1; AdamW, lr 1e-3 at batch 1024 (--lr-ref-batch 1024: linear scaling to other batches),
cosine to 1e-6, weight decay 0.04 -> 0.4, gradient clipping 3.0, no drop-path; teacher momentum
0.996 -> 1 (linear; the schedules span 1.25 x the run).

Small-image defaults (32 px data, CPU), each one flag away from the official value
(docs/deviations.md):
- ViT-Ti with 4 px patches at 32 px (an 8x8 grid) and 6 layers (as recipes/dino.py); focal views of
  16 px (a 4x4 grid: the 96/224 ratio rounded up to whole patches, as DINO's local crops);
  --img-size 224 --focal-size 96 for the official views.
- 256 prototypes instead of 1024: a batch of 64 images cannot use 1024 (--num-prototypes 1024).

Short CPU runs: the official lr scaled to batch 64 is 6.25e-5, which barely moves a short run; pass
--lr-ref-batch 64 (1e-3 at batch 64) or a larger --lr. The checkpoint's backbone is the teacher;
``python -m ssl_vit.export CKPT OUT --student`` exports the student.
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("msn").recipe_defaults
    run_cli(lambda argv: run_recipe("msn", argv=argv, description=__doc__))
