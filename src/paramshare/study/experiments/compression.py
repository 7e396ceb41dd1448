"""6a. Clustering the trained CNN: how few distinct values its weights need (bits vs accuracy)."""

from __future__ import annotations

import copy
import time

import torch
from torch.nn import functional as F

from ...cluster import cluster
from ...report import report
from ..context import PUBLISHED_STEPS, StudyContext
from ..data import Dataset
from ..jobs import Job, job
from ..models import build_model
from ..section import Column, Figure, Section, Series
from ..train import accuracy, fit
from .baselines import MODELS as BASELINES

TITLE = "Learned sharing after training: clustering the CNN's weights"
QUESTION = (
    "Weight clustering (ps.cluster) makes each weight tensor share 2^bits values; how many bits does the "
    "trained CNN need before accuracy drops, with and without a short fine-tuning of the shared values?"
)
BITS = (1, 2, 3, 4, 6)
FINETUNE = (300, 50)  # (full, quick) steps


def cluster_cnn(data: Dataset, steps: int, seed: int, bits: list[int], finetune: int) -> dict:
    """A study job: train the baseline CNN, then cluster copies of it at each bit width."""
    t0 = time.perf_counter()
    x, y, xt, yt = (torch.from_numpy(a) for a in data.arrays())
    net = build_model("cnn", data.channels, data.length, data.classes, seed)
    fit(net, lambda idx: F.cross_entropy(net(x[idx]), y[idx]), len(y), steps, seed + 1)
    dense = report(net)
    out = {"dense_acc": accuracy(net, xt, yt), "dense_bytes": dense.unique_bytes, "levels": []}
    for b in bits:
        m = cluster(copy.deepcopy(net), bits=b, min_numel=100)
        acc = accuracy(m, xt, yt)
        r = report(m)
        if finetune:
            fit(m, lambda idx: F.cross_entropy(m(x[idx]), y[idx]), len(y), finetune, seed + 2, lr=1e-3)
        out["levels"].append({
            "bits": b,
            "test_acc": acc,
            "finetuned_acc": accuracy(m, xt, yt) if finetune else None,
            "stored_bytes": r.unique_bytes,
            "weights_clustered": sum(g.stats.uses for g in r.rows if g.group.kind == "codebook"),
        })
    out["seconds"] = time.perf_counter() - t0
    return out


def _job(ctx: StudyContext) -> Job:
    quick_steps = dict((m, q) for m, _, q in BASELINES)["cnn"]
    steps = ctx.steps(PUBLISHED_STEPS, quick_steps)
    finetune = ctx.steps(*FINETUNE)
    return job("paramshare.study.experiments.compression:cluster_cnn", cost=steps + len(BITS) * (finetune + 40),
               label="clustering the CNN", steps=steps, seed=ctx.seed, bits=list(BITS), finetune=finetune)


def jobs(ctx: StudyContext) -> list[Job]:
    return [_job(ctx)]


def summarize(ctx: StudyContext, results: dict) -> Section:
    j = _job(ctx)
    r = results[j.key]
    dense_bytes = r["dense_bytes"]
    rows = [{"weights": "float32 (trained CNN)", "bits": 32, "stored_bytes": dense_bytes, "ratio": 1.0,
             "test_acc": r["dense_acc"], "finetuned_acc": None}]
    for lv in r["levels"]:
        rows.append({
            "weights": f"{2 ** lv['bits']} shared values per tensor",
            "bits": lv["bits"],
            "stored_bytes": lv["stored_bytes"],
            "ratio": dense_bytes / lv["stored_bytes"],
            "test_acc": lv["test_acc"],
            "finetuned_acc": lv["finetuned_acc"],
        })
    finetune = j.kwargs["finetune"]
    ok = [row for row in rows[1:] if (row["finetuned_acc"] or row["test_acc"]) >= r["dense_acc"] - 0.01]
    fewest = min(ok, key=lambda row: row["bits"]) if ok else None
    findings = []
    if fewest:
        findings.append(
            f"{fewest['bits']} bits per weight ({2 ** fewest['bits']} shared values per tensor) keep the CNN within one "
            f"point of its {100 * r['dense_acc']:.1f}% after {finetune} fine-tuning steps, storing "
            f"{fewest['ratio']:.1f}x fewer bytes."
        )
    else:
        findings.append(f"No bit width tried keeps the CNN within one point of its {100 * r['dense_acc']:.1f}%.")
    low = rows[1]
    findings.append(
        f"At {low['bits']} bit the clustered CNN scores {100 * low['test_acc']:.1f}% as clustered and "
        f"{100 * (low['finetuned_acc'] or 0):.1f}% after fine-tuning the shared values"
        + (": that much sharing loses the function." if max(low["test_acc"], low["finetuned_acc"] or 0) < r["dense_acc"] - 0.1
           else ": even that much sharing holds up.")
    )
    columns = [
        Column("weights", "weights"),
        Column("bits", "bits/weight", "int"),
        Column("stored_bytes", "stored bytes", "int"),
        Column("ratio", "smaller by", "x"),
        Column("test_acc", "test acc, as clustered", "pct"),
        Column("finetuned_acc", f"after {finetune} fine-tuning steps", "pct"),
    ]
    lv = r["levels"]
    fig = Figure(
        file="clustering.png",
        title=f"{ctx.data.title}: CNN weights clustered to 2^bits shared values",
        xlabel="bits per weight",
        ylabel="test accuracy",
        series=[
            Series("as clustered", [v["bits"] for v in lv], [v["test_acc"] for v in lv], color=0),
            Series(f"after {finetune} fine-tuning steps", [v["bits"] for v in lv], [v["finetuned_acc"] for v in lv],
                   color=2, marker="s", linestyle="--"),
        ],
        hlines=[(r["dense_acc"], f"float32 CNN {100 * r['dense_acc']:.1f}%", "left")],
        ylim=(0, 1.02),
    )
    notes = ["Every weight tensor with at least 100 elements is clustered (ps.cluster, one codebook per tensor); "
             "stored bytes count centroids, labels at their packed width and the unclustered biases."]
    return Section("compression", TITLE, QUESTION, columns, rows, findings, [fig], notes)
