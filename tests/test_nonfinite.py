"""A non-finite step without a host sync: the fused optimizer drops its update on a device flag, the
EMA teacher and centre are restored on the device, and no op in the step makes the host wait."""

import sys
from pathlib import Path

import pytest
import torch

from ssl_vit.config import parse_run_config
from ssl_vit.objectives import StepInfo, get_objective
from ssl_vit.train import Trainer, plain
from ssl_vit.train.step import optimizer_step, takes_found_inf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from measure import SyncAudit  # noqa: E402

TINY_DINO = ["--model", "vit_tiny", "--depth", "1", "--patch-size", "4", "--img-size", "16", "--batch-size", "8",
             "--out-dim", "32", "--hidden-dim", "32", "--bottleneck-dim", "16", "--local-crops-number", "2",
             "--num-workers", "0", "--steps", "4", "--report-to", "none"]


def _dino(out, *extra) -> Trainer:
    cls = get_objective("dino")
    argv = [*TINY_DINO, "--out", str(out), *extra]
    trainer = Trainer(parse_run_config("dino", cls.Config, cls.recipe_defaults, argv))
    trainer.lock.release()
    return trainer


def _step(trainer: Trainer, group: list, step: int, poison: bool = False):
    tc, model = trainer.run_cfg.train, trainer.model

    def forward(batch):
        loss, metrics = model(batch)
        return (loss * float("nan") if poison else loss), metrics

    return optimizer_step(trainer.acc, model, plain(model, trainer.acc), trainer.optimizer, group,
                          StepInfo(step, tc.steps, 0, trainer.steps_per_epoch), tc.clip_grad, tc.clip_grad_mode,
                          forward=forward)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """The objective's weights and buffers (student, teacher, centre) and the optimizer's state."""
    out = {f"model.{k}": v.clone() for k, v in plain(trainer.model, trainer.acc).state_dict().items()}
    for i, state in enumerate(trainer.optimizer.optimizer.state.values()):
        out.update({f"optimizer.{i}.{k}": v.clone() for k, v in state.items()})
    return out


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])  # fused: no host sync; sgd: read every step
def test_a_non_finite_step_leaves_weights_optimizer_and_teacher_as_they_were(tmp_path, optimizer):
    trainer = _dino(tmp_path / "run", "--optimizer", optimizer, "--freeze-last-layer-epochs", "0")
    assert takes_found_inf(trainer.acc, trainer.optimizer) == (optimizer == "adamw")
    batches = iter(trainer.data.micro_batches(0))
    groups = [next(batches)[1] for _ in range(3)]  # loaded outside the audit: augmentations read random numbers
    with SyncAudit() as audit:
        good = _step(trainer, groups[0], 0)  # the optimizer state exists from here
        before = _state(trainer)
        bad = _step(trainer, groups[1], 1, poison=True)
        after = _state(trainer)
        _step(trainer, groups[2], 1)
    assert good.finite and not bad.finite
    if optimizer == "adamw":
        assert dict(audit.ops) == {}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [] and set(after) == set(before)
    moved = _state(trainer)  # a finite step still updates all of it: the guard froze nothing
    assert not torch.equal(moved["model.center"], after["model.center"])
    assert all(not torch.equal(moved[k], after[k]) for k in after if k.startswith("model.teacher.blocks"))
