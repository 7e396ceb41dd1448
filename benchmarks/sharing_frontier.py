"""Where cross-layer sharing pays, and where it stops: validation loss against stored parameters.

A small character-level transformer language model (6 pre-norm blocks) is trained for the same
number of steps on the Python standard library's docstrings, with every kind of cross-layer
sharing paramshare offers:

* no sharing (6 blocks), and unshared models with fewer blocks (1-5): the peers at equal size;
* ``ps.share_layers``: all, sequence, cycle and cycle_rev at M = 2 and 3 unique blocks;
* ``ps.template_share``: the blocks' linear weights as mixtures of T = 1, 2, 3 templates;
* ``ps.convert_to_shared`` + ``ps.relax``: the trained unshared model converted to M = 2 (cycle),
  with rank-r deltas (r = 0, 2, 8), then fine-tuned briefly.

It prints a table (stored parameters, validation loss in nats per character, the loss of an
unshared model of the same size interpolated from the depth sweep, and the difference) and
writes a PNG of the frontier. Everything is local: no downloads.

Usage: .venv/bin/python benchmarks/sharing_frontier.py [--quick] [--steps N] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pydoc
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import paramshare as ps  # noqa: E402
from _common import STDLIB_MODULES, header  # noqa: E402


# ---- data ---------------------------------------------------------------------------------------
def docstring_corpus() -> str:
    """Every distinct docstring (> 40 characters) of the modules in ``STDLIB_MODULES``, joined."""
    docs, seen = [], set()
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - platform-specific modules
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]:
            d = pydoc.getdoc(obj) if obj is not None else ""
            if len(d) > 40 and d not in seen:
                seen.add(d)
                docs.append(d)
    return "\n\n".join(docs)


class Data:
    """Characters as ids; the last 10% of the corpus is the validation text."""

    def __init__(self, text: str, context: int):
        chars = sorted(set(text))
        self.vocab = len(chars)
        ids = torch.tensor(_encode(text, chars), dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]
        self.context = context

    def batch(self, split: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, len(split) - self.context - 1, (size,), generator=gen)
        x = torch.stack([split[s : s + self.context] for s in start.tolist()])
        y = torch.stack([split[s + 1 : s + 1 + self.context] for s in start.tolist()])
        return x, y


def _encode(text: str, chars: list[str]) -> list[int]:
    table = {c: i for i, c in enumerate(chars)}
    return [table[c] for c in text]


# ---- model --------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, vocab: int, d: int, blocks: int, heads: int, context: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


# ---- training -----------------------------------------------------------------------------------
def train(model: nn.Module, data: Data, steps: int, batch: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    for _ in range(steps):
        x, y = data.batch(data.train, batch, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


@torch.no_grad()
def val_loss(model: nn.Module, data: Data, batches: int, batch: int) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation windows for every model
    total = 0.0
    for _ in range(batches):
        x, y = data.batch(data.val, batch, gen)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    return total / batches


def stored(model: nn.Module) -> int:
    return ps.report(model).unique_params


def interp_unshared(depth_points: list[tuple[int, float]], params: int) -> float | None:
    """Loss of an unshared model with ``params`` stored parameters, interpolated in log(params)."""
    pts = sorted(depth_points)
    if not pts or params < pts[0][0] or params > pts[-1][0]:
        return None
    for (p0, l0), (p1, l1) in zip(pts, pts[1:]):
        if p0 <= params <= p1:
            w = (math.log(params) - math.log(p0)) / (math.log(p1) - math.log(p0)) if p1 > p0 else 0.0
            return l0 + w * (l1 - l0)
    return pts[-1][1]


# ---- the plot -----------------------------------------------------------------------------------
def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "unshared": ("black", "o", "unshared, 1-6 blocks (the peers at equal size)"),
        "share_layers": ("tab:blue", "s", "share_layers (6 blocks, M unique)"),
        "template_share": ("tab:green", "^", "template_share (6 blocks, T templates)"),
        "convert+relax": ("tab:red", "D", "convert_to_shared M=2 + relax rank r (from trained)"),
    }
    fig, ax = plt.subplots(figsize=(9.5, 6.2), dpi=120)
    # labels of points at (nearly) the same size, whatever their family, are spread out vertically
    vals = [r["val"] for r in rows]
    gap = 0.035 * (max(vals) - min(vals) or 1.0)
    label_y: dict[int, float] = {}
    by_x = sorted(rows, key=lambda r: r["stored"])
    clusters: list[list[dict]] = []
    for r in by_x:
        if clusters and math.log(r["stored"]) - math.log(clusters[-1][0]["stored"]) < 0.06:
            clusters[-1].append(r)
        else:
            clusters.append([r])
    for cl in clusters:
        prev = None
        for r in sorted(cl, key=lambda r: -r["val"]):
            y = r["val"] + 0.3 * gap if prev is None else min(r["val"] + 0.3 * gap, prev - gap)
            label_y[id(r)] = prev = y
    for family, (color, marker, label) in styles.items():
        mine = sorted((r for r in rows if r["family"] == family), key=lambda r: r["stored"])
        if not mine:
            continue
        ax.plot([r["stored"] for r in mine], [r["val"] for r in mine], color=color, marker=marker,
                lw=1.8 if family == "unshared" else 0, ms=8, label=label, zorder=3 if family == "unshared" else 4)
        for r in mine:
            lab = r["label"].replace("1 blocks", "1 block")
            ax.annotate(lab, (r["stored"], r["val"]), xytext=(r["stored"] * 1.03, label_y[id(r)]),
                        textcoords="data", fontsize=8, color=color, va="center")
    worse = [r for r in rows if r.get("gap") is not None and r["gap"] > 0 and r["family"] != "unshared"]
    if worse:
        ax.scatter([r["stored"] for r in worse], [r["val"] for r in worse], s=260, facecolors="none",
                   edgecolors="tab:orange", linewidths=2, zorder=5,
                   label="sharing does not pay: worse than unshared at equal size")
    ax.set_xscale("log")
    ax.set_xlabel("stored parameters (ps.report(model).unique_params, log scale)")
    ax.set_ylabel("validation loss (nats per character, lower is better)")
    ax.set_title(title, fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8.5, loc="upper right")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


# ---- main ---------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and a few steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (default 400, quick 15)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "sharing_frontier.png")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2; 1 is faster on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    header("sharing frontier: char-level transformer LM on stdlib docstrings")
    d, heads, context, batch = (16, 2, 32, 8) if args.quick else (32, 4, 48, 16)
    steps = args.steps or (15 if args.quick else 400)
    finetune = max(1, steps // 3)
    val_batches = 4 if args.quick else 40
    n = 6
    t0 = time.perf_counter()
    text = docstring_corpus()
    if args.quick:
        text = text[:60000]
    data = Data(text, context)
    print(f"corpus: {len(text):,} characters ({data.vocab} distinct), {len(data.val):,} held out; "
          f"model d={d}, {n} blocks, context {context}; {steps} steps of {batch}x{context} characters per model; "
          f"convert+relax fine-tunes {finetune} steps", flush=True)

    def build(blocks: int = n) -> CharLM:
        torch.manual_seed(0)
        return CharLM(data.vocab, d, blocks, heads, context)

    linear = ("qkv.weight", "proj.weight", "fc1.weight", "fc2.weight")
    configs = [("unshared", f"{k} blocks", (lambda k=k: build(k))) for k in range(1, n + 1)]
    for m in (2, 3):
        for strat in ("sequence", "cycle", "cycle_rev"):
            configs.append(("share_layers", f"{strat} M={m}",
                            lambda m=m, s=strat: (lambda mdl: (ps.share_layers(mdl.blocks, m, s), mdl)[1])(build())))
    configs.append(("share_layers", "all M=1", lambda: (lambda mdl: (ps.share_layers(mdl.blocks, 1, "all"), mdl)[1])(build())))
    for t in (1, 2, 3):
        configs.append(("template_share", f"T={t}",
                        lambda t=t: (lambda mdl: (ps.template_share(mdl.blocks, t, params=linear, init="random"), mdl)[1])(build())))
    rows: list[dict] = []
    trained_full = None
    for family, label, make in configs:
        t = time.perf_counter()
        model = make()
        train(model, data, steps, batch, 3e-3, seed=1)
        loss = val_loss(model, data, val_batches, batch)
        rows.append({"family": family, "label": label, "stored": stored(model), "val": loss})
        print(f"  {family:15s} {label:14s} stored {rows[-1]['stored']:>9,}  val {loss:.4f}  ({time.perf_counter() - t:.0f} s)", flush=True)
        if family == "unshared" and label == f"{n} blocks":
            trained_full = model
    for r in (0, 2, 8):
        t = time.perf_counter()
        model = build()
        model.load_state_dict(trained_full.state_dict())
        ps.convert_to_shared(model.blocks, unique=2, strategy="cycle", init="mean", relax_rank=r)
        before = val_loss(model, data, val_batches, batch)
        train(model, data, finetune, batch, 1e-3, seed=2)
        loss = val_loss(model, data, val_batches, batch)
        rows.append({"family": "convert+relax", "label": f"r={r}", "stored": stored(model), "val": loss, "before": before})
        print(f"  {'convert+relax':15s} {'r=' + str(r):14s} stored {rows[-1]['stored']:>9,}  val {loss:.4f}  "
              f"(right after converting: {before:.4f}; {time.perf_counter() - t:.0f} s)", flush=True)

    depth = [(r["stored"], r["val"]) for r in rows if r["family"] == "unshared"]
    for r in rows:
        peer = interp_unshared(depth, r["stored"])
        r["peer"] = peer
        r["gap"] = None if peer is None or r["family"] == "unshared" else r["val"] - peer
    full = next(r for r in rows if r["family"] == "unshared" and r["label"] == f"{n} blocks")
    print("\nvalidation loss vs stored parameters (peer = unshared model of the same size, interpolated in log-size "
          "between the 1..6-block models; gap < 0: sharing beats the peer)")
    print(f"{'family':15s} {'config':14s} {'stored':>9s} {'vs 6 blocks':>11s} {'val loss':>9s} {'peer':>7s} {'gap':>8s}")
    for r in sorted(rows, key=lambda r: (r["family"] != "unshared", r["family"], -r["stored"])):
        peer = "-" if r["peer"] is None or r["family"] == "unshared" else f"{r['peer']:.4f}"
        gap = "-" if r["gap"] is None else f"{r['gap']:+.4f}"
        print(f"{r['family']:15s} {r['label']:14s} {r['stored']:>9,} {r['stored'] / full['stored']:>10.2f}x "
              f"{r['val']:>9.4f} {peer:>7s} {gap:>8s}")
    title = (f"Where cross-layer sharing stops paying: char-level LM on stdlib docstrings (d={d}, {steps} steps, one seed)\n"
             "below the black line: sharing beats an unshared model of the same size; circled: it does not")
    data_path = args.out.with_suffix(".json")
    tmp = data_path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump({"title": title, "rows": rows}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, data_path)
    plot(rows, args.out, title)
    print(f"\nplot: {args.out}  (total {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
