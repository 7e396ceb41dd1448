"""5. Siamese verification with shared vs unshared twins; tied vs untied autoencoders."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn
from torch.nn import functional as F

from ... import nn as psnn
from ...tying import untie
from ..context import StudyContext
from ..data import Dataset
from ..jobs import Job, job
from ..models import conv_length
from ..section import Column, Figure, Section, Series, seeds_words
from ..train import fit, param_counts

TITLE = "Siamese twins and tied autoencoders"
QUESTION = (
    "Same-or-different-digit verification with one encoder applied to both inputs (ps.nn.Siamese) "
    "against two independent encoders; and an autoencoder whose decoder is its encoder transposed "
    "(ps.nn.TiedAutoencoder) against untied ones with the same and with about double the parameters."
)
SIAMESE_STEPS = (2000, 300)  # (full, quick)
SIAMESE_SEEDS = (2, 1)
AE_STEPS = (3000, 400)
AE_SEEDS = (3, 1)
AE_HIDDEN = (8, 16, 32, 64)
AE_CODE = 8
EVAL_PAIRS = 2000


# ---- Siamese ----------------------------------------------------------------------------------
class PairHead(nn.Module):
    """Same-or-different logit from two embeddings, symmetric in them: MLP([|e1-e2|, e1*e2])."""

    def __init__(self, dim: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, e1, e2):
        return self.net(torch.cat([(e1 - e2).abs(), e1 * e2], dim=-1)).squeeze(-1)


def _encoder(channels: int, length: int, width: int = 16, dim: int = 32) -> nn.Module:
    l1 = conv_length(length, 5, 2, 1)
    l2 = conv_length(l1, 3, 2, 1)
    return nn.Sequential(
        nn.Conv1d(channels, width, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * l2, dim),
    )


def _pairs(y: torch.Tensor, n: int, classes: int, g: torch.Generator):
    """``n`` index pairs, the first half of the same class, the second half of different classes."""
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=classes)
    starts = torch.cumsum(counts, 0) - counts
    i = torch.randint(0, len(y), (n,), generator=g)
    same = torch.arange(n) < n // 2
    other = (y[i] + torch.randint(1, classes, (n,), generator=g)) % classes
    cls = torch.where(same, y[i], other)
    u = torch.rand(n, generator=g)
    j = order[starts[cls] + (u * counts[cls]).long().clamp(max=counts[cls] - 1)]
    return i, j, same.float()


def train_siamese(data: Dataset, shared: bool, steps: int, seed: int) -> dict:
    """A study job: train a (pseudo-)Siamese verifier on same/different digit pairs."""
    t0 = time.perf_counter()
    x, y, xt, yt = (torch.from_numpy(a) for a in data.arrays())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = psnn.Siamese(_encoder(data.channels, data.length), PairHead(32), shared=shared)
    g = torch.Generator().manual_seed(seed + 1)

    def loss_fn(_idx):
        i, j, target = _pairs(y, len(_idx), data.classes, g)
        return F.binary_cross_entropy_with_logits(model(x[i], x[j]), target)

    fit(model, loss_fn, len(y), steps, seed + 2)

    @torch.no_grad()
    def verify(xs, ys, pair_seed):
        i, j, target = _pairs(ys, EVAL_PAIRS, data.classes, torch.Generator().manual_seed(pair_seed))
        return float(((model(xs[i], xs[j]) > 0).float() == target).float().mean())

    return {
        "test_acc": verify(xt, yt, 1234),
        "train_acc": verify(x, y, 4321),
        **param_counts(model),
        "seconds": time.perf_counter() - t0,
    }


# ---- autoencoders -----------------------------------------------------------------------------
def train_autoencoder(data: Dataset, tied: bool, hidden: int, code: int, steps: int, seed: int) -> dict:
    """A study job: train a tied (or untied) autoencoder; report reconstruction mean squared error."""
    t0 = time.perf_counter()
    x, _, xt, _ = data.arrays()
    x, xt = torch.from_numpy(x).flatten(1), torch.from_numpy(xt).flatten(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = psnn.TiedAutoencoder([x.shape[1], hidden, code])
    if not tied:
        untie(model)
    fit(model, lambda idx: F.mse_loss(model(x[idx]), x[idx]), len(x), steps, seed + 1)
    with torch.no_grad():
        test_mse = float(F.mse_loss(model(xt), xt))
        train_mse = float(F.mse_loss(model(x), x))
    return {"test_mse": test_mse, "train_mse": train_mse, **param_counts(model), "seconds": time.perf_counter() - t0}


# ---- the experiment ---------------------------------------------------------------------------
def _siamese_job(ctx: StudyContext, shared: bool, seed: int) -> Job:
    steps = ctx.steps(*SIAMESE_STEPS)
    return job("paramshare.study.experiments.siamese_autoencoder:train_siamese", cost=steps * 1.7,
               label=f"Siamese, {'shared' if shared else 'unshared'} twins", shared=shared, steps=steps, seed=seed)


def _ae_job(ctx: StudyContext, tied: bool, hidden: int, seed: int) -> Job:
    steps = ctx.steps(*AE_STEPS)
    return job("paramshare.study.experiments.siamese_autoencoder:train_autoencoder", cost=steps * 0.35,
               label=f"{'tied' if tied else 'untied'} autoencoder, hidden {hidden}", tied=tied, hidden=hidden,
               code=AE_CODE, steps=steps, seed=seed)


def jobs(ctx: StudyContext) -> list[Job]:
    out = [_siamese_job(ctx, s, seed) for s in (True, False) for seed in ctx.seeds(*SIAMESE_SEEDS)]
    out += [_ae_job(ctx, t, h, seed) for t in (True, False) for h in AE_HIDDEN for seed in ctx.seeds(*AE_SEEDS)]
    return out


def _mean(rs, key):
    return statistics.fmean(r[key] for r in rs)


def summarize(ctx: StudyContext, results: dict) -> Section:
    rows = []
    sia = {}
    for shared in (True, False):
        rs = [results[_siamese_job(ctx, shared, s).key] for s in ctx.seeds(*SIAMESE_SEEDS)]
        sia[shared] = {"test": _mean(rs, "test_acc"), "train": _mean(rs, "train_acc"), "stored": rs[0]["stored_params"],
                       "used": rs[0]["used_params"]}
        rows.append({
            "model": f"Siamese verifier, {'shared twins' if shared else 'unshared twins'}",
            "stored_params": rs[0]["stored_params"],
            "used_params": rs[0]["used_params"],
            "metric": "pair accuracy (test)",
            "value": round(sia[shared]["test"], 4),
            "result": f"{100 * sia[shared]['test']:.1f}%",
        })
    d_in = ctx.data.channels * ctx.data.length
    ae = {}
    for tied in (True, False):
        for h in AE_HIDDEN:
            rs = [results[_ae_job(ctx, tied, h, s).key] for s in ctx.seeds(*AE_SEEDS)]
            ae[tied, h] = {"test": _mean(rs, "test_mse"), "train": _mean(rs, "train_mse"), "stored": rs[0]["stored_params"]}
    ref = 32 if 32 in AE_HIDDEN else AE_HIDDEN[-1]
    tied_ref = ae[True, ref]
    # the untied network whose stored parameters are closest to the tied reference
    eq_h = min((h for h in AE_HIDDEN), key=lambda h: abs(ae[False, h]["stored"] - tied_ref["stored"]))
    for label, key in [
        (f"autoencoder {d_in}-{ref}-{AE_CODE}, tied", (True, ref)),
        (f"autoencoder {d_in}-{eq_h}-{AE_CODE}, untied (about equal parameters)", (False, eq_h)),
        (f"autoencoder {d_in}-{ref}-{AE_CODE}, untied (about double parameters)", (False, ref)),
    ]:
        rows.append({
            "model": label,
            "stored_params": ae[key]["stored"],
            "used_params": None,
            "metric": "reconstruction MSE (test)",
            "value": round(ae[key]["test"], 5),
            "result": f"{ae[key]['test']:.4f}",
        })
    findings = [
        f"Shared twins verify pairs at {100 * sia[True]['test']:.1f}% against {100 * sia[False]['test']:.1f}% for two "
        f"independent encoders, with {sia[False]['stored'] / sia[True]['stored']:.2f}x fewer stored parameters "
        f"({sia[True]['stored']:,} vs {sia[False]['stored']:,}).",
        f"The tied autoencoder ({tied_ref['stored']:,} parameters) reconstructs with test MSE {tied_ref['test']:.4f}; "
        f"untied at about the same size ({ae[False, eq_h]['stored']:,}) {ae[False, eq_h]['test']:.4f}, untied at "
        f"{ae[False, ref]['stored'] / tied_ref['stored']:.1f}x the parameters ({ae[False, ref]['stored']:,}) "
        f"{ae[False, ref]['test']:.4f}.",
    ]
    columns = [
        Column("model", "model"),
        Column("stored_params", "stored params", "int"),
        Column("metric", "measure"),
        Column("result", "result", "str"),
    ]
    ae_series = []
    for i, tied in enumerate((True, False)):
        ae_series.append(Series(
            f"{'tied' if tied else 'untied'} ({d_in}-h-{AE_CODE}-h-{d_in})",
            [ae[tied, h]["stored"] for h in AE_HIDDEN], [ae[tied, h]["test"] for h in AE_HIDDEN],
            point_labels=[f"h={h}" for h in AE_HIDDEN], color=i, marker="os"[i],
            label_offset=(-6, 4) if tied else (6, -5),
        ))
    figs = [
        Figure(
            file="autoencoder_frontier.png",
            title=f"{ctx.data.title}: autoencoder reconstruction error vs stored parameters",
            xlabel="stored parameters (log scale)",
            ylabel="test reconstruction MSE (lower is better)",
            series=ae_series, logx=True, yfmt="plain",
        ),
        Figure(
            file="siamese.png",
            title=f"{ctx.data.title}: same/different digit verification",
            xlabel="twins (stored parameters)",
            ylabel="pair accuracy",
            series=[
                Series("test pairs", ["shared", "unshared"], [sia[True]["test"], sia[False]["test"]], color=0),
                Series("training pairs", ["shared", "unshared"], [sia[True]["train"], sia[False]["train"]], color=0,
                       filled=False),
            ],
            kind="bars",
            categories=[f"shared twins\n({sia[True]['stored']:,})", f"unshared twins\n({sia[False]['stored']:,})"],
            ylim=(0.4, 1.05),
            hlines=[(0.5, "chance")],
        ),
    ]
    notes = [
        f"Siamese: {ctx.steps(*SIAMESE_STEPS)} steps of 100 pairs (half same digit), {EVAL_PAIRS} fixed test pairs, "
        f"{seeds_words(len(ctx.seeds(*SIAMESE_SEEDS)))}. Autoencoders: {ctx.steps(*AE_STEPS)} steps, code size {AE_CODE}, "
        f"{seeds_words(len(ctx.seeds(*AE_SEEDS)))}; MSE on standardised inputs."
    ]
    return Section("siamese_autoencoder", TITLE, QUESTION, columns, rows, findings, figs, notes)
