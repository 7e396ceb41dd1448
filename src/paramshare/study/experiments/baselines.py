"""1. The published MNIST-1D baselines, measured here."""

from __future__ import annotations

from ..context import PUBLISHED_STEPS, StudyContext
from ..jobs import Job, job
from ..models import step_cost
from ..section import Column, Figure, Section, Series

TITLE = "Baselines: published vs measured"
QUESTION = (
    "Does this machine reproduce the published MNIST-1D table (Greydanus 2020), where the CNN, "
    "which shares its filters across positions, beats an MLP with three times its parameters?"
)

#: (model, display name, quick steps)
MODELS = [
    ("logistic", "Logistic regression", 1000),
    ("mlp", "MLP", 1000),
    ("cnn", "CNN", 1000),
    ("gru", "GRU", 250),
]
TRAIN = "paramshare.study.train:train_classifier"


def model_job(ctx: StudyContext, model: str, quick_steps: int, seed: int | None = None, **kw) -> Job:
    """The run of ``model`` with the baseline budget (shared with other experiments by key)."""
    steps = ctx.steps(PUBLISHED_STEPS, quick_steps)
    seed = ctx.seed if seed is None else seed
    if not kw.get("shuffle", True):
        del kw["shuffle"]  # the default: the same run (and key) as without the argument
    label = f"{model}{' (shuffled)' if kw.get('shuffle') else ''}"
    return job(TRAIN, cost=steps * step_cost(model), label=label, model=model, steps=steps, seed=seed, **kw)


def jobs(ctx: StudyContext) -> list[Job]:
    return [model_job(ctx, m, q) for m, _, q in MODELS]


def summarize(ctx: StudyContext, results: dict) -> Section:
    rows = []
    for (m, name, q), j in zip(MODELS, jobs(ctx)):
        r = results[j.key]
        rows.append({
            "model": name,
            "stored_params": r["stored_params"],
            "steps": j.kwargs["steps"],
            "published_acc": ctx.published(m),
            "test_acc": r["test_acc"],
            "train_acc": r["train_acc"],
            "seconds": round(r["seconds"], 1),
        })
    by = {m: row for (m, _, _), row in zip(MODELS, rows)}
    findings = []
    cnn, mlp = by["cnn"], by["mlp"]
    ratio = mlp["stored_params"] / cnn["stored_params"]
    if cnn["test_acc"] > mlp["test_acc"]:
        findings.append(
            f"The CNN beats the MLP by {100 * (cnn['test_acc'] - mlp['test_acc']):.1f} points of test accuracy "
            f"while storing {ratio:.1f}x fewer parameters ({cnn['stored_params']:,} vs {mlp['stored_params']:,}): "
            "sharing filters across positions is the better use of parameters here."
        )
    else:
        findings.append(
            f"Here the CNN does not beat the MLP ({100 * cnn['test_acc']:.1f}% vs {100 * mlp['test_acc']:.1f}%), "
            "unlike the published table; see the step budget."
        )
    if ctx.data.published:
        gaps = [f"{row['model']} {100 * (row['test_acc'] - row['published_acc']):+.1f}" for row in rows]
        findings.append("Measured minus published, in points: " + ", ".join(gaps) + ".")
    if ctx.reduced:
        findings.append(
            f"Fewer steps than the published {PUBLISHED_STEPS} (see the steps column): accuracies are lower "
            "than a full run gives; the GRU, trained shortest, loses most."
        )
    columns = [
        Column("model", "model"),
        Column("stored_params", "stored params", "int"),
        Column("steps", "steps", "int"),
        Column("published_acc", "published", "pct"),
        Column("test_acc", "measured test acc", "pct"),
        Column("train_acc", "train acc", "pct"),
        Column("seconds", "seconds", "str"),
    ]
    cats = [row["model"].replace("Logistic regression", "Logistic") for row in rows]
    series = []
    if ctx.data.published:
        series.append(Series("published (Greydanus 2020, 6000 steps)", cats, [r["published_acc"] for r in rows],
                             filled=False, color=7))
    series.append(Series(f"measured here ({'reduced steps' if ctx.reduced else '6000 steps'})", cats,
                         [r["test_acc"] for r in rows], color=0))
    fig = Figure(
        file="baselines.png",
        title=f"{ctx.data.title}: test accuracy of the baselines",
        xlabel="model (stored parameters)",
        ylabel="test accuracy",
        series=series,
        kind="bars",
        categories=[f"{c}\n({r['stored_params']:,})" for c, r in zip(cats, rows)],
        ylim=(0, 1.08),
    )
    return Section("baselines", TITLE, QUESTION, columns, rows, findings, [fig])
