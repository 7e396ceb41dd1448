"""Sharing vs independent parameters: untie a trained convolution and see what it cost and bought.

A student's question: "a CNN is just an MLP with shared weights, so what does the sharing do?"
Train a small Conv1d classifier on MNIST-1D, then ``ps.nn.LocallyConnected1d.from_conv`` gives
every position its own copy of the filters: identical outputs, many more parameters. Training
both from the same start shows what the tie was worth.

Run: ``.venv/bin/python examples/untie_a_convolution.py`` (about 20 s on one core).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn

import paramshare as ps

torch.manual_seed(0)
torch.set_num_threads(1)
data = make_dataset(get_dataset_args())  # generated locally, 4000 train / 1000 test signals
x, y = torch.tensor(data["x"], dtype=torch.float32)[:, None], torch.tensor(data["y"])
xt, yt = torch.tensor(data["x_test"], dtype=torch.float32)[:, None], torch.tensor(data["y_test"])


def make_cnn() -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(1, 16, 5, stride=2, padding=1), nn.ReLU(),
                         nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 10, 10))


def train(model: nn.Module, steps: int = 1500) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (100,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (model(xt).argmax(-1) == yt).float().mean().item()


cnn = make_cnn()
# Untie: each convolution becomes a locally connected layer with the same filters at every position.
untied = make_cnn()
untied.load_state_dict(cnn.state_dict())
untied[0] = ps.nn.LocallyConnected1d.from_conv(untied[0], input_length=40)
untied[2] = ps.nn.LocallyConnected1d.from_conv(untied[2], input_length=19)
with torch.no_grad():
    same = torch.allclose(cnn(xt), untied(xt), atol=1e-5)
print(f"untied model computes the same function before training: {same}")

for name, model in [("CNN (filters shared across positions)", cnn), ("untied (LocallyConnected1d)", untied)]:
    params = ps.report(model).unique_params
    print(f"{name:40s} {params:7,d} parameters  test accuracy {100 * train(model):.1f}%")
