"""Basis sharing on the real all-MiniLM-L6-v2, against per-layer SVD and clustering, no fine-tuning.

Removes 20/30/40/50% of the parameters of MiniLM's encoder linear layers (query, key, value,
attention output, intermediate and output of all 6 layers: 36 weights, 10.6M parameters) and
measures how close the sentence embeddings stay to the original's, on standard-library
docstring sentences:

* per-layer truncated SVD, plain and activation-aware (whitened by the calibration inputs'
  second moments, as SVD-LLM does): the baselines, implemented here independently;
* ``ps.basis_share`` (groups of 2 consecutive layers share one basis per weight family)
  without and with calibration, and with ``group_size=1`` and calibration (per-layer, through
  the same code) to separate what sharing adds from what the calibrated fit adds;
* ``ps.cluster`` at equal bytes (the most bits per weight whose labels and codebook fit in the
  bytes the low-rank methods keep), when paramshare has clustering.

Calibration and evaluation sentences are disjoint. Metrics: mean cosine of each sentence's
embedding to the original's, and top-1 neighbour agreement (the fraction of sentences whose
nearest other sentence is the same as with the original model).

Usage: .venv/bin/python benchmarks/basis_minilm.py [--quick] [--eval N] [--calibration N] [--ratios 20,30,40,50]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import paramshare as ps  # noqa: E402
from _common import embed, embedding_agreement, header, load_minilm, stdlib_sentences  # noqa: E402

FAMILIES = ("attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense")
PATTERNS = [f"encoder.layer.?.{f}.weight" for f in FAMILIES]  # '?': one digit, so the globs do not overlap


def linears(model) -> list[tuple[str, torch.nn.Linear]]:
    return [(f"encoder.layer.{i}.{f}", model.get_submodule(f"encoder.layer.{i}.{f}"))
            for i in range(model.config.num_hidden_layers) for f in FAMILIES]


def batches(tok, sentences: list[str], size: int = 32) -> list[dict]:
    return [dict(tok(sentences[i : i + size], padding=True, truncation=True, max_length=128, return_tensors="pt"))
            for i in range(0, len(sentences), size)]


@torch.no_grad()
def input_grams(model, cal: list[dict]) -> dict[str, torch.Tensor]:
    """X^T X of every encoder linear layer's inputs, padding left out (for the SVD-LLM baseline)."""
    grams: dict[str, torch.Tensor] = {}
    mask = {}
    hooks = []
    for name, lin in linears(model):
        def hook(module, args, name=name):
            x = args[0][mask["m"].bool()].double()
            grams[name] = grams.get(name, 0) + x.T @ x
        hooks.append(lin.register_forward_pre_hook(hook))
    try:
        for b in cal:
            mask["m"] = b["attention_mask"]
            model(**b)
    finally:
        for h in hooks:
            h.remove()
    return grams


@torch.no_grad()
def per_layer_factors(model, grams=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per weight, ``(left, right)`` with ``W = left @ right`` and rank-k truncation ``left[:, :k] @ right[:k]``.

    Plain: ``left = U S``, ``right = V^T``. Whitened (SVD-LLM): ``S_x = cholesky(X^T X)``, the SVD of
    ``W S_x``, mapped back by ``S_x^-1`` (``right = V^T S_x^-1``). Computed once, truncated at every ratio.
    """
    out_f = {}
    for name, lin in linears(model):
        w = lin.weight.double()
        if grams is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            out_f[name] = ((u * s).float(), vh.float())
            continue
        g = grams[name]
        eye = torch.eye(w.shape[1], dtype=g.dtype)
        damp = 1e-6 * g.diagonal().mean()
        while True:
            try:
                s_mat = torch.linalg.cholesky(g + damp * eye)
                break
            except RuntimeError:
                damp *= 10
        u, s, vh = torch.linalg.svd(w @ s_mat, full_matrices=False)
        right = torch.linalg.solve_triangular(s_mat, vh, upper=False, left=False)  # V^T S_x^-1
        out_f[name] = ((u * s).float(), right.float())
    return out_f


@torch.no_grad()
def per_layer_svd(model, ratio: float, factors) -> int:
    """Replace each weight by its rank-k truncation (k: the most that removes ``ratio``); returns stored numbers."""
    kept = 0
    for name, lin in linears(model):
        out, inn = lin.weight.shape
        k = int((1 - ratio) * out * inn // (out + inn))
        left, right = factors[name]
        lin.weight.copy_((left[:, :k].double() @ right[:k].double()).to(lin.weight.dtype))
        kept += k * (out + inn)
    return kept


def linear_numel(model) -> int:
    return sum(lin.weight.numel() for _, lin in linears(model))


def stored_linear_numel(model) -> int:
    """Numbers stored for the encoder linear weights after basis_share (from ps.report's exact counts)."""
    r = ps.report(model)
    return sum(row.stats.stored_numel for row in r.rows if row.group.kind == "bank")


def cluster_equal_bytes(model, ratio: float, cal) -> tuple[int, int]:
    """ps.cluster each family at the most bits whose labels + codebook fit (1 - ratio) of its fp32 bytes."""
    total_bytes = 0
    bits_used = []
    for pat in PATTERNS:
        w = model.get_parameter(pat.replace("?", "0"))
        n = w.numel()
        budget = (1 - ratio) * n * 4
        bits = max(b for b in range(1, 17) if math.ceil(n * b / 8) + (2 ** b) * 4 <= budget)
        ps.cluster(model, bits=bits, include=pat, min_numel=1, init="density")
        bits_used.append(bits)
    r = ps.report(model)
    for row in r.rows:
        if row.group.kind == "codebook":
            total_bytes += row.stats.stored_bytes
    return total_bytes, min(bits_used)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few sentences, two ratios (a smoke run)")
    ap.add_argument("--eval", type=int, default=None, help="evaluation sentences (default 512)")
    ap.add_argument("--calibration", type=int, default=None, help="calibration sentences (default 512)")
    ap.add_argument("--ratios", type=str, default=None,
                    help="comma-separated percentages removed (default 20,30,40,50; quick 20,50)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2; 1 is faster on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    header("basis sharing on all-MiniLM-L6-v2 (no fine-tuning)")
    n_eval = args.eval or (48 if args.quick else 512)
    n_cal = args.calibration or (64 if args.quick else 512)
    ratios = (0.2, 0.5) if args.quick else (0.2, 0.3, 0.4, 0.5)
    if args.ratios:
        ratios = tuple(int(r) / 100 for r in args.ratios.split(","))
    t0 = time.perf_counter()
    model, tok = load_minilm()
    # one pool, split: calling stdlib_sentences twice can see a different pool (the first call's
    # imports add attributes to modules), so skip= alone does not guarantee disjoint sets
    pool = stdlib_sentences(n_eval + n_cal)
    ev, cal_sentences = pool[:n_eval], pool[n_eval:]
    if set(ev) & set(cal_sentences):
        raise SystemExit("calibration and evaluation sentences overlap")
    cal = batches(tok, cal_sentences)
    ref = embed(model, tok, ev)
    total = linear_numel(model)
    grams = input_grams(model, cal)
    has_cluster = hasattr(ps, "cluster")
    print(f"{n_eval} evaluation and {n_cal} calibration sentences (disjoint), from stdlib docstrings; "
          f"{len(linears(model))} encoder linear weights, {total:,} parameters", flush=True)

    results = []

    def run(method: str, ratio: float, fn) -> None:
        t = time.perf_counter()
        m = copy.deepcopy(model)
        kept, note = fn(m)
        metrics = embedding_agreement(ref, embed(m, tok, ev))
        results.append({"method": method, "ratio": ratio, "removed": 1 - kept / total, **metrics, "note": note})
        print(f"  {ratio:.0%} {method:42s} size removed {1 - kept / total:6.1%}  cosine {metrics['cosine']:.4f}  "
              f"top-1 {metrics['neighbour_agreement']:.3f}  {note}  ({time.perf_counter() - t:.0f} s)", flush=True)

    plain_f = per_layer_factors(model)
    white_f = per_layer_factors(model, grams)
    for ratio in ratios:
        run("per-layer SVD", ratio, lambda m: (per_layer_svd(m, ratio, plain_f), ""))
        run("per-layer SVD, whitened (SVD-LLM)", ratio, lambda m: (per_layer_svd(m, ratio, white_f), ""))
        run("basis_share g=2", ratio,
            lambda m: (stored_linear_numel(ps.basis_share(m, PATTERNS, ratio=ratio, group_size=2)), ""))
        run("basis_share g=1 + calibration", ratio,
            lambda m: (stored_linear_numel(ps.basis_share(m, PATTERNS, ratio=ratio, group_size=1, calibration=cal)), ""))
        run("basis_share g=2 + calibration", ratio,
            lambda m: (stored_linear_numel(ps.basis_share(m, PATTERNS, ratio=ratio, group_size=2, calibration=cal)), ""))
        if has_cluster:
            def clus(m):
                nbytes, bits = cluster_equal_bytes(m, ratio, cal)
                return nbytes / 4, f"{bits}+ bits/weight"
            run("cluster, equal bytes", ratio, clus)

    print("\nmean cosine to the original embeddings (top-1 neighbour agreement), by share of the linear "
          "layers' parameters removed; gain = calibrated basis_share g=2 minus whitened per-layer SVD")
    methods = list(dict.fromkeys(r["method"] for r in results))
    print(f"{'method':42s}" + "".join(f"{r:>17.0%}" for r in ratios))
    for meth in methods:
        cells = []
        for ratio in ratios:
            r = next(x for x in results if x["method"] == meth and x["ratio"] == ratio)
            cells.append(f"{r['cosine']:.4f} ({r['neighbour_agreement']:.3f})")
        print(f"{meth:42s}" + "".join(f"{c:>17s}" for c in cells))
    gains = []
    for ratio in ratios:
        a = next(x for x in results if x["method"] == "basis_share g=2 + calibration" and x["ratio"] == ratio)
        b = next(x for x in results if x["method"] == "per-layer SVD, whitened (SVD-LLM)" and x["ratio"] == ratio)
        gains.append(f"{a['cosine'] - b['cosine']:+.4f}")
    print(f"{'gain in cosine':42s}" + "".join(f"{g:>17s}" for g in gains))
    if not has_cluster:
        print("\n(ps.cluster is not available in this paramshare: the clustering row is missing)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
