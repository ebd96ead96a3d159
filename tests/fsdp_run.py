"""FSDP2 on 2 CPU processes (gloo), through the functions the trainer uses; run by ``test_fsdp.py``:

    torchrun --nproc_per_node 2 tests/fsdp_run.py [OBJECTIVE ...]

For each objective (all by default): ``shard_objective`` shards every parameter, each Transformer
block (the teacher's and the decoder's too) in a unit of its own; the gathered state
(``full_state_dict``) and the ckpt.pt parts built from it equal the unsharded model's;
``optimizer_step`` trains the sharded model (frozen parameters included), and where no random masks
are drawn, two processes' halves of a batch update it as one unsharded process on the whole batch;
Accelerate's FSDP2 state (what ``save_state`` and ``load_state`` write and read), saved after a step
that left DINO's last layer alone, resumes model and optimizer exactly; the EMA teacher update on
shards equals the unsharded update; the online monitors of the sharded model equal the unsharded
model's; ``evaluate`` on the sharded model, with test batches shared
unevenly (one process has more, one batch has no readable image), gives the unsharded numbers;
DINO and MSN (with its heads' BatchNorm) train under bf16 autocast; DINO's per-parameter gradient
norms come from one all-reduce.
Prints ``rank R of 2: OBJECTIVE ok`` per objective; the first failed check raises.

Accelerate refuses FSDP on CPUs (its FSDP mode needs an accelerator), so the plugin path
(``shard_with_plugin``, ``save_state`` itself) runs only in a GPU launch; what they call runs here.
"""

import copy
import math
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import load_fsdp_model, load_fsdp_optimizer, save_fsdp_model, save_fsdp_optimizer
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from conftest import tiny_vit
from ssl_vit.config import TrainConfig
from ssl_vit.data import MEAN, STD
from ssl_vit.evaluation.monitor import MonitorImages, Monitors
from ssl_vit.objectives import DataInfo, StepInfo, get_objective
from ssl_vit.objectives.frozen_teacher import FrozenTeacher
from ssl_vit.objectives.teacher import TeacherObjective
from ssl_vit.train.evaluation import evaluate
from ssl_vit.train.optim import build_optimizer
from ssl_vit.train.sharding import full_state_dict, init_optimizer_state, shard_objective
from ssl_vit.train.step import agreed_finite, optimizer_step, parameter_norms

CLASSES = 10
DATA = DataInfo("test", CLASSES, None, MEAN, STD, 16)
# objective -> (backbone settings, objective settings); heads and decoders small
SETTINGS = {
    "supervised": ({}, {}),
    "masked_patch": ({}, {}),
    "mae": ({"pos_embed": "sincos"}, {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}),
    "dino": ({}, {"out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2,
                  "local_crop_size": 8}),
    # MSN without its heads' BatchNorm: on gloo (no SyncBatchNorm, which MSN uses on GPUs) each process
    # keeps running statistics of its own, and a sharded state keeps one process's
    "msn": ({}, {"num_prototypes": 8, "hidden_dim": 32, "output_dim": 16, "focal_views": 2, "focal_size": 8,
                 "head_bn": False}),
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
    """After a training step (student != teacher): the EMA on shards equals the unsharded EMA, and one
    for a step dropped on the device leaves the teacher as it was."""
    load_gathered(reference, objective)
    student = [p.full_tensor() for p in objective._student_parameters()]
    teacher = [p.full_tensor() for p in objective._teacher_parameters()]
    assert any(not torch.equal(s, t) for s, t in zip(student, teacher)), "the step left the teacher = student"
    before = full_state_dict(objective)
    objective.update_teacher(StepInfo(3, 10, 0, 1, applied=torch.tensor(False)))  # a step dropped on the device
    dropped = full_state_dict(objective)
    objective.update_teacher(StepInfo(3, 10, 0, 1, applied=torch.tensor(True)))
    reference.update_teacher(StepInfo(3, 10, 0, 1))
    after = full_state_dict(objective)
    if dist.get_rank() == 0:
        assert_equal_states(dropped, before, "teacher after a dropped step's EMA")
        assert_equal_states(after, reference.state_dict(), "teacher after the EMA")


def check_resume(name: str, objective, optimizer, acc: Accelerator, mesh, tc: TrainConfig) -> None:
    """Through the functions ``save_state`` and ``load_state`` call under FSDP2 with the sharded state of
    configs/accelerate/fsdp2.yaml: a fresh sharded model and optimizer loaded from the saved state equal
    the saved ones (compared on the main process)."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    folder = [tempfile.mkdtemp(prefix="fsdp_run-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(folder)
    save_fsdp_model(plugin, acc, objective, folder[0])
    save_fsdp_optimizer(plugin, acc, optimizer, objective, folder[0])
    torch.manual_seed(1)
    fresh = build(name).train()
    shard_objective(fresh, mesh)
    fresh_optimizer = build_optimizer(fresh, tc)
    init_optimizer_state(fresh, fresh_optimizer)
    load_fsdp_model(plugin, acc, fresh, folder[0])
    load_fsdp_optimizer(plugin, acc, fresh_optimizer, fresh, folder[0])
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved, loaded = full_state_dict(objective), full_state_dict(fresh)
    saved_optim = get_optimizer_state_dict(objective, optimizer, options=options)  # the main process's: full
    loaded_optim = get_optimizer_state_dict(fresh, fresh_optimizer, options=options)
    if dist.get_rank() == 0:
        assert_equal_states(loaded, saved, "resumed model")
        saved_optim, loaded_optim = saved_optim["state"], loaded_optim["state"]
        assert saved_optim.keys() == loaded_optim.keys() and saved_optim, f"{name}: optimizer state keys"
        for k in saved_optim:
            assert_equal_states(loaded_optim[k], saved_optim[k], f"resumed optimizer state of {k}")
        shutil.rmtree(folder[0])


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


def half(whole: dict, rank: int) -> dict:
    """This process's half of a batch (of every view)."""
    def cut(x):
        return [cut(v) for v in x] if isinstance(x, list) else x.chunk(2)[rank]
    return {k: cut(v) for k, v in whole.items()}


def train(name: str, model, optimizer, acc: Accelerator, data: dict, steps: range) -> None:
    """Optimizer steps ``steps`` on ``data``; DINO's last layer is frozen in step 0 (one step per epoch)."""
    for step in steps:
        result = optimizer_step(acc, model, model, optimizer, [dict(data)], StepInfo(step, 10, 0, 1), 1.0,
                                "per_param" if name == "dino" else "norm")
        assert result.finite, f"{name}: non-finite step"


def check_training(name: str, objective, reference, whole: dict, acc: Accelerator, tc: TrainConfig) -> None:
    """After two steps of the sharded model on each process's half of ``whole``, for objectives that draw
    no random masks: the same update of the weights as the unsharded model's two steps on the whole
    batch (run on every process, so that DINO's centre, summed over processes, sees the same), to 0.1%
    of its norm (Adam turns the float noise of gradients that are 0 in exact arithmetic, the keys'
    bias, into steps of the learning rate's size)."""
    if name in ("masked_patch", "mae", "msn"):  # their masks differ between the processes and one process
        return
    assert_same_update(name, objective, reference, whole, acc, tc, 2)


def assert_same_update(name: str, objective, reference, whole: dict, acc: Accelerator, tc: TrainConfig,
                       steps: int) -> None:
    """The sharded ``objective``, trained already, moved the weights as ``reference`` (unsharded, as it
    was) does in ``steps`` steps on ``whole``, to 0.1% of the update's norm."""
    before = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    train(name, reference, build_optimizer(reference, tc), acc, whole, range(steps))
    state = full_state_dict(objective)
    if dist.get_rank() == 0:
        def update(weights):
            return torch.cat([(weights[k].float() - v.float()).flatten() for k, v in before.items()])
        want, got = update(reference.state_dict()), update(state)
        error = ((got - want).norm() / want.norm()).item()
        assert error < 1e-3, f"{name}: sharded training moved the weights otherwise (relative error {error:.3g})"


def check_first_updates(acc: Accelerator, mesh) -> None:
    """Optimizers whose state the fill of ``init_optimizer_state`` (a step at lr 0 on zero gradients)
    would disturb: Adam's coupled weight decay gives zero gradients moments, Lamb counts its steps on
    the parameter group. The sharded model's first update is the unsharded one's."""
    whole = batch("supervised", 8, 0)
    for name in ("adam", "lamb"):
        tc = TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.05)
        torch.manual_seed(0)
        objective = build("supervised").train()
        reference = copy.deepcopy(objective)
        shard_objective(objective, mesh)
        optimizer = build_optimizer(objective, tc)
        init_optimizer_state(objective, optimizer)
        train("supervised", objective, optimizer, acc, half(whole, dist.get_rank()), range(1))
        assert_same_update(f"supervised with {name}", objective, reference, whole, acc, tc, 1)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: first updates ok", flush=True)


def check_bf16(name: str, mesh) -> None:
    """A training forward and backward of a sharded model under bf16 autocast, as a bf16 run trains:
    the float32 parts (DINO's and MSN's losses, MSN's BatchNorm) meet float32 parameters."""
    backbone_kw, cfg_kw = SETTINGS[name]
    cls = get_objective(name)
    objective = cls(tiny_vit(depth=1, **backbone_kw), cls.Config(**{**cfg_kw, "head_bn": True} if name == "msn"
                                                                 else cfg_kw), DATA).train()
    shard_objective(objective, mesh)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = objective(batch(name, 4, dist.get_rank()))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss), f"{name}: bf16 loss {loss}"


def check_monitors(name: str, objective, reference, acc: Accelerator) -> None:
    """The online monitors of the sharded objective (every process runs the forward passes, the main
    process measures) give the unsharded objective's numbers."""
    g = torch.Generator().manual_seed(1)
    images = MonitorImages(torch.randn(30, 3, 16, 16, generator=g), torch.arange(30) % 3,
                           torch.randn(9, 3, 16, 16, generator=g), torch.arange(9) % 3, 3)
    names = ("knn", "fewshot", "rankme")
    got = Monitors(names, 2, acc, images)(2, 10, objective)
    load_gathered(reference, objective)
    want = Monitors(names, 2, acc, images)(2, 10, reference)
    if dist.get_rank():
        assert got is None and want is None, f"{name}: monitors on rank {dist.get_rank()}: {got}"
        return
    assert got.keys() == want.keys() == {"monitor_knn_top1", "monitor_fewshot_10shot", "monitor_rankme"}, got
    for k in got:
        assert math.isclose(got[k], want[k], rel_tol=1e-4), f"{name}: sharded {k} {got[k]} != {want[k]}"


def check_norms(name: str, objective, data: dict) -> None:
    """The per-parameter norms DINO clips with, of sharded gradients: each whole gradient's norm, from
    one all-reduce (not one per parameter)."""
    loss, _ = objective(data)
    loss.backward()
    grads = [p.grad for p in objective.parameters() if p.grad is not None]
    want = torch.stack([g.full_tensor().norm() for g in grads])
    with CommDebugMode() as comm:
        got = torch.stack(parameter_norms(grads))
    objective.zero_grad(set_to_none=True)
    assert comm.get_total_counts() == 1, f"{name}: {comm.get_total_counts()} collectives for the norms"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), f"{name}: sharded norms {got} != {want}"


def check_agreed_finite(acc: Accelerator) -> None:
    """A loss that is non-finite on one process alone drops the step on every process."""
    mine = torch.tensor(math.inf if dist.get_rank() == 0 else 1.0)
    assert not agreed_finite(mine, acc) and agreed_finite(torch.tensor(1.0), acc)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: finite flag agreed", flush=True)


def main(names: list[str]) -> None:
    acc = Accelerator(cpu=True)
    assert acc.num_processes == 2 and dist.get_backend() == "gloo", "launch with torchrun --nproc_per_node 2"
    check_agreed_finite(acc)
    mesh = init_device_mesh("cpu", (2,))
    check_first_updates(acc, mesh)
    tc = TrainConfig(optimizer="adamw", lr=1e-3)
    for name in names:
        torch.manual_seed(0)
        objective = build(name).train()
        reference = copy.deepcopy(objective)
        shard_objective(objective, mesh)
        check_units(name, objective)
        check_checkpoint(objective, reference)
        optimizer = build_optimizer(objective, tc)
        init_optimizer_state(objective, optimizer)
        whole = batch(name, 8, 0)
        train(name, objective, optimizer, acc, half(whole, dist.get_rank()), range(1))
        check_resume(name, objective, optimizer, acc, mesh, tc)  # DINO's last layer not updated yet
        train(name, objective, optimizer, acc, half(whole, dist.get_rank()), range(1, 2))
        check_training(name, objective, reference, whole, acc, tc)
        if isinstance(objective, TeacherObjective):
            check_ema(objective, reference)
            check_bf16(name, mesh)
        if objective.has_test_metric:
            check_evaluation(name, objective, reference, acc)
        check_monitors(name, objective, reference, acc)
        if name == "dino":  # the objective that clips each parameter
            check_norms(name, objective, half(whole, dist.get_rank()))
        print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {name} ok", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(SETTINGS))
