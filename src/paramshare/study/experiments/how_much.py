"""4. How much to share: a deeper CNN with share_layers at several M and strategies."""

from __future__ import annotations

import statistics

from ..context import StudyContext
from ..jobs import Job, job
from ..models import step_cost
from ..section import Column, Figure, Section, Series, mean_over

DEPTH, WIDTH = 6, 24
TITLE = "How much to share: depth from reuse vs depth from parameters"
QUESTION = (
    f"A residual CNN of {DEPTH} identical convolution blocks ({WIDTH} channels) whose blocks share the parameters "
    "of only M of them (ps.share_layers), against unshared CNNs of depth M: the same stored parameters, "
    "with and without the extra depth that reuse gives. Where does sharing start to underfit?"
)
FULL_STEPS, QUICK_STEPS = 1500, 200
FULL_SEEDS, QUICK_SEEDS = 2, 1
UNIQUE = (1, 2, 3)
RELAX_RANK, TEMPLATES = 2, 2
TRAIN = "paramshare.study.train:train_classifier"


def _configs(ctx: StudyContext) -> list[dict]:
    """(label, kwargs) of every network in the sweep."""
    depths, unique = ((1, 2, DEPTH), (1, 2)) if ctx.quick else ((1, 2, 3, DEPTH), UNIQUE)
    out = [{"label": f"unshared, depth {d}", "family": "unshared", "depth": d, "unique": d, "strategy": "-"}
           for d in depths]
    strategies = ("cycle",) if ctx.quick else ("cycle", "sequence")
    for m in unique:
        for s in (("all",) if m == 1 else strategies):
            out.append({"label": f"{DEPTH} blocks, {m} unique ({s})", "family": s, "depth": DEPTH, "unique": m, "strategy": s})
    out.append({"label": f"{DEPTH} blocks, 1 shared + rank-{RELAX_RANK} deltas (relax)", "family": "relax",
                "depth": DEPTH, "unique": 1, "strategy": "all", "relax_rank": RELAX_RANK})
    out.append({"label": f"{DEPTH} blocks mixing {TEMPLATES} templates (template_share)", "family": "templates",
                "depth": DEPTH, "unique": TEMPLATES, "strategy": "-", "templates": TEMPLATES})
    return out


def _job(ctx: StudyContext, c: dict, seed: int) -> Job:
    steps = ctx.steps(FULL_STEPS, QUICK_STEPS)
    kw = {"depth": c["depth"], "width": WIDTH}
    if c["family"] == "templates":
        kw.update(templates=c["templates"])
    elif c["family"] != "unshared":
        kw.update(unique=c["unique"], strategy=c["strategy"])
    if c.get("relax_rank"):
        kw.update(relax_rank=c["relax_rank"])
    return job(TRAIN, cost=steps * step_cost("deep", depth=c["depth"]), label=c["label"], model="deep", steps=steps,
               seed=seed, **kw)


def jobs(ctx: StudyContext) -> list[Job]:
    seeds = ctx.seeds(FULL_SEEDS, QUICK_SEEDS)
    return [_job(ctx, c, s) for c in _configs(ctx) for s in seeds]


def summarize(ctx: StudyContext, results: dict) -> Section:
    seeds = ctx.seeds(FULL_SEEDS, QUICK_SEEDS)
    rows = []
    for c in _configs(ctx):
        rs = [results[_job(ctx, c, s).key] for s in seeds]
        rows.append({
            "network": c["label"],
            "family": c["family"],
            "applied": c["depth"],
            "unique": c["unique"],
            "stored_params": rs[0]["stored_params"],
            "used_params": rs[0]["used_params"],
            "train_acc": statistics.fmean(r["train_acc"] for r in rs),
            "test_acc": statistics.fmean(r["test_acc"] for r in rs),
        })
    unshared = {r["unique"]: r for r in rows if r["family"] == "unshared"}
    full = unshared[DEPTH]
    shared = {}
    for r in rows:
        if r["family"] in ("cycle", "all"):
            shared[r["unique"]] = r
    shared[DEPTH] = full
    findings = []
    gains = [f"M={m}: {100 * (shared[m]['test_acc'] - unshared[m]['test_acc']):+.1f}" for m in sorted(shared)
             if m in unshared and m != DEPTH]
    findings.append(
        f"At equal stored parameters, applying M unique blocks {DEPTH} times instead of once each changes test "
        f"accuracy by (points) " + ", ".join(gains) + "."
    )
    one = shared[1]
    findings.append(
        f"Sharing one block across all {DEPTH} ({one['stored_params']:,} stored parameters, "
        f"{full['stored_params'] / one['stored_params']:.1f}x fewer than unshared) gives "
        f"{100 * one['test_acc']:.1f}% test / {100 * one['train_acc']:.1f}% train accuracy, against "
        f"{100 * full['test_acc']:.1f}% / {100 * full['train_acc']:.1f}% unshared"
        + (": the train accuracy drop marks underfitting." if one["train_acc"] < full["train_acc"] - 0.02
           else "; train accuracy barely drops, so even full sharing does not underfit here.")
    )
    extra = {r["family"]: r for r in rows if r["family"] in ("relax", "templates")}
    if extra:
        findings.append(
            "Between the extremes: " + "; ".join(
                f"{r['network']} {100 * r['test_acc']:.1f}% with {r['stored_params']:,} stored" for r in extra.values())
            + f" (full sharing {100 * one['test_acc']:.1f}% with {one['stored_params']:,})."
        )
    best = max(rows, key=lambda r: r["test_acc"])
    findings.append(f"Best test accuracy: {best['network']} ({100 * best['test_acc']:.1f}%, {best['stored_params']:,} stored).")
    columns = [
        Column("network", "network"),
        Column("unique", "unique blocks", "int"),
        Column("stored_params", "stored params", "int"),
        Column("used_params", "used params", "int"),
        Column("train_acc", "train acc", "pct"),
        Column("test_acc", "test acc", "pct"),
    ]
    series = [Series("unshared: d blocks, each applied once", [unshared[d]["stored_params"] for d in sorted(unshared)],
                     [unshared[d]["test_acc"] for d in sorted(unshared)],
                     point_labels=[f"d={d}" for d in sorted(unshared)], color=7, marker="s", label_offset=(-6, 5))]
    for i, fam in enumerate(("cycle", "sequence")):
        pts = [r for r in rows if r["family"] in (fam, "all")]
        if len(pts) <= 1:
            continue
        pts = sorted(pts, key=lambda r: r["unique"]) + [full]
        series.append(Series(f"{DEPTH} blocks applied, sharing M unique blocks ({fam})", [r["stored_params"] for r in pts],
                             [r["test_acc"] for r in pts], point_labels=[f"M={r['unique']}" for r in pts] if i == 0 else None,
                             color=i, marker="o^"[i], linestyle="-" if i == 0 else "--", label_offset=(6, -6)))
    markers = {"relax": ("D", f"1 shared block + rank-{RELAX_RANK} deltas (relax)", 2),
               "templates": ("P", f"{TEMPLATES} templates mixed per block (template_share)", 3)}
    for fam, (marker, label, color) in markers.items():
        if fam in extra:
            r = extra[fam]
            series.append(Series(label, [r["stored_params"]], [r["test_acc"]], marker=marker, linestyle="", color=color))
    fig = Figure(
        file="sharing_frontier.png",
        title=f"{ctx.data.title}: how much to share (residual CNN, {DEPTH} blocks)",
        xlabel="stored parameters (log scale)",
        ylabel="test accuracy",
        series=series,
        logx=True,
    )
    steps = ctx.steps(FULL_STEPS, QUICK_STEPS)
    notes = [f"{steps} training steps per network; accuracies: {mean_over(len(seeds))}. "
             "'cycle' repeats blocks A B C A B C, 'sequence' A A B B C C, 'all' one block everywhere; "
             "relax gives each use of the shared block its own low-rank delta; template_share makes each "
             "block's filters a learned mix of a few shared templates (biases stay per block)."]
    for r in rows:
        r.pop("family")
    return Section("how_much", TITLE, QUESTION, columns, rows, findings, [fig], notes)
