"""Training and evaluation, deterministic for a seed.

The recipe is the published one for MNIST-1D: Adam, learning rate 1e-2, batch 100, cross
entropy; batches are drawn from per-epoch permutations of a seeded generator, so a run
depends only on its seed (not on other runs, the process or the order of jobs).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..report import report
from .data import Dataset
from .models import build_model

__all__ = ["batches", "fit", "accuracy", "param_counts", "train_classifier"]

LR = 1e-2
BATCH = 100


def batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index batches of size ``min(batch, n)`` from seeded per-epoch permutations."""
    g = torch.Generator().manual_seed(seed)
    batch = min(batch, n)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch]
        pos += batch


def fit(model: nn.Module, loss_fn: Callable[[torch.Tensor], torch.Tensor], n: int, steps: int, seed: int,
        lr: float = LR, batch: int = BATCH, after_step: Callable[[], None] | None = None) -> float:
    """Train ``model`` with Adam for ``steps`` batches; ``loss_fn(idx)`` gives a batch's loss. Returns the last loss.

    ``after_step`` runs after each optimizer step (e.g. a proximal step of a penalty).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for idx in batches(n, batch, steps, seed):
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step()
    model.eval()
    return float(loss.detach())


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
    return correct / max(1, len(y))


def param_counts(model: nn.Module) -> dict:
    """Stored and used parameters, as :func:`paramshare.report` counts them."""
    r = report(model)
    return {"stored_params": r.unique_params, "used_params": r.total_params}


def train_classifier(data: Dataset, model: str, steps: int, seed: int, fraction: float = 1.0,
                     shuffle: bool = False, **model_kwargs) -> dict:
    """Train one classifier and measure it (a study job).

    Args:
        data: the dataset.
        model: a name in :data:`paramshare.study.models.MODELS`.
        steps: optimisation steps.
        seed: initialisation and batch-order seed; also picks the training subset.
        fraction: share of the training set to use (class-stratified).
        shuffle: permute the positions with the dataset's fixed permutation.
        **model_kwargs: passed to the model's builder.

    Returns:
        ``test_acc``, ``train_acc``, ``stored_params``, ``used_params``, ``train_size``,
        ``final_loss``, ``seconds``.
    """
    t0 = time.perf_counter()
    x, y, xt, yt = (torch.from_numpy(a) for a in data.arrays(fraction, shuffle, subset_seed=seed))
    net = build_model(model, data.channels, data.length, data.classes, seed, **model_kwargs)
    last = fit(net, lambda idx: F.cross_entropy(net(x[idx]), y[idx]), len(y), steps, seed + 1)
    return {
        "test_acc": accuracy(net, xt, yt),
        "train_acc": accuracy(net, x, y),
        **param_counts(net),
        "train_size": int(len(y)),
        "final_loss": last,
        "seconds": time.perf_counter() - t0,
    }
