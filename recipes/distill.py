"""DeiT's distillation (Touvron et al. 2021): a distillation token learns from a frozen teacher.

    python recipes/supervised.py --out runs/teacher                       # a teacher: any ckpt.pt with a class head
    accelerate launch recipes/distill.py --teacher runs/teacher/ckpt.pt   # digits, ViT-Ti/4 at 32 px with a distillation token
    accelerate launch recipes/distill.py --data ../shared/data/cifar10 --teacher regnety_160 \
        --teacher-weights regnety_160.safetensors --teacher-img-size 224 --out runs/distill

--teacher: a ckpt.pt of recipes/supervised.py or recipes/distill.py, a timm classifier name with
--teacher-weights FILE, or timm:NAME (timm's pretrained weights, downloaded); it must predict the
data's classes. --distillation-type hard (the paper's best: the teacher's argmax labels the
distillation token), soft (KL at --distillation-tau, x tau^2) or none; --distillation-alpha weighs it.

Paper settings (DeiT's main.py): AdamW, lr 5e-4 x batch/512, weight decay 0.05, 5 warmup epochs of 300,
cosine to 1e-5, no gradient clipping, label smoothing 0.1, Mixup 0.8, CutMix 1.0, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25, drop-path 0.1; the teacher a RegNetY-16GF. The defaults
here are the laptop-sized version (docs/deviations.md).
"""

from ssl_vit.errors import run_cli
from ssl_vit.train import run_recipe

if __name__ == "__main__":  # defaults: ssl_vit.objectives.get_objective("distill").recipe_defaults
    run_cli(lambda argv: run_recipe("distill", argv=argv, description=__doc__))
