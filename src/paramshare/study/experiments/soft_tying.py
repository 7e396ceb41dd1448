"""6b. Soft tying two related tasks: no sharing, a penalty pulling the weights together, hard sharing."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...soft import soft_tie
from ...tying import tie_modules
from ..context import StudyContext
from ..data import Dataset
from ..jobs import Job, job
from ..models import build_model
from ..section import Column, Figure, Section, Series, mean_over
from ..train import accuracy, batches, param_counts

TITLE = "Soft tying two related tasks"
QUESTION = (
    "Two CNNs, one for digits 0-4 and one for digits 5-9, each with few labels: trained apart, with "
    "their convolutions pulled together by a penalty (ps.soft_tie), or with one set of convolutions "
    "(ps.tie_modules). Does the other task's data help through the tie?"
)
FRACTION = 0.1  # of each task's training examples
STRENGTHS = (0.1, 1.0)
STEPS = (1500, 250)
SEEDS = (2, 1)


def _task(data: Dataset, digits: range, fraction: float, seed: int):
    x, y, xt, yt = data.arrays(fraction, subset_seed=seed)
    keep, keep_t = np.isin(y, digits), np.isin(yt, digits)
    lo = digits.start
    return (torch.from_numpy(x[keep]), torch.from_numpy(y[keep] - lo),
            torch.from_numpy(xt[keep_t]), torch.from_numpy(yt[keep_t] - lo))


def train_two_tasks(data: Dataset, mode: str, strength: float, steps: int, seed: int, fraction: float) -> dict:
    """A study job: train the two task CNNs jointly, ``mode`` ``"apart"``, ``"soft"`` or ``"hard"``."""
    t0 = time.perf_counter()
    tasks = [_task(data, range(0, 5), fraction, seed), _task(data, range(5, 10), fraction, seed)]
    pair = nn.ModuleDict({
        "a": build_model("cnn", data.channels, data.length, 5, seed),
        "b": build_model("cnn", data.channels, data.length, 5, seed + 1000),
    })
    penalty = None
    if mode == "hard":
        tie_modules(pair, "a.convs", "b.convs")
    elif mode == "soft" and strength > 0:
        penalty = soft_tie(pair["a"], pair["b"], names="convs.*", strength=strength)
    opt = torch.optim.Adam(pair.parameters(), lr=1e-2)
    pair.train()
    streams = [batches(len(t[1]), 100, steps, seed + 1 + i) for i, t in enumerate(tasks)]
    for ia, ib in zip(*streams):
        loss = sum(F.cross_entropy(pair[k](t[0][i]), t[1][i]) for k, t, i in zip("ab", tasks, (ia, ib)))
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accs = [accuracy(pair[k], t[2], t[3]) for k, t in zip("ab", tasks)]
    return {"test_acc": statistics.fmean(accs), "task_accs": accs, "train_sizes": [len(t[1]) for t in tasks],
            **param_counts(pair), "seconds": time.perf_counter() - t0}


def _variants(ctx: StudyContext):
    out = [("apart", 0.0, "two CNNs trained apart")]
    strengths = STRENGTHS[-1:] if ctx.quick else STRENGTHS
    out += [("soft", s, f"soft tie of the convolutions, strength {s:g}") for s in strengths]
    out.append(("hard", 0.0, "convolutions shared (tie_modules)"))
    return out


def _job(ctx: StudyContext, mode: str, strength: float, seed: int) -> Job:
    steps = ctx.steps(*STEPS)
    return job("paramshare.study.experiments.soft_tying:train_two_tasks", cost=2 * steps, label=f"two tasks, {mode}",
               mode=mode, strength=strength, steps=steps, seed=seed, fraction=FRACTION)


def jobs(ctx: StudyContext) -> list[Job]:
    return [_job(ctx, m, s, seed) for m, s, _ in _variants(ctx) for seed in ctx.seeds(*SEEDS)]


def summarize(ctx: StudyContext, results: dict) -> Section:
    seeds = ctx.seeds(*SEEDS)
    rows = []
    for mode, strength, label in _variants(ctx):
        rs = [results[_job(ctx, mode, strength, s).key] for s in seeds]
        accs = [r["test_acc"] for r in rs]
        rows.append({
            "setup": label,
            "mode": mode,
            "strength": strength,
            "stored_params": rs[0]["stored_params"],
            "test_acc": [statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else None],
            "task_a": statistics.fmean(r["task_accs"][0] for r in rs),
            "task_b": statistics.fmean(r["task_accs"][1] for r in rs),
            "train_size": sum(rs[0]["train_sizes"]),
        })
    apart = rows[0]
    best = max(rows[1:], key=lambda r: r["test_acc"][0])
    gain = best["test_acc"][0] - apart["test_acc"][0]
    findings = [
        f"With {apart['train_size']:,} labelled examples split over the two tasks, the best tie ({best['setup']}) "
        f"reaches {100 * best['test_acc'][0]:.1f}% mean test accuracy against {100 * apart['test_acc'][0]:.1f}% apart "
        f"({100 * gain:+.1f} points)" + (": the related task's data helps through the tie." if gain > 0.005
                                          else ": here the tie does not help."),
        "A soft tie stores both models in full and only costs a penalty in the loss; hard sharing stores the "
        f"convolutions once ({rows[-1]['stored_params']:,} vs {apart['stored_params']:,} parameters).",
    ]
    columns = [
        Column("setup", "setup"),
        Column("stored_params", "stored params", "int"),
        Column("task_a", "digits 0-4", "pct"),
        Column("task_b", "digits 5-9", "pct"),
        Column("test_acc", "mean test acc", "pct_pm"),
    ]
    labels = ["apart"] + [f"soft {r['strength']:g}" for r in rows if r["mode"] == "soft"] + ["hard"]
    fig = Figure(
        file="soft_tying.png",
        title=f"{ctx.data.title}: two related tasks, {FRACTION:.0%} of the labels each",
        xlabel="how the two CNNs' convolutions are tied (stored parameters)",
        ylabel="mean test accuracy of the two tasks",
        series=[Series(mean_over(len(seeds)), labels, [r["test_acc"][0] for r in rows],
                       err=[r["test_acc"][1] for r in rows] if len(seeds) > 1 else None, color=0)],
        kind="bars",
        categories=[f"{lab}\n({r['stored_params']:,} stored)" for lab, r in zip(labels, rows)],
        ylim=(0, 1.05),
    )
    notes = [f"{ctx.steps(*STEPS)} steps, each on one batch of each task; soft tie: squared L2 distance between "
             "the two CNNs' convolution weights and biases, times the strength."]
    for r in rows:
        r.pop("mode")
    return Section("soft_tying", TITLE, QUESTION, columns, rows, findings, [fig], notes)
