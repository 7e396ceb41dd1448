"""3. Limited data: accuracy vs training-set size, shared vs untied."""

from __future__ import annotations

import statistics

from ..context import PUBLISHED_STEPS, StudyContext
from ..jobs import Job, job
from ..models import step_cost
from ..section import Column, Figure, Section, Series
from .baselines import MODELS as BASELINES

TITLE = "Limited data: does sharing help more when data is scarce?"
QUESTION = (
    "Test accuracy against the size of the training set for the CNN (shared filters), the same CNN "
    "untied per position, and the MLP; mean and spread (standard deviation) over seeds, each seed "
    "also drawing its own class-balanced subset."
)

FRACTIONS = (0.1, 0.25, 0.5, 1.0)
MODELS = [("cnn", "CNN (shared)"), ("cnn_untied", "CNN untied"), ("mlp", "MLP")]
FULL_STEPS, QUICK_STEPS = 2000, 200
FULL_SEEDS, QUICK_SEEDS = 3, 2
TRAIN = "paramshare.study.train:train_classifier"


def _job(ctx: StudyContext, model: str, fraction: float, seed: int) -> Job:
    steps = ctx.steps(FULL_STEPS, QUICK_STEPS)
    return job(TRAIN, cost=steps * step_cost(model), label=f"{model} on {fraction:.0%} of the data",
               model=model, steps=steps, seed=seed, fraction=fraction)


def jobs(ctx: StudyContext) -> list[Job]:
    seeds = ctx.seeds(FULL_SEEDS, QUICK_SEEDS)
    return [_job(ctx, m, f, s) for f in FRACTIONS for m, _ in MODELS for s in seeds]


def _mean_std(values: list[float]) -> list[float]:
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None]


def summarize(ctx: StudyContext, results: dict) -> Section:
    seeds = ctx.seeds(FULL_SEEDS, QUICK_SEEDS)
    rows, curves = [], {m: [] for m, _ in MODELS}
    for f in FRACTIONS:
        row = {"fraction": f"{f:.0%}"}
        for m, _ in MODELS:
            rs = [results[_job(ctx, m, f, s).key] for s in seeds]
            row["train_size"] = rs[0]["train_size"]
            row[m] = _mean_std([r["test_acc"] for r in rs])
            curves[m].append((rs[0]["train_size"], *row[m]))
        row["gap"] = row["cnn"][0] - row["cnn_untied"][0]
        rows.append(row)
    small, full = rows[0], rows[-1]
    gaps = [r["gap"] for r in rows]
    widest = max(rows, key=lambda r: r["gap"])
    ahead = sum(g > 0 for g in gaps)
    lead = (f"The shared CNN leads its untied twin at {'every size' if ahead == len(rows) else f'{ahead} of {len(rows)} sizes'}: "
            + ", ".join(f"{100 * r['gap']:+.1f}" for r in rows) + " points with "
            + ", ".join(f"{r['train_size']:,}" for r in rows) + " examples. ")
    if widest is small:
        lead += "The lead is widest with the least data: sharing helps most when data is scarce."
    else:
        lead += (f"The lead is widest with {widest['train_size']:,} examples, not with the fewest "
                 f"({100 * small['gap']:+.1f} points at {small['train_size']:,}): here sharing does not help most "
                 "when data is scarcest.")
    steps = ctx.steps(FULL_STEPS, QUICK_STEPS)
    base_steps = ctx.steps(PUBLISHED_STEPS, dict((m, q) for m, _, q in BASELINES)["cnn"])
    findings = [
        lead,
        f"With {small['fraction']} of the data the CNN reaches {100 * small['cnn'][0]:.1f}%, "
        f"{'above' if small['cnn'][0] > full['mlp'][0] else 'below'} the MLP trained on all of it ({100 * full['mlp'][0]:.1f}%).",
    ]
    if steps < base_steps:
        findings.append(
            f"Every run here trains for {steps:,} steps (batch 100: {steps * 100 / full['train_size']:.1f} passes over "
            f"the full set), fewer than the baselines' {base_steps:,}, so the 100% column is below section 1's "
            "accuracies: compare the curves with one another."
        )
    columns = [Column("fraction", "train fraction"), Column("train_size", "examples", "int")]
    columns += [Column(m, name, "pct_pm") for m, name in MODELS]
    columns.append(Column("gap", "shared - untied", "pts"))
    series = [
        Series(name, [c[0] for c in curves[m]], [c[1] for c in curves[m]],
               err=[c[2] for c in curves[m]] if len(seeds) > 1 else None, color=i,
               marker="os^"[i])
        for i, (m, name) in enumerate(MODELS)
    ]
    fig = Figure(
        file="accuracy_vs_train_size.png",
        title=f"{ctx.data.title}: test accuracy vs training-set size (mean +- std over {len(seeds)} seeds)",
        xlabel=f"training examples (log scale; {steps} steps each)",
        ylabel="test accuracy",
        series=series,
        logx=True,
        xticks=[c[0] for c in curves[MODELS[0][0]]],
    )
    notes = [f"{steps} training steps for every size and model; {len(seeds)} seeds."]
    return Section("limited_data", TITLE, QUESTION, columns, rows, findings, [fig], notes)
