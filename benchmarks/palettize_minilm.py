"""4-bit post-training palettization of the real all-MiniLM-L6-v2: paramshare vs coremltools.

Both contenders cluster the same 40 weight tensors (every Linear and Embedding weight) to 16
values each, one codebook per tensor (coremltools ``PostTrainingPalettizer``, ``n_bits=4``,
``per_tensor``; paramshare ``ps.cluster(bits=4)``), so both store 4 bits per weight plus
16 float32 centroids per tensor: the same bits per weight, codebooks counted. No fine-tuning.

Measured on sentences from the docstrings of the Python standard library (calibration and
evaluation sets disjoint), with sentence-transformers' mean pooling: mean cosine similarity
of each sentence's embedding to the original model's, top-1 nearest-neighbour agreement
(does each sentence keep its nearest neighbour), relative weight error
``||W - W_hat|| / ||W||`` over the clustered tensors, and wall time of the compression.

paramshare runs twice: weights only (optimal 1-D k-means per tensor), and with calibration
batches (``data=``: activation-weighted k-means, and for Linear layers labels chosen with
error compensation through the input covariance).

    .venv/bin/python benchmarks/palettize_minilm.py
    .venv/bin/python benchmarks/palettize_minilm.py --quick   # fewer evaluation sentences
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import embed, embedding_agreement, header, load_minilm, stdlib_sentences  # noqa: E402

import paramshare as ps  # noqa: E402


def weight_error(orig: torch.nn.Module, quant: torch.nn.Module, names: list[str]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for n in names:
            mod, _, attr = n.rpartition(".")
            w0 = orig.get_submodule(mod).get_parameter(attr).double()
            w1 = getattr(quant.get_submodule(mod), attr).double()
            num += float((w1 - w0).square().sum())
            den += float(w0.square().sum())
    return (num / den) ** 0.5


def distinct_values(model: torch.nn.Module, names: list[str]) -> int:
    with torch.no_grad():
        out = 0
        for n in names:
            mod, _, attr = n.rpartition(".")
            out = max(out, getattr(model.get_submodule(mod), attr).unique().numel())
    return out


def coreml(model):
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    cfg = PostTrainingPalettizerConfig.from_dict({"global_config": {"n_bits": 4, "granularity": "per_tensor"}})
    return PostTrainingPalettizer(model, cfg).compress(inplace=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 evaluation sentences instead of 500")
    parser.add_argument("--calibration", type=int, default=32, help="calibration sentences (default 32)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    header("4-bit palettization of all-MiniLM-L6-v2: paramshare vs coremltools PostTrainingPalettizer")
    model, tok = load_minilm()
    n_eval = 100 if args.quick else 500
    calib = stdlib_sentences(args.calibration)
    evals = stdlib_sentences(n_eval, skip=args.calibration)
    ref = embed(model, tok, evals)
    names = [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    n_weights = sum(model.get_parameter(n).numel() for n in names)
    bits = (4 * n_weights + len(names) * 16 * 32) / n_weights
    print(f"{len(names)} weight tensors, {n_weights:,} weights; {bits:.4f} bits/weight for both "
          f"(4-bit labels + 16 float32 centroids per tensor)", flush=True)

    def calibrate():
        return [dict(tok(calib[i:i + 16], padding=True, truncation=True, max_length=128, return_tensors="pt"))
                for i in range(0, len(calib), 16)]

    contenders = {
        "coremltools": lambda m: coreml(m),
        "paramshare": lambda m: ps.cluster(m, bits=4, min_numel=0, include=names),
        "paramshare + data": lambda m: ps.cluster(m, bits=4, min_numel=0, include=names, data=calibrate()),
    }
    rows = []
    results = {}
    for name, fn in contenders.items():
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        out = fn(m)
        secs = time.perf_counter() - t0
        emb = embed(out, tok, evals)
        agree = embedding_agreement(ref, emb)
        first = embedding_agreement(ref[:100], emb[:100])
        err = weight_error(model, out, names)
        results[name] = (agree, secs)
        rows.append([name, f"{agree['cosine']:.4f}", f"{agree['neighbour_agreement']:.3f}",
                     f"{first['neighbour_agreement']:.3f}", f"{err:.4f}", distinct_values(out, names), f"{secs:.2f}"])
        print(f"  {name}: done in {secs:.2f} s", flush=True)
    from paramshare._format import render_table

    print()
    print(render_table(["method", "cosine", f"NN agreement ({n_eval})", "NN agreement (first 100)", "rel. weight error",
                        "max values/tensor", "seconds"], rows, align="lrrrrrr"))
    cm = results["coremltools"]
    for name in ("paramshare", "paramshare + data"):
        a, s = results[name]
        ok = a["cosine"] >= 0.97 and a["neighbour_agreement"] >= 0.90 and s <= cm[1]
        print(f"{name}: cosine {a['cosine']:.4f} (coremltools {cm[0]['cosine']:.4f}), agreement "
              f"{a['neighbour_agreement']:.3f} ({cm[0]['neighbour_agreement']:.3f}), time {s / cm[1]:.2f}x coremltools'; "
              f"goal (cosine >= 0.97, agreement >= 0.90, no more time): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
