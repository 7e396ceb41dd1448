"""What does sharing through paramshare cost against the same sharing written by hand?

1. A 12-block transformer encoder (d=256) trained on random tokens, three ways, alternating in
   one run: independent blocks; blocks shared with ``ps.share_layers(strategy="all")``; one
   block module called 12 times by hand. Prints the step-time ratios and the parameter +
   optimizer-state bytes (paramshare's must equal the hand-written's exactly).
2. A tied autoencoder step: ``ps.tie(..., transpose=True)`` against ``F.linear(x, W.t())``.

Goals: shared-by-paramshare / hand-written step time <= 1.02; tied autoencoder <= 1.05.

Usage: python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import header  # noqa: E402

import paramshare as ps  # noqa: E402

D, HEADS, FF, BLOCKS, VOCAB, SEQ, BATCH = 256, 4, 1024, 12, 1000, 64, 16


def block() -> nn.Module:
    return nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=True)


class Encoder(nn.Module):
    """Embedding, a stack of blocks, and an output layer; ``hand`` calls one block N times."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.mode = mode
        if mode == "hand":
            self.block = block()
        else:
            first = block()
            self.blocks = nn.ModuleList([first] + [block() for _ in range(BLOCKS - 1)])
            if mode == "paramshare":
                ps.share_layers(self.blocks, unique=1, strategy="all")
        torch.manual_seed(1)  # the same head whatever the stack consumed from the generator
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens)
        if self.mode == "hand":
            for _ in range(BLOCKS):
                x = self.block(x)
        else:
            for b in self.blocks:
                x = b(x)
        return self.head(x)


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(
        v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
    )
    return params + state


def make_step(model, opt, batch):
    tokens, target = batch

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), target.flatten())
        loss.backward()
        opt.step()

    return step


def time_alternating(steps: dict, rounds: int, per_round: int) -> dict[str, float]:
    """Median seconds per step for each contender, measured in interleaved rounds."""
    samples = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        fn()
        fn()
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for k in order:
            t0 = time.perf_counter()
            for _ in range(per_round):
                steps[k]()
            samples[k].append((time.perf_counter() - t0) / per_round)
    return {k: statistics.median(v) for k, v in samples.items()}


class TiedAE(nn.Module):
    def __init__(self, sizes=(784, 512, 128)):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dec = nn.ModuleList(nn.Linear(b, a) for a, b in reversed(list(zip(sizes, sizes[1:]))))
        n = len(self.enc)
        for i in range(n):
            ps.tie(self, f"enc.{i}.weight", f"dec.{n - 1 - i}.weight", transpose=True)

    def forward(self, x):
        for layer in self.enc:
            x = torch.relu(layer(x))
        for i, layer in enumerate(self.dec):
            x = layer(x)
            x = torch.relu(x) if i < len(self.dec) - 1 else x
        return x


class HandAE(nn.Module):
    def __init__(self, sizes=(784, 512, 128)):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.dec_bias = nn.ParameterList(nn.Parameter(torch.zeros(a)) for a in reversed(sizes[:-1]))

    def forward(self, x):
        for layer in self.enc:
            x = torch.relu(layer(x))
        n = len(self.enc)
        for i in range(n):
            x = F.linear(x, self.enc[n - 1 - i].weight.t(), self.dec_bias[i])
            x = torch.relu(x) if i < n - 1 else x
        return x


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rounds, per_round = (3, 2) if args.quick else (11, 5)

    header("Cross-layer sharing: 12-block transformer encoder, d=256, AdamW")
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen), torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen))
    models = {k: Encoder(k) for k in ("independent", "paramshare", "hand")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    steps = {k: make_step(models[k], opts[k], batch) for k in models}
    times = time_alternating(steps, rounds, per_round)
    nbytes = {k: state_bytes(models[k], opts[k]) for k in models}
    with torch.no_grad():
        same = torch.allclose(models["paramshare"](batch[0]), models["hand"](batch[0]), atol=1e-4)
    print(f"{'':<14}{'step (ms)':>10}{'vs hand':>10}{'params + optimizer state':>28}")
    for k in models:
        print(f"{k:<14}{times[k] * 1e3:>10.1f}{times[k] / times['hand']:>10.3f}{nbytes[k]:>22,} B")
    ratio = times["paramshare"] / times["hand"]
    print(f"\nshare_layers / hand-written step time: {ratio:.3f}  (goal <= 1.02: {'met' if ratio <= 1.02 else 'NOT met'})")
    print(f"bytes paramshare == hand-written: {nbytes['paramshare'] == nbytes['hand']} "
          f"({nbytes['paramshare']:,} B; independent blocks {nbytes['independent'] / nbytes['hand']:.2f}x)")
    print(f"outputs of paramshare and hand-written models agree after training: {same}")

    header("Tied autoencoder 784-512-128: ps.tie(transpose=True) vs F.linear(x, W.t())")
    x = torch.randn(256, 784, generator=gen)
    ae = {"paramshare": TiedAE(), "hand": HandAE()}
    with torch.no_grad():
        for i, layer in enumerate(ae["hand"].enc):
            layer.weight.copy_(ae["paramshare"].enc[i].weight)
            layer.bias.copy_(ae["paramshare"].enc[i].bias)
        for i, layer in enumerate(ae["paramshare"].dec):
            layer.bias.zero_()
    aopts = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in ae.items()}

    def ae_step(k):
        def step():
            aopts[k].zero_grad(set_to_none=True)
            F.mse_loss(ae[k](x), x).backward()
            aopts[k].step()
        return step

    times = time_alternating({k: ae_step(k) for k in ae}, rounds * 3, per_round * 4)
    nb = {k: state_bytes(ae[k], aopts[k]) for k in ae}
    print(f"{'':<14}{'step (ms)':>10}{'vs hand':>10}{'params + optimizer state':>28}")
    for k in ae:
        print(f"{k:<14}{times[k] * 1e3:>10.2f}{times[k] / times['hand']:>10.3f}{nb[k]:>22,} B")
    ratio = times["paramshare"] / times["hand"]
    print(f"\ntranspose tie / hand-written step time: {ratio:.3f}  (goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    print(f"bytes equal: {nb['paramshare'] == nb['hand']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
