"""Recurrence over depth: one block applied six times, against six different blocks.

``ps.nn.Recurrent(block, steps=6)`` stores one block and applies it six times (the
Universal-Transformer idea on a small residual MLP); ``ps.untie`` turns the same model into an
ordinary six-block stack with six times the block parameters, and ``ps.share_layers`` anything
in between. Data: scikit-learn's 8x8 digits.

Run: ``.venv/bin/python examples/recurrent_depth.py`` (a few seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import paramshare as ps

torch.set_num_threads(1)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.lin(h))


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    body = ps.nn.Recurrent(Residual(64), steps=6)
    if kind == "untied (6 blocks)":
        ps.untie(body)
    elif kind == "2 blocks in a cycle":
        ps.share_layers(ps.untie(body).layers, unique=2, strategy="cycle")
    return nn.Sequential(nn.Linear(64, 64), body, nn.Linear(64, 10))


for kind in ("recurrent (1 block)", "2 blocks in a cycle", "untied (6 blocks)"):
    model = build(kind)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(600):
        idx = torch.randint(0, len(y_train), (100,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    r = ps.report(model)
    print(f"{kind:22s} {r.unique_params:6,d} stored / {r.total_params:6,d} used parameters, test accuracy {100 * acc:.1f}%")
