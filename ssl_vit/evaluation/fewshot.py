"""Few-shot linear evaluation (ViT paper section 4.1), big_vision's ``fewshot_lsr`` in PyTorch.

    fewshot(features, shots=(1, 5, 10, 25), seeds=3, l2=1024.0 | "sweep") -> one record per shot count
    (command line: python -m eval.fewshot CKPT --data NAME_OR_PATH [--shots ...] [--seeds 3] [--l2 sweep])

For each seed, k training images per class are drawn from the train features; the features are
standardised with that few-shot set's mean and std, a constant bias feature is appended, the
targets are {-1, 1}^K, and a regularised least-squares classifier is solved in closed form and
scored by argmax on the test set. Reported: mean and std (over seeds) of the test accuracy.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from ..errors import EvalError
from .features import Features

BIAS_CONSTANT = 100.0  # value of the appended bias feature: large, so its weight is barely regularised
STD_EPS = 1e-5  # added to each feature's std before standardising
DEFAULT_L2 = 2.0 ** 10  # big_vision's fixed ridge penalty
L2_GRID = tuple(2.0 ** i for i in range(-10, 20))  # big_vision's sweep, chosen on held-out train points
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_VAL_SIZE = 2000  # held-out training points per seed for --l2 sweep

L2 = Union[float, str]  # a penalty, or "sweep"


class RidgeClassifier:
    """Regularised least squares on standardised features, solvable for any penalty at once.

    Fit on x: [n, D] and labels: [n]; ``predict(x_test, l2)`` gives [m] class indices.
    """

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int, dual: Optional[bool] = None):
        x = x.double()
        self.mean = x.mean(0, keepdim=True)
        self.std = x.std(0, unbiased=False, keepdim=True) + STD_EPS
        x = self.design(x)  # X: [n, D + 1]
        y = 2.0 * F.one_hot(labels, num_classes).double() - 1.0  # Y: [n, K] in {-1, 1}
        n, d = x.shape
        # Ridge regression  W = argmin |XW - Y|^2 + l2 |W|^2  has two closed forms:
        #   primal (n >= d):  W = (X'X + l2 I_d)^-1 X'Y      a d x d system
        #   dual   (n <  d):  W = X'(XX' + l2 I_n)^-1 Y      an n x n system
        # With the eigendecomposition  G = Q diag(e) Q'  of the Gram matrix (X'X or XX'),
        # (G + l2 I)^-1 = Q diag(1 / (e + l2)) Q', so both read  W = L diag(1 / (e + l2)) R  with
        #   primal: L = Q, R = Q'X'Y;   dual: L = X'Q, R = Q'Y,
        # and every l2 of a sweep costs one small matrix product (as in big_vision).
        self.dual = n < d if dual is None else dual
        if self.dual:
            self.eigs, q = torch.linalg.eigh(x @ x.T)
            self.lhs, self.rhs = x.T @ q, q.T @ y
        else:
            self.eigs, q = torch.linalg.eigh(x.T @ x)
            self.lhs, self.rhs = q, q.T @ (x.T @ y)

    def design(self, x: torch.Tensor) -> torch.Tensor:
        """[m, D] -> [m, D + 1]: standardised with the few-shot statistics, bias feature appended."""
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        return F.pad(x, (0, 1), value=BIAS_CONSTANT)

    def weights(self, l2: float) -> torch.Tensor:
        """W: [D + 1, K] for the penalty ``l2``."""
        return (self.lhs / (self.eigs + l2)) @ self.rhs

    def predict(self, x: torch.Tensor, l2: float) -> torch.Tensor:
        """[m, D] -> [m] argmax class.

        The standardisation and the bias feature are folded into one affine map of the raw
        features, so a large test set is read once and never copied:
        ((x - mean) / std) W_D + BIAS w_b  =  x (W_D / std') + (BIAS w_b - (mean / std) W_D).
        """
        w = self.weights(l2)  # [D + 1, K]
        scale = w[:-1] / self.std.T  # [D, K]
        offset = BIAS_CONSTANT * w[-1] - (self.mean / self.std) @ w[:-1]  # [1, K]
        return torch.addmm(offset.to(x.dtype), x, scale.to(x.dtype)).argmax(1)

    def accuracy(self, x: torch.Tensor, labels: torch.Tensor, l2: float) -> float:
        return (self.predict(x, l2) == labels).float().mean().item()

    def select_l2(self, x: torch.Tensor, labels: torch.Tensor, grid=L2_GRID) -> float:
        """The penalty of ``grid`` with the best accuracy on held-out (x, labels); ties go to the
        larger penalty (the simpler classifier)."""
        scores = [(self.accuracy(x, labels, l2), l2) for l2 in grid]
        return max(scores)[1]


def class_members(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Indices of each class's training points."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


def check_shots(members: list[torch.Tensor], shots: int, reserve: int = 0) -> None:
    small = [(c, len(m)) for c, m in enumerate(members) if len(m) < shots + reserve]
    if small:
        c, n = min(small, key=lambda cn: cn[1])
        more = f" (plus {reserve} held out for --l2 sweep)" if reserve else ""
        raise EvalError(
            f"{shots}-shot needs {shots + reserve} training images per class{more}, but class {c} has {n} "
            f"({len(small)} classes are too small); lower --shots or use more training images"
        )


def sample_shots(members: list[torch.Tensor], shots: int, generator: torch.Generator) -> torch.Tensor:
    """[K * shots] indices: ``shots`` random training points of every class."""
    return torch.cat([m[torch.randperm(len(m), generator=generator)[:shots]] for m in members])


def held_out(n: int, chosen: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Up to ``size`` random training indices outside the few-shot set (to choose l2 on)."""
    free = torch.ones(n, dtype=torch.bool)
    free[chosen] = False
    rest = free.nonzero().squeeze(1)
    return rest[torch.randperm(len(rest), generator=generator)[:size]]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread. The few-shot solves are small (a Gram matrix of at most
    min(n, D + 1) squared): extra threads mostly add synchronisation, which costs seconds on a
    shared CPU (measured: the benchmark grid took 0.2 s on one thread, 5 s on two, load 6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fewshot(features: Features, shots=DEFAULT_SHOTS, seeds: int = 3, l2: L2 = DEFAULT_L2,
            val_size: int = DEFAULT_VAL_SIZE, device: Optional[torch.device] = None) -> list[dict]:
    """One record per shot count: accuracy mean and std over seeds (std: population, ddof 0)."""
    device = device or features.train.device
    with one_thread() if device.type == "cpu" else nullcontext():
        return _fewshot(features, shots, seeds, l2, val_size, device)


def _fewshot(features: Features, shots, seeds: int, l2: L2, val_size: int, device: torch.device) -> list[dict]:
    train, train_y = features.train.to(device), features.train_labels.to(device)
    test, test_y = features.test.to(device), features.test_labels.to(device)
    members = class_members(features.train_labels, features.num_classes)
    sweep = l2 == "sweep"
    for k in shots:
        check_shots(members, k, reserve=1 if sweep else 0)
    records = []
    for k in shots:
        accuracies, penalties = [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            idx = sample_shots(members, k, g)
            clf = RidgeClassifier(train[idx.to(device)], train_y[idx.to(device)], features.num_classes)
            penalty = l2
            if sweep:
                val = held_out(len(train), idx, val_size, g).to(device)
                penalty = clf.select_l2(train[val], train_y[val])
            penalties.append(penalty)
            accuracies.append(clf.accuracy(test, test_y, penalty))
        acc = torch.tensor(accuracies, dtype=torch.float64)
        records.append({"shots": k, "l2": penalties if sweep else l2, "accuracy": acc.mean().item(),
                        "accuracy_std": acc.std(unbiased=False).item(), "seeds": seeds})
    return records
