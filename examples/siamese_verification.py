"""Siamese twins: one encoder for both inputs of a pair, against two independent encoders.

A face-verification-style question on digits: "are these two signals the same digit?"
``ps.nn.Siamese(encoder, head)`` applies one encoder (the same parameters) to both inputs;
``ps.report`` shows the twin is free; ``shared=False`` builds the unshared baseline.

Run: ``.venv/bin/python examples/siamese_verification.py`` (about 20 s on one core).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn

import paramshare as ps

torch.set_num_threads(1)
data = make_dataset(get_dataset_args())
x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
xt, yt = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])


class PairHead(nn.Module):
    """Symmetric in its inputs: same-digit logit from |e1 - e2| and e1 * e2."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, e1, e2):
        return self.net(torch.cat([(e1 - e2).abs(), e1 * e2], -1)).squeeze(-1)


def pairs(labels: torch.Tensor, n: int, g: torch.Generator):
    """n index pairs, half of the same digit."""
    i = torch.randint(0, len(labels), (n,), generator=g)
    j = torch.randint(0, len(labels), (n,), generator=g)
    same = torch.arange(n) < n // 2
    for k in torch.nonzero(same).flatten():  # re-draw j from the same class for the first half
        pool = torch.nonzero(labels == labels[i[k]]).flatten()
        j[k] = pool[torch.randint(0, len(pool), (1,), generator=g)]
    return i, j, (labels[i] == labels[j]).float()


def run(shared: bool) -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 32))
    model = ps.nn.Siamese(encoder, PairHead(), shared=shared)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        i, j, target = pairs(y, 100, g)
        loss = F.binary_cross_entropy_with_logits(model(x[i], x[j]), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    i, j, target = pairs(yt, 2000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        acc = ((model(xt[i], xt[j]) > 0).float() == target).float().mean().item()
    r = ps.report(model)
    print(f"{'shared' if shared else 'unshared'} twins: {r.unique_params:6,d} stored parameters "
          f"({r.total_params:,} used), test pair accuracy {100 * acc:.1f}%")


run(shared=True)
run(shared=False)
