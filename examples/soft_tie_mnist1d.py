"""Soft tying between two related tasks on MNIST-1D, with little data for the second task.

Task A is standard MNIST-1D (4000 training sequences). Task B has the same ten classes but a
different generator (more shear, more noise, another template scale), and only a few
examples (200 or 500). Ways to learn B, all with the same small CNN and training budget:

* independent: a model trained on B alone;
* task A only: a model trained on A alone, applied to B (how far plain transfer goes);
* pooled: one model trained on A and B together (the limit of an infinitely strong tie);
* hard-shared trunk: ``ps.nn.MultiTask`` with one convolutional trunk and a head per task,
  trained on A and B together;
* soft-tied: two full models, one per task, trained together with
  ``ps.soft_tie(model_a, model_b, strength=s)`` added to the loss (a sweep over ``s``; and
  the convolutions only, ``names="conv*"``).

Runs are spread over two worker processes (one thread each).

Test accuracy on B, mean and spread (standard deviation) over 3 seeds.

Run: ``.venv/bin/python examples/soft_tie_mnist1d.py`` (a few minutes on 2 cores;
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


class CNN(nn.Module):
    """A small 1-D CNN for MNIST-1D: three convolutions and a linear classifier."""

    def __init__(self, channels: int = 32, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, classes)

    def features(self, x):
        x = F.relu(self.conv1(x.unsqueeze(1)))
        x = F.relu(self.conv2(x))
        return F.relu(self.conv3(x)).flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


class Trunk(nn.Module):
    """The convolutions of :class:`CNN`, shared by both tasks in the hard-shared model."""

    def __init__(self, channels: int = 32):
        super().__init__()
        self.cnn = CNN(channels)
        del self.cnn.fc

    def forward(self, x):
        return self.cnn.features(x)


#: Task B's generator: standard MNIST-1D is shear 0.75, i.i.d. noise 0.02, correlated noise 0.25,
#: scale 0.4. "strong": a related but clearly different task; "mild": a noisier task A.
SHIFTS = {
    "strong": {"shear_scale": 1.5, "iid_noise_scale": 0.1, "corr_noise_scale": 0.4, "scale_coeff": 0.6},
    "mild": {"shear_scale": 1.2, "iid_noise_scale": 0.05, "corr_noise_scale": 0.35, "scale_coeff": 0.5},
}


def make_tasks(shift: str = "strong", seed: int = 0):
    """(task A train, task B train pool, task B test) as float tensors."""
    from mnist1d.data import get_dataset_args, make_dataset

    args_a = get_dataset_args()
    args_a.seed = 42 + seed
    a = make_dataset(args_a)
    args_b = get_dataset_args()
    args_b.num_samples, args_b.train_split, args_b.seed = 2000, 0.5, 1042 + seed
    for k, v in SHIFTS[shift].items():
        setattr(args_b, k, v)
    b = make_dataset(args_b)

    def t(x, y):
        return torch.tensor(np.asarray(x), dtype=torch.float32), torch.tensor(np.asarray(y), dtype=torch.long)

    return t(a["x"], a["y"]), t(b["x"], b["y"]), t(b["x_test"], b["y_test"])


def batches(n: int, batch: int, gen: torch.Generator):
    """Endless random mini-batch indices over ``n`` examples."""
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[i : i + batch]


@torch.no_grad()
def accuracy(fn, x, y) -> float:
    return (fn(x).argmax(1) == y).float().mean().item() * 100


def train(method: str, strength: float, data, n_b: int, seed: int, steps: int, channels: int) -> float:
    """Train one configuration and return its test accuracy on task B."""
    (xa, ya), (xb_all, yb_all), (xt, yt) = data
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(xb_all), generator=g)[:n_b]
    xb, yb = xb_all[pick], yb_all[pick]
    torch.manual_seed(seed)
    it_a, it_b = batches(len(xa), 100, g), batches(n_b, min(100, n_b), g)
    if method in ("independent", "a-only", "pooled"):
        model = CNN(channels)
        params, predict_b = list(model.parameters()), model
    elif method == "hard":
        model = ps.nn.MultiTask(Trunk(channels), {"a": nn.Linear(channels * 5, 10), "b": nn.Linear(channels * 5, 10)})
        params, predict_b = list(model.parameters()), (lambda x: model(x, "b"))
    else:
        model_a, model_b = CNN(channels), CNN(channels)
        model_b.load_state_dict(model_a.state_dict())  # a common start, as one would for related tasks
        names = "conv*" if method == "soft-conv" else None
        soft = ps.soft_tie(model_a, model_b, names=names, strength=strength)
        params, predict_b = list(model_a.parameters()) + list(model_b.parameters()), model_b
    opt = torch.optim.Adam(params, lr=3e-3)
    for _ in range(steps):
        ib = next(it_b)
        if method == "independent":
            loss = F.cross_entropy(model(xb[ib]), yb[ib])
        elif method == "a-only":
            ia = next(it_a)
            loss = F.cross_entropy(model(xa[ia]), ya[ia])
        elif method == "pooled":
            ia = next(it_a)
            loss = F.cross_entropy(model(xa[ia]), ya[ia]) + F.cross_entropy(model(xb[ib]), yb[ib])
        elif method == "hard":
            ia = next(it_a)
            out = model({"a": xa[ia], "b": xb[ib]})
            loss = F.cross_entropy(out["a"], ya[ia]) + F.cross_entropy(out["b"], yb[ib])
        else:
            ia = next(it_a)
            loss = F.cross_entropy(model_a(xa[ia]), ya[ia]) + F.cross_entropy(model_b(xb[ib]), yb[ib]) + soft()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return accuracy(predict_b, xt, yt)


_DATA = None


def _init_worker(data) -> None:
    global _DATA
    torch.set_num_threads(1)
    _DATA = data


def _run(job) -> float:
    method, strength, n_b, seed, steps, channels = job
    return train(method, strength, _DATA, n_b, seed, steps, channels)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, few steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 800)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--shift", choices=sorted(SHIFTS), default="strong", help="how different task B is (default strong)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small models: one thread per process is fastest
    steps = args.steps or (60 if args.quick else 800)
    seeds = args.seeds or (1 if args.quick else 3)
    sizes = (200, 500)
    channels = 32
    t0 = time.perf_counter()
    data = make_tasks(args.shift)
    print(f"MNIST-1D: task A {len(data[0][0])} training examples; task B ({args.shift} shift: {SHIFTS[args.shift]}) "
          f"test {len(data[2][0])} "
          f"(data made in {time.perf_counter() - t0:.0f}s); CNN with {sum(p.numel() for p in CNN(channels).parameters()):,} "
          f"parameters, {steps} Adam steps, {seeds} seed(s)", flush=True)
    configs = [("independent (B only)", "independent", 0.0), ("task A only, applied to B", "a-only", 0.0),
               ("pooled: one model on A and B", "pooled", 0.0), ("hard-shared trunk (MultiTask)", "hard", 0.0)]
    configs += [(f"soft-tied, all layers, s={s:g}", "soft", s) for s in (1e-2, 1e-1, 1.0, 10.0)]
    configs += [("soft-tied, convolutions only, s=1", "soft-conv", 1.0)]
    if args.quick:
        configs = configs[:1] + configs[6:7]
    jobs = {}
    for label, method, s in configs:
        for n_b in sizes:
            for seed in range(seeds):
                if method == "a-only" and n_b != sizes[0]:  # uses no B data: one run serves every size
                    continue
                jobs[(label, n_b, seed)] = (method, s, n_b, seed, steps, channels)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker, initargs=(data,)) as pool:
        futures = {k: pool.submit(_run, job) for k, job in jobs.items()}
        results = {k: f.result() for k, f in futures.items()}
    rows = []
    for label, _, _ in configs:
        cells = []
        for n_b in sizes:
            accs = [results.get((label, n_b, seed), results.get((label, sizes[0], seed))) for seed in range(seeds)]
            cells.append((statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0))
        rows.append((label, cells))
    print(f"\nTest accuracy on task B (%), mean +- std over {seeds} seed(s)")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'method':<{width}}" + "".join(f"{f'{n} B examples':>18}" for n in sizes))
    for label, cells in rows:
        print(f"{label:<{width}}" + "".join(f"{f'{m:.1f} +- {sd:.1f}':>18}" for m, sd in cells))
    indep = rows[0][1]
    soft_rows = [r for r in rows if r[0].startswith("soft")]
    for j, n in enumerate(sizes):
        best = max(soft_rows, key=lambda r: r[1][j][0])
        gain = best[1][j][0] - indep[j][0]
        print(f"best soft tie at {n} B examples: {best[0]}: {gain:+.1f} points over independent")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
