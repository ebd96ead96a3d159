"""FSDP2 on 2 CPU processes (gloo), through the functions the trainer uses; run by ``test_fsdp.py``:

    torchrun --nproc_per_node 2 tests/fsdp_run.py [OBJECTIVE ...]

For each objective (all by default): ``shard_objective`` shards every parameter, each Transformer
block (the teacher's and the decoder's too) in a unit of its own; the gathered state
(``full_state_dict``) and the ckpt.pt parts built from it equal the unsharded model's; one
``optimizer_step`` trains the sharded model (frozen parameters included); the EMA teacher update
on shards equals the unsharded update; ``evaluate`` on the sharded model, with test batches shared
unevenly (one process has more, one batch has no readable image), gives the unsharded numbers.
Prints ``rank R of 2: OBJECTIVE ok`` per objective; the first failed check raises.

Accelerate refuses FSDP on CPUs (its FSDP mode needs an accelerator), so the plugin path
(``shard_with_plugin``) runs only in a GPU launch; everything it calls runs here.
"""

import copy
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from conftest import tiny_vit
from ssl_vit.config import TrainConfig
from ssl_vit.data import MEAN, STD
from ssl_vit.objectives import DataInfo, StepInfo, get_objective
from ssl_vit.objectives.frozen_teacher import FrozenTeacher
from ssl_vit.objectives.teacher import TeacherObjective
from ssl_vit.train.evaluation import evaluate
from ssl_vit.train.optim import build_optimizer
from ssl_vit.train.sharding import full_state_dict, shard_objective
from ssl_vit.train.step import optimizer_step

CLASSES = 10
DATA = DataInfo("test", CLASSES, None, MEAN, STD, 16)
# objective -> (backbone settings, objective settings); heads and decoders small
SETTINGS = {
    "supervised": ({}, {}),
    "masked_patch": ({}, {}),
    "mae": ({"pos_embed": "sincos"}, {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
    "dino": ({}, {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2,
                  "local_crop_size": 8}),
    "msn": ({}, {"num_prototypes": 8, "hidden_dim": 32, "output_dim": 16, "focal_views": 2, "focal_size": 8}),
    "distill": ({"distillation_token": True}, {"teacher": "a frozen linear classifier"}),
}


def build(name: str):
    backbone_kw, cfg_kw = SETTINGS[name]
    cls = get_objective(name)
    objective = cls(tiny_vit(depth=1, **backbone_kw), cls.Config(**cfg_kw), DATA)
    if name == "distill":  # a frozen teacher outside the module tree, as prepare_training loads one
        linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, CLASSES))
        objective._teacher = [FrozenTeacher(linear, linear, (16, 16), MEAN, STD, DATA, "linear")]
    return objective


def batch(name: str, n: int, seed: int) -> dict:
    """A training or test batch of ``n`` images as the objective's train transform gives them."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    if name in ("dino", "msn"):  # 2 views at 16 px, 2 at 8 px
        small = [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)]
        return {"image": [images, torch.randn(n, 3, 16, 16, generator=g), *small]}
    return {"image": images, "label": torch.randint(0, CLASSES, (n,), generator=g)}


def assert_equal_states(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())[:5]}"
    for k, v in want.items():
        assert torch.equal(got[k].cpu(), v.detach().cpu()), f"{what}: {k} differs"


def check_units(name: str, objective) -> None:
    """Every parameter sharded; every block a unit; the teacher's and the decoder's blocks among them."""
    assert all(isinstance(p, DTensor) for p in objective.parameters()), f"{name}: a parameter left unsharded"
    units = {id(m) for m in objective.fsdp_units()}
    blocks = [n for n, m in objective.named_modules() if id(m) in units]
    expected = {"backbone"} | ({"teacher"} if name in ("dino", "msn") else set()) | ({"decoder"} if name == "mae" else set())
    assert {n.split(".")[0] for n in blocks} == expected, f"{name}: units {blocks}"


def check_checkpoint(objective, reference) -> None:
    """The gathered state and the ckpt.pt parts built from it equal the unsharded model's (main process)."""
    state = full_state_dict(objective)  # collective: every process
    if dist.get_rank() == 0:
        assert_equal_states(state, reference.state_dict(), "gathered state")
        assert_equal_states(objective.exported_state(state),
                            reference.export_backbone().vit.state_dict(), "exported backbone")
        assert_equal_states(objective.objective_state(state), reference.objective_state(), "objective state")
    else:
        assert state == {}


def load_gathered(reference, objective) -> None:
    """The sharded model's weights into the unsharded one, on the main process (where it is compared)."""
    state = full_state_dict(objective)  # collective: every process
    if dist.get_rank() == 0:
        reference.load_state_dict(state)


def check_ema(objective, reference) -> None:
    """After a training step (student != teacher): the EMA on shards equals the unsharded EMA."""
    load_gathered(reference, objective)
    student = [p.full_tensor() for p in objective._student_parameters()]
    teacher = [p.full_tensor() for p in objective._teacher_parameters()]
    assert any(not torch.equal(s, t) for s, t in zip(student, teacher)), "the step left the teacher = student"
    objective.update_teacher(3, 10)
    reference.update_teacher(3, 10)
    after = full_state_dict(objective)
    if dist.get_rank() == 0:
        assert_equal_states(after, reference.state_dict(), "teacher after the EMA")


def check_evaluation(name: str, objective, reference, acc: Accelerator) -> None:
    """Test batches of 3, 2 (and one unreadable) on rank 0, of 4 on rank 1: the unsharded metric of all
    (compared on the main process)."""
    shares = {0: [batch(name, 3, 10), batch(name, 2, 11), {"skipped": 2}], 1: [batch(name, 4, 12)]}
    got = evaluate(objective, shares[dist.get_rank()], acc, DATA.img_size)
    load_gathered(reference, objective)
    if dist.get_rank():
        return
    reference.eval()
    parts = [reference.evaluate_batch(b) for b in shares[0][:2] + shares[1]]
    want = reference.test_metrics({k: sum(p[k] for p in parts) for k in parts[0]})
    assert got == want, f"{name}: sharded {got}, unsharded {want}"


def main(names: list[str]) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2 and dist.get_backend() == "gloo", "launch with torchrun --nproc_per_node 2"
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    tc = TrainConfig(optimizer="adamw", lr=1e-3)
    for name in names:
        torch.manual_seed(0)
        objective = build(name).train()
        reference = copy.deepcopy(objective)
        shard_objective(objective, mesh)
        check_units(name, objective)
        check_checkpoint(objective, reference)
        optimizer = build_optimizer(objective, tc)
        clip_mode = "per_param" if name == "dino" else "norm"
        result = optimizer_step(acc, objective, objective, optimizer, [batch(name, 4, rank)], StepInfo(0, 10, 0, 5),
                                1.0, clip_mode)
        assert result.finite, f"{name}: non-finite step"
        if isinstance(objective, TeacherObjective):
            check_ema(objective, reference)
        if objective.has_test_metric:
            check_evaluation(name, objective, reference, acc)
        print(f"rank {rank} of {dist.get_world_size()}: {name} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
