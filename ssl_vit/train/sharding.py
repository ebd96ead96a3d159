"""FSDP for every objective: torch's FSDP2 (``fully_shard``) under ``accelerate launch`` with an
FSDP config (``configs/accelerate/fsdp2.yaml``).

- ``shard_objective``: ``fully_shard`` on each of ``Objective.fsdp_units()`` (every Transformer
  block: the student's, an EMA teacher's, MAE's decoder's), then on the objective itself, which
  holds the rest (embeddings, tokens, norms, heads). Every parameter lies in one unit, frozen ones
  too (MAE's fixed position table, an EMA teacher, DINO's last layer while it is frozen): FSDP2
  lets a unit mix them. A module held outside the module tree (distill's frozen teacher) is not
  sharded: each process keeps a whole copy. ``evaluate_batch`` and ``represent`` (the online
  monitors') gather the root's parameters as ``forward`` does (``register_fsdp_forward_method``).
- ``shard_with_plugin``: the same with the settings of Accelerate's FSDP plugin; Accelerate's own
  wrapping policy is not used (``prepare`` keeps a model that is sharded already).
- ``full_state_dict``: the whole state with full tensors, gathered by every process together (a
  collective), held on the main process (ckpt.pt).
- ``init_optimizer_state``: every trained parameter's optimizer state from the start, so that a
  sharded ``state/`` loads (resume) whatever the optimizer had updated before it was saved.
- ``lockstep``: the same number of forward passes on every process (each one gathers parameters
  with the others), for a test split that the processes share unevenly.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..objectives import Objective


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_objective(objective: Objective, mesh: DeviceMesh, **fsdp_kwargs) -> None:
    """Shard ``objective`` in place over ``mesh``: each of its ``fsdp_units()``, then the rest as the
    root unit. ``fsdp_kwargs``: ``fully_shard``'s (``offload_policy``, ``reshard_after_forward``: for
    the units; the root keeps torch's choice, False, as Accelerate's does). Parameters are gathered and
    gradients reduced in float32, and autocast computes in bf16, as under DDP: FSDP's own bf16
    parameters (Accelerate's policy under bf16) would break the parts computed in float32 (DINO's and
    MSN's losses, BatchNorm with its float32 running statistics)."""
    policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for unit in objective.fsdp_units():
        fully_shard(unit, mesh=mesh, mp_policy=policy, **fsdp_kwargs)
    fully_shard(objective, mesh=mesh, mp_policy=policy,
                **{k: v for k, v in fsdp_kwargs.items() if k != "reshard_after_forward"})
    for method in ("evaluate_batch", "represent"):
        register_fsdp_forward_method(objective, method)


def shard_with_plugin(acc: Accelerator, objective: Objective) -> None:
    """Under an FSDP launch, shard ``objective`` (``shard_objective``) with the plugin's settings, before
    the optimizer is built on its parameters; elsewhere nothing (``launch.check_fsdp`` refused FSDP1)."""
    if acc.distributed_type != DistributedType.FSDP:
        return
    plugin = acc.state.fsdp_plugin
    objective.to(acc.device)  # fully_shard moves only what it manages; distill's teacher lies outside the tree
    shard_objective(objective, init_device_mesh(acc.device.type, (acc.num_processes,)),
                    reshard_after_forward=plugin.reshard_after_forward, offload_policy=plugin.cpu_offload)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` (its plain module, unwrapped) with full tensors. Sharded: gathered
    by all processes together, so every process must call it; the main process gets it on the CPU,
    the others an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def init_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Sharded: give every trained parameter its optimizer state now, as the optimizer's first update
    would create it. Torch loads a sharded optimizer state only when it holds every trained parameter
    (strict; Accelerate's ``load_state`` passes no other option), and a parameter not updated before a
    save (DINO's last layer, frozen in the first epoch) would have none. Torch fills the state in by a
    step at lr 0 on zero gradients (``get_optimizer_state_dict``); here its weight decay is 0 too (a
    coupled decay, Adam's, would give the zero gradients moments), and after it the step counts go back
    to 0 and the groups to what they were (Lamb and Adan count steps on the group). So the first real
    update is the one the optimizer would have made for optimizers whose fresh state is zeros (Adam,
    AdamW, Lamb; SGD: a momentum of 0 instead of the first gradient, equal without dampening)."""
    if not is_sharded(model):
        return
    groups = [dict(group) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    get_optimizer_state_dict(model, optimizer)
    for group, saved in zip(optimizer.param_groups, groups):
        group.clear()
        group.update(saved)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].zero_()
        elif "step" in state:  # a count kept as a number
            state["step"] = 0


def lockstep(batches: Iterable[dict], placeholder: dict, device: torch.device) -> Iterator[tuple[dict, bool]]:
    """(batch, counts) pairs until no process has a batch left, so every process makes the same number of
    forward passes: ``batches``, those without a readable image replaced by ``placeholder``, then
    ``placeholder`` while other processes still have batches; counts is False for a placeholder, whose
    results are dropped. One all-reduce of a flag per batch (the length of a stream is unknown)."""
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not any_process(batch is not None, device):
            return
        yield (batch, True) if batch is not None and "image" in batch else (placeholder, False)


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any process (``flag`` itself in one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    flags = torch.tensor(int(flag), device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())
