"""The study's models, built by name from a dataset's shape.

The four MNIST-1D baselines follow Greydanus (2020): logistic regression, a 100-100 MLP, a
three-layer CNN (25 channels; kernels 5, 3, 3; stride 2) and a bidirectional GRU (6 hidden
units) read out from every step. ``cnn_untied`` is the same CNN with each convolution
replaced by a :class:`paramshare.nn.LocallyConnected1d` holding the convolution's initial
filters at every position: the same function at initialisation, without spatial sharing.
``deep`` is a residual stack of identical convolution blocks for :func:`paramshare.share_layers`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import share_layers
from ..nn import LocallyConnected1d

__all__ = ["build_model", "MODELS", "conv_length"]


def conv_length(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


class Logistic(nn.Module):
    def __init__(self, channels: int, length: int, classes: int):
        super().__init__()
        self.linear = nn.Linear(channels * length, classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    def __init__(self, channels: int, length: int, classes: int, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(channels * length, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x):
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """Greydanus's MNIST-1D CNN: three convolutions with stride 2, then a linear classifier."""

    SPEC = ((5, 2, 1), (3, 2, 1), (3, 2, 1))  # (kernel, stride, padding)

    def __init__(self, channels: int, length: int, classes: int, width: int = 25):
        super().__init__()
        convs, lengths, c_in = [], [length], channels
        for k, s, p in self.SPEC:
            convs.append(nn.Conv1d(c_in, width, k, stride=s, padding=p))
            lengths.append(conv_length(lengths[-1], k, s, p))
            c_in = width
        self.convs = nn.ModuleList(convs)
        self.lengths = lengths
        self.linear = nn.Linear(width * lengths[-1], classes)

    def untie(self) -> CNN:
        """Replace every convolution by a locally connected layer with its filters at each position."""
        for i, conv in enumerate(self.convs):
            self.convs[i] = LocallyConnected1d.from_conv(conv, self.lengths[i])
        return self

    def forward(self, x):
        for conv in self.convs:
            x = conv(x).relu()
        return self.linear(x.flatten(1))


class GRU(nn.Module):
    """Greydanus's MNIST-1D GRU: bidirectional, 6 hidden units, a linear map of every step's state."""

    def __init__(self, channels: int, length: int, classes: int, hidden: int = 6):
        super().__init__()
        self.gru = nn.GRU(channels, hidden, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(2 * hidden * length, classes)

    def forward(self, x):
        out, _ = self.gru(x.transpose(1, 2))
        return self.linear(out.flatten(1))


class Block(nn.Module):
    """``x + relu(conv(x))``: a residual convolution block that keeps the shape."""

    def __init__(self, width: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2)

    def forward(self, x):
        return x + self.conv(x).relu()


class DeepCNN(nn.Module):
    """A stride-2 stem, ``depth`` residual blocks, a linear head.

    The blocks may share the parameters of ``unique`` of them (:func:`paramshare.share_layers`),
    plus a rank-``relax_rank`` delta per use (:func:`paramshare.relax`), or mix their filters
    from ``templates`` shared templates (:func:`paramshare.template_share`).
    """

    def __init__(self, channels: int, length: int, classes: int, depth: int = 6, width: int = 24,
                 unique: int | None = None, strategy: str = "cycle", templates: int | None = None,
                 relax_rank: int | None = None):
        super().__init__()
        self.stem = nn.Conv1d(channels, width, 5, stride=2, padding=2)
        out_len = conv_length(length, 5, 2, 2)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.linear = nn.Linear(width * out_len, classes)
        if unique is not None and unique < depth:
            share_layers(self.blocks, unique=unique, strategy=strategy)
        if relax_rank:  # every use of a shared block reads it plus its own low-rank delta
            from ..relaxed import relax

            relax(self.blocks, rank=relax_rank)
        if templates:  # each block's filters are a learned mixture of a few shared templates
            from ..bank import template_share

            template_share(self.blocks, templates=templates, params=("conv.weight",))

    def forward(self, x):
        x = self.stem(x).relu()
        for block in self.blocks:
            x = block(x)
        return self.linear(x.flatten(1))


MODELS = {
    "logistic": Logistic,
    "mlp": MLP,
    "cnn": CNN,
    "cnn_untied": lambda c, l, k, **kw: CNN(c, l, k, **kw).untie(),
    "gru": GRU,
    "deep": DeepCNN,
}


def build_model(name: str, channels: int, length: int, classes: int, seed: int, **kwargs) -> nn.Module:
    """Model ``name`` initialised from ``seed`` (the same seed gives the same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](channels, length, classes, **kwargs)


#: Rough cost of one training step relative to the CNN's, for progress and scheduling.
_STEP_COST = {"logistic": 0.1, "mlp": 0.5, "cnn": 1.0, "cnn_untied": 1.1, "gru": 6.0}


def step_cost(name: str, **kwargs) -> float:
    if name == "deep":
        return 0.4 + 0.45 * kwargs.get("depth", 6)
    return _STEP_COST[name]
