"""6c. GrOWL: train the MLP so that correlated inputs get equal weights, then prune and tie them."""

from __future__ import annotations

import copy
import time

import torch
from torch.nn import functional as F

from ...growl import GrOWL, growl_tie
from ...report import report
from ..context import PUBLISHED_STEPS, StudyContext
from ..data import Dataset
from ..jobs import Job, job
from ..models import build_model, step_cost
from ..section import Column, Figure, Section, Series
from ..train import LR, accuracy, fit
from .baselines import MODELS as BASELINES
from .baselines import model_job

TITLE = "Learned tying during training: GrOWL on the MLP"
QUESTION = (
    "GrOWL (ps.GrOWL, Zhang et al. 2018) penalises the MLP's input slices so that useless inputs go to zero "
    "and inputs that act alike get equal weights; ps.growl_tie then prunes the zeros and ties the equal "
    "slices to shared vectors. How many stored parameters does that save, at what accuracy, against the "
    "dense MLP and against pruning alone (the group Lasso)?"
)
LAMBDA1, LAMBDA2 = 0.5, 0.25  # "linear" OWL weights, from lambda1 + lambda2 down to lambda1
THRESHOLDS = (1.0, 0.9, 0.8, 0.7)  # 1.0 ties nothing: pruning only
FINETUNE = (1000, 200)  # (full, quick) steps after tying, at a tenth of the learning rate
LAYERS = ("net.0.weight", "net.2.weight", "net.4.weight")


def growl_mlp(data: Dataset, steps: int, seed: int, lambda1: float, lambda2: float, thresholds: list[float],
              finetune: int) -> dict:
    """A study job: train the baseline MLP with GrOWL on the input slices of its three weights, then
    ``growl_tie`` a copy of it at each threshold and fine-tune the shared vectors."""
    t0 = time.perf_counter()
    x, y, xt, yt = (torch.from_numpy(a) for a in data.arrays())
    net = build_model("mlp", data.channels, data.length, data.classes, seed)
    named = dict(net.named_parameters())
    reg = GrOWL([named[n] for n in LAYERS], lambda1=lambda1, lambda2=lambda2, kind="linear")
    # the proximal step of the penalty right after each optimizer step
    fit(net, lambda idx: F.cross_entropy(net(x[idx]), y[idx]), len(y), steps, seed + 1, after_step=lambda: reg.step(LR))
    out = {"trained_acc": accuracy(net, xt, yt), "zero_slices": reg.zero_slices(), "levels": []}
    for t in thresholds:
        m = copy.deepcopy(net)
        groups = {g.members[0]: g for g in growl_tie(m, names=list(LAYERS), threshold=t)}
        tied_acc = accuracy(m, xt, yt)
        if finetune:
            fit(m, lambda idx, m=m: F.cross_entropy(m(x[idx]), y[idx]), len(y), finetune, seed + 2, lr=LR / 10)
        layers = []
        for n in LAYERS:
            inputs = named[n].shape[1]
            g = groups.get(n)
            if g is None:
                layers.append([inputs, inputs, inputs])
            else:
                labels = g.options["labels"]
                layers.append([inputs, sum(1 for v in labels if v >= 0), max(labels) + 1])
        out["levels"].append({
            "threshold": t,
            "tied_acc": tied_acc,
            "test_acc": accuracy(m, xt, yt),
            "train_acc": accuracy(m, x, y),
            "stored_params": report(m).unique_params,
            "layers": layers,  # per weight: [inputs, inputs kept, shared vectors]
        })
    out["seconds"] = time.perf_counter() - t0
    return out


def _quick_steps() -> int:
    return dict((m, q) for m, _, q in BASELINES)["mlp"]


def _job(ctx: StudyContext, lambda2: float, thresholds: tuple) -> Job:
    steps = ctx.steps(PUBLISHED_STEPS, _quick_steps())
    finetune = ctx.steps(*FINETUNE)
    cost = step_cost("mlp") * (2 * steps + len(thresholds) * finetune)
    label = "MLP with GrOWL" if lambda2 else "MLP with the group Lasso"
    return job("paramshare.study.experiments.growl:growl_mlp", cost=cost, label=label, steps=steps, seed=ctx.seed,
               lambda1=LAMBDA1, lambda2=lambda2, thresholds=list(thresholds), finetune=finetune)


def _jobs(ctx: StudyContext) -> tuple[Job, Job, Job]:
    """(dense MLP, GrOWL, group Lasso), the last two tied at every threshold."""
    return model_job(ctx, "mlp", _quick_steps()), _job(ctx, LAMBDA2, THRESHOLDS), _job(ctx, 0.0, THRESHOLDS)


def jobs(ctx: StudyContext) -> list[Job]:
    return list(_jobs(ctx))


def _layers_text(layers: list) -> str:
    """'40->38->21, 100->95->40, ...': inputs -> kept -> shared vectors, per weight."""
    parts = []
    for n, kept, vectors in layers:
        parts.append(f"{n}" if kept == n and vectors == n else f"{n}->{kept}" if vectors == kept else f"{n}->{kept}->{vectors}")
    return ", ".join(parts)


def summarize(ctx: StudyContext, results: dict) -> Section:
    jd, jg, jl = _jobs(ctx)
    dense = results[jd.key]
    finetune = jg.kwargs["finetune"]
    rows = [{
        "model": "dense MLP (no penalty)", "stored_params": dense["stored_params"], "ratio": 1.0,
        "layers": _layers_text([[n, n, n] for n in _input_sizes(ctx)]), "tied_acc": None,
        "test_acc": dense["test_acc"], "train_acc": dense["train_acc"], "kind": "dense",
    }]
    for kind, name, j in (("growl", "GrOWL", jg), ("lasso", "group Lasso", jl)):
        for lv in results[j.key]["levels"]:
            what = "prune only" if lv["threshold"] >= 1.0 else f"tie at cosine >= {lv['threshold']:g}"
            rows.append({"model": f"{name}, {what}", "threshold": lv["threshold"], "kind": kind, **_row(lv, dense)})
    g_rows = [r for r in rows if r["kind"] == "growl"]
    l_rows = [r for r in rows if r["kind"] == "lasso"]
    close = [r for r in rows[1:] if r["test_acc"] >= dense["test_acc"] - 0.01]
    findings = []
    if close:
        best = min(close, key=lambda r: r["stored_params"])
        findings.append(
            f"{best['model']} stores {best['ratio']:.1f}x fewer parameters than the dense MLP "
            f"({best['stored_params']:,} vs {dense['stored_params']:,}) at {100 * best['test_acc']:.1f}% test accuracy "
            f"(dense {100 * dense['test_acc']:.1f}%): the smallest model here within one point of dense."
        )
    else:
        findings.append(f"No GrOWL or group-Lasso model here stays within one point of the dense MLP's "
                        f"{100 * dense['test_acc']:.1f}%.")
    prune = next(r for r in g_rows if r["threshold"] >= 1.0)
    smallest = min(g_rows, key=lambda r: r["stored_params"])
    findings.append(
        f"Tying on top of pruning: the GrOWL-trained MLP stores {prune['stored_params']:,} parameters pruned only "
        f"({100 * prune['test_acc']:.1f}%) and {smallest['stored_params']:,} with slices tied at cosine >= "
        f"{smallest['threshold']:g} ({100 * smallest['test_acc']:.1f}%; {100 * smallest['tied_acc']:.1f}% right after "
        "tying, before fine-tuning)."
    )
    g, l = min(((g, l) for g in g_rows for l in l_rows),
               key=lambda p: abs(p[0]["stored_params"] - p[1]["stored_params"]) / p[1]["stored_params"])
    diff = g["test_acc"] - l["test_acc"]
    n_test = ctx.data.meta()["test"]
    if abs(diff) < 0.025:
        verdict = f"no clear difference (one seed, {n_test:,} test examples: a point or two is noise)"
    elif diff > 0:
        verdict = f"GrOWL ahead by {100 * diff:.1f} points: its lambda2 term, which pulls slices to equal norms, pays off"
    else:
        verdict = f"the group Lasso ahead by {-100 * diff:.1f} points: here GrOWL's lambda2 term does not pay off"
    findings.append(
        f"At about the same stored size, GrOWL ({g['model'].split(', ', 1)[1]}) scores {100 * g['test_acc']:.1f}% "
        f"with {g['stored_params']:,} parameters and the group Lasso ({l['model'].split(', ', 1)[1]}) "
        f"{100 * l['test_acc']:.1f}% with {l['stored_params']:,}: {verdict}."
    )
    columns = [
        Column("model", "model"),
        Column("stored_params", "stored params", "int"),
        Column("ratio", "smaller by", "x"),
        Column("layers", "inputs per weight: all->kept->shared"),
        Column("tied_acc", "test acc, as tied", "pct"),
        Column("test_acc", f"test acc after {finetune} fine-tuning steps", "pct"),
        Column("train_acc", "train acc", "pct"),
    ]

    def labels(rs):
        return ["prune only" if r["threshold"] >= 1.0 else f"cos>={r['threshold']:g}" for r in rs]

    series = [
        Series("GrOWL, then growl_tie and fine-tuning", [r["stored_params"] for r in g_rows],
               [r["test_acc"] for r in g_rows], point_labels=labels(g_rows), color=0),
        Series("group Lasso, then growl_tie and fine-tuning", [r["stored_params"] for r in l_rows],
               [r["test_acc"] for r in l_rows], point_labels=labels(l_rows), color=1, marker="s", linestyle="--",
               label_offset=(-6, -6)),
        Series("dense MLP", [dense["stored_params"]], [dense["test_acc"]], marker="D", linestyle="", color=7),
    ]
    fig = Figure(
        file="growl.png",
        title=f"{ctx.data.title}: MLP trained with GrOWL or the group Lasso, pruned and tied",
        xlabel="stored parameters (log scale)",
        ylabel="test accuracy",
        series=series,
        logx=True,
        hlines=[(dense["test_acc"], f"dense MLP {100 * dense['test_acc']:.1f}%", "left")],
    )
    notes = [
        f"GrOWL with linear OWL weights (lambda1 {LAMBDA1:g}, lambda2 {LAMBDA2:g}; the group Lasso: lambda2 0) on the "
        f"input slices of all three weights (ps.GrOWL, a proximal step after every Adam step), "
        f"{jg.kwargs['steps']:,} training steps like the dense MLP; then ps.growl_tie on a copy per threshold (zero "
        "slices pruned, slices at cosine similarity >= the threshold with their cluster's leader tied to one shared "
        f"vector) and {finetune:,} fine-tuning steps at learning rate {LR / 10:g} (the dense MLP gets none). "
        "Stored parameters as ps.report counts them (a pruned hidden unit's incoming row and bias are still stored)."
    ]
    for r in rows:
        r.pop("kind")
    return Section("growl", TITLE, QUESTION, columns, rows, findings, [fig], notes)


def _row(lv: dict, dense: dict) -> dict:
    return {
        "stored_params": lv["stored_params"],
        "ratio": dense["stored_params"] / lv["stored_params"],
        "layers": _layers_text(lv["layers"]),
        "tied_acc": lv["tied_acc"],
        "test_acc": lv["test_acc"],
        "train_acc": lv["train_acc"],
    }


def _input_sizes(ctx: StudyContext) -> list[int]:
    d = ctx.data
    return [d.channels * d.length, 100, 100]
