"""2. Spatial sharing vs independent parameters, on ordered and on shuffled positions."""

from __future__ import annotations

from ..context import StudyContext
from ..jobs import Job
from ..section import Column, Figure, Section, Series
from .baselines import MODELS as BASELINES
from .baselines import model_job

TITLE = "Spatial sharing vs independent parameters"
QUESTION = (
    "Is it the sharing that makes the CNN good? The same architecture with every filter untied per "
    "position (ps.nn.LocallyConnected1d) and the MLP, on the signals and on the signals with "
    "their positions shuffled, where a convolution's assumption fails (published CNN: 56%)."
)

QUICK = {m: q for m, _, q in BASELINES}
QUICK["cnn_untied"] = QUICK["cnn"]
#: (model, display name)
MODELS = [
    ("cnn", "CNN (filters shared across positions)"),
    ("cnn_untied", "CNN untied (LocallyConnected1d)"),
    ("mlp", "MLP (no notion of position)"),
]


def jobs(ctx: StudyContext) -> list[Job]:
    return [model_job(ctx, m, QUICK[m], shuffle=s) for m, _ in MODELS for s in (False, True)]


def summarize(ctx: StudyContext, results: dict) -> Section:
    rows = []
    for m, name in MODELS:
        a = results[model_job(ctx, m, QUICK[m], shuffle=False).key]
        b = results[model_job(ctx, m, QUICK[m], shuffle=True).key]
        rows.append({
            "model": name,
            "key": m,
            "stored_params": a["stored_params"],
            "steps": model_job(ctx, m, QUICK[m]).kwargs["steps"],
            "test_acc": a["test_acc"],
            "train_acc": a["train_acc"],
            "shuffled_acc": b["test_acc"],
            "drop": b["test_acc"] - a["test_acc"],
            "published": ctx.published(m),
            "published_shuffled": ctx.published(f"{m}_shuffled"),
        })
    by = {r["key"]: r for r in rows}
    cnn, lc, mlp = by["cnn"], by["cnn_untied"], by["mlp"]
    findings = [
        f"Untying the CNN's filters multiplies its parameters by {lc['stored_params'] / cnn['stored_params']:.1f}x "
        f"({cnn['stored_params']:,} -> {lc['stored_params']:,}) and changes test accuracy by "
        f"{100 * (lc['test_acc'] - cnn['test_acc']):+.1f} points ({100 * cnn['test_acc']:.1f}% -> {100 * lc['test_acc']:.1f}%); "
        f"it fits the training set to {100 * lc['train_acc']:.1f}% (CNN {100 * cnn['train_acc']:.1f}%).",
        f"Shuffling the positions changes test accuracy by {100 * cnn['drop']:+.1f} points for the CNN, "
        f"{100 * lc['drop']:+.1f} for the untied CNN and {100 * mlp['drop']:+.1f} for the MLP, which has no notion "
        "of position: sharing filters across positions pays only while neighbouring positions belong together.",
    ]
    if cnn["published_shuffled"] is not None:
        findings.append(
            f"Published CNN on shuffled MNIST-1D: {100 * cnn['published_shuffled']:.0f}%; measured "
            f"{100 * cnn['shuffled_acc']:.1f}%."
        )
    columns = [
        Column("model", "model"),
        Column("stored_params", "stored params", "int"),
        Column("test_acc", "test acc", "pct"),
        Column("shuffled_acc", "shuffled positions", "pct"),
        Column("drop", "change", "pts"),
        Column("train_acc", "train acc", "pct"),
    ]
    if ctx.data.published:
        columns.insert(4, Column("published_shuffled", "published shuffled", "pct"))
    # accuracy vs stored parameters, every classifier of the study's first two sections
    base_rows = []
    for m, name, q in BASELINES:
        if m in ("logistic", "gru"):
            r = results.get(model_job(ctx, m, q).key)
            if r is not None:
                base_rows.append((name.replace("Logistic regression", "logistic"), r))
    short = {"cnn": "CNN", "cnn_untied": "CNN untied", "mlp": "MLP"}
    pts = [(short[r["key"]], r["stored_params"], r["test_acc"], r["shuffled_acc"]) for r in rows]
    pts += [(n, r["stored_params"], r["test_acc"], None) for n, r in base_rows]
    pts.sort(key=lambda p: p[1])
    series = [
        Series("ordered positions", [p[1] for p in pts], [p[2] for p in pts], point_labels=[p[0] for p in pts],
               linestyle="", color=0),
        Series("shuffled positions", [p[1] for p in pts if p[3] is not None], [p[3] for p in pts if p[3] is not None],
               point_labels=[p[0] for p in pts if p[3] is not None], linestyle="", filled=False, color=1, marker="s",
               label_offset=(-6, 4)),
    ]
    arrows = [(p[1], p[2], p[1], p[3]) for p in pts if p[3] is not None]
    hlines = []
    if cnn["published"] is not None:
        hlines = [(cnn["published"], "published CNN 94%"), (cnn["published_shuffled"], "published CNN, shuffled 56%")]
    fig = Figure(
        file="accuracy_vs_params.png",
        title=f"{ctx.data.title}: test accuracy vs stored parameters",
        xlabel="stored parameters (log scale)",
        ylabel="test accuracy",
        series=series,
        logx=True,
        ylim=(0, 1.02),
        hlines=hlines,
        arrows=arrows,
    )
    for r in rows:
        r.pop("key")
    return Section("spatial", TITLE, QUESTION, columns, rows, findings, [fig])
