"""``paramshare compress IN OUT --bits 4``: any weights file to a clustered paramshare checkpoint.

Every floating-point tensor with at least two dimensions and ``--min-numel`` elements (the
weight matrices, convolution kernels and embeddings of a Hugging Face model file) becomes a
codebook of ``2**bits`` centroids and labels packed at ``bits`` bits; the other tensors are
copied as they are. Names are kept, so ``ps.load(model, OUT)`` loads the result into the
original architecture (its plan makes each clustered weight read its codebook), and
``paramshare inspect OUT`` shows the codebooks. Prints, per tensor, the bytes before and
after and the relative reconstruction error ``||W - W_hat|| / ||W||``, then the totals.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

__all__ = ["compress_file", "add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="a .safetensors file (or a .pt/.bin state dict, read with weights_only)")
    parser.add_argument("output", metavar="OUT", help="the paramshare checkpoint to write (.safetensors)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--bits", type=int, default=None, help="2**BITS clusters per codebook (default 4)")
    size.add_argument("--clusters", type=int, default=None, help="clusters per codebook (instead of --bits)")
    parser.add_argument("--granularity", default="tensor",
                        help="'tensor' (one codebook per tensor, default), 'channel' (per output row) or N rows per codebook")
    parser.add_argument("--include", action="append", default=None, metavar="PATTERN",
                        help="only tensors whose name matches this fnmatch pattern (repeatable)")
    parser.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                        help="keep tensors matching this pattern dense (repeatable)")
    parser.add_argument("--min-numel", type=int, default=1024, help="smallest tensor (elements) to cluster (default 1024)")
    parser.add_argument("--init", default="optimal", help="optimal (default), kmeans++, linear or density")
    parser.add_argument("--prune", type=float, default=0.0, help="fraction of each codebook's weights pinned at zero")
    parser.add_argument("--entropy", action="store_true", help="also entropy-code the packed labels (zlib/lzma)")
    parser.add_argument("--quiet", action="store_true", help="print only the totals")


def _granularity(text: str):
    if text in ("tensor", "channel"):
        return text
    try:
        return int(text)
    except ValueError:
        return text  # ps.cluster reports the bad value


def _build(tensors: dict, aliases: dict):
    """A module whose parameters (floating) and buffers (others) are the file's tensors, by name."""
    import torch
    from torch import nn

    from ..errors import CheckpointError

    root = nn.Module()

    def host(path: str) -> tuple[nn.Module, str]:
        mod = root
        parts = path.split(".")
        for p in parts[:-1]:
            child = mod._modules.get(p)
            if child is None:
                if p in mod._parameters or p in mod._buffers:
                    raise CheckpointError(f"{path!r} is inside {p!r}, which is itself a tensor; cannot rebuild the names")
                child = nn.Module()
                mod.add_module(p, child)
            mod = child
        attr = parts[-1]
        if attr in mod._modules or attr in mod._parameters or attr in mod._buffers:
            raise CheckpointError(f"the file names {path!r} twice or as both a tensor and a prefix")
        return mod, attr

    params = {}
    for name, t in tensors.items():
        mod, attr = host(name)
        if t.dtype.is_floating_point:
            p = nn.Parameter(t.detach().clone(), requires_grad=False)
            mod.register_parameter(attr, p)
            params[name] = p
        else:
            mod.register_buffer(attr, t.detach().clone())
    for name, target in aliases.items():
        if target in params:
            mod, attr = host(name)
            mod.register_parameter(attr, params[target])
    del torch
    return root


def compress_file(src, dst, bits: int | None = None, clusters: int | None = None, granularity="tensor",
                  include=None, exclude=None, min_numel: int = 1024, init: str = "optimal", prune: float = 0.0,
                  entropy: bool = False, progress=None) -> dict:
    """Cluster the weight tensors of ``src`` and write a paramshare checkpoint to ``dst``.

    Args:
        src: a safetensors file or a PyTorch state dict (``.pt``/``.bin``, read with ``weights_only``).
        dst: the checkpoint to write.
        bits, clusters, granularity, init, prune: as :func:`paramshare.cluster` (default 4 bits).
        include, exclude: ``fnmatch`` patterns on tensor names.
        min_numel: smallest tensor clustered (tensors need at least two dimensions).
        entropy: also entropy-code the packed labels (``ps.save(..., compress=True)``).
        progress: optional callable ``(row_dict) -> None`` called after each tensor.

    Returns:
        A dict: ``rows`` (per clustered tensor: name, shape, bytes before and after, relative
        error), ``input_bytes``, ``output_bytes`` (the file), ``dense_bytes`` (the tensors at
        their dtype), ``seconds``.

    Raises:
        CheckpointError: unreadable input or unwritable output. SharingError: bad settings
            or no tensor to cluster.

    Example:
        >>> import os, tempfile, torch, safetensors.torch as st
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "w.safetensors")
        >>> st.save_file({"fc.weight": torch.randn(64, 64), "fc.bias": torch.zeros(64)}, src)
        >>> info = compress_file(src, os.path.join(d, "c.safetensors"), bits=4)
        >>> [r["name"] for r in info["rows"]], info["output_bytes"] < os.path.getsize(src) / 4
        (['fc.weight'], True)
    """
    import fnmatch

    import torch

    from .._inspect import open_weights
    from ..checkpoint import save
    from ..errors import SharingError
    from ..kinds.codebook import codebook_of
    from .._index import ModelIndex
    from .bits import bits_for, packed_size
    from .core import cluster

    t0 = time.perf_counter()
    if bits is None and clusters is None:
        bits = 4
    w = open_weights(src)
    if w.plan is not None and len(w.plan):
        raise SharingError(
            f"{w.path} already has a sharing plan ({len(w.plan)} group(s)); load it into its model and use ps.cluster"
        )
    model = _build(w.tensors, w.aliases)
    inc = [include] if isinstance(include, str) else list(include or [])
    exc = [exclude] if isinstance(exclude, str) else list(exclude or [])
    for what, pats in (("include", inc), ("exclude", exc)):
        for pat in pats:
            if not any(fnmatch.fnmatchcase(n, pat) for n in list(w.tensors) + list(w.aliases)):
                raise SharingError(f"{what} pattern {pat!r} matches no tensor of {w.path}")
    eligible = [
        n for n, t in w.tensors.items()
        if t.dtype.is_floating_point and t.dim() >= 2 and t.numel() >= min_numel
        and (not inc or any(fnmatch.fnmatchcase(n, p) for p in inc))
        and not any(fnmatch.fnmatchcase(n, p) for p in exc)
    ]
    if not eligible:
        raise SharingError(
            f"no tensor of {w.path} to cluster: none is floating point with at least 2 dimensions and "
            f"{min_numel} elements" + (" matching the patterns" if inc or exc else "") + "; lower --min-numel"
        )
    rows = []
    for name in eligible:
        dense = w.tensors[name].detach()
        cluster(model, bits=bits, clusters=clusters, granularity=granularity, include=[name], min_numel=0,
                init=init, prune=prune)
        use = ModelIndex(model).uses[name]
        cb = codebook_of(use)
        with torch.no_grad():
            approx = use.value()
            d64 = dense.double()
            err = float((approx.double() - d64).norm() / d64.norm()) if d64.norm() > 0 else float((approx.double()).norm())
        cent = use.plist.original
        after = cent.numel() * cent.element_size() + packed_size(dense.numel(), bits_for(cb.clusters))
        row = {
            "name": name,
            "shape": list(dense.shape),
            "dtype": str(dense.dtype).replace("torch.", ""),
            "clusters": cb.clusters,
            "bytes_before": dense.numel() * dense.element_size(),
            "bytes_after": after,
            "bits_per_weight": 8 * after / dense.numel(),
            "rel_error": err,
        }
        rows.append(row)
        if progress is not None:
            progress(row)
    save(model, dst, compress=entropy)
    dense_bytes = sum(t.numel() * t.element_size() for t in w.tensors.values())
    return {
        "rows": rows,
        "input_bytes": w.file_bytes or dense_bytes,
        "dense_bytes": dense_bytes,
        "output_bytes": os.path.getsize(dst),
        "seconds": time.perf_counter() - t0,
    }


def run(args: argparse.Namespace) -> int:
    from .._format import human_bytes, render_table, shorten
    from ..errors import SharingError

    shown = []

    def progress(row):
        if args.quiet:
            return
        if not shown:
            print(f"clustering {args.input} ...", flush=True)
        shown.append(row)
        if sys.stdout.isatty():
            print(f"  {shorten(row['name'], 60)}: {row['bits_per_weight']:.2f} bits/weight, "
                  f"rel. error {row['rel_error']:.4f}", flush=True)

    try:
        info = compress_file(
            args.input, args.output, bits=args.bits, clusters=args.clusters, granularity=_granularity(args.granularity),
            include=args.include, exclude=args.exclude, min_numel=args.min_numel, init=args.init, prune=args.prune,
            entropy=args.entropy, progress=progress,
        )
    except SharingError as e:  # CheckpointError is one too
        print(f"paramshare compress: {e}", file=sys.stderr)
        return 2
    rows = info["rows"]
    if not args.quiet:
        table = [
            [shorten(r["name"], 52), "x".join(map(str, r["shape"])), r["clusters"], human_bytes(r["bytes_before"]),
             human_bytes(r["bytes_after"]), f"{r['bits_per_weight']:.2f}", f"{r['rel_error']:.4f}"]
            for r in rows
        ]
        print(render_table(["tensor", "shape", "k", "before", "after", "bits/w", "rel. error"], table, align="llrrrrr"))
        print()
    before = sum(r["bytes_before"] for r in rows)
    after = sum(r["bytes_after"] for r in rows)
    mean_err = math.sqrt(sum(r["rel_error"] ** 2 * r["bytes_before"] for r in rows) / before) if before else 0.0
    print(f"clustered {len(rows)} tensor(s): {human_bytes(before)} -> {human_bytes(after)} "
          f"({before / after:.2f}x), rms relative error {mean_err:.4f}")
    print(f"file: {args.input} {human_bytes(info['input_bytes'])} -> {args.output} {human_bytes(info['output_bytes'])} "
          f"({info['input_bytes'] / info['output_bytes']:.2f}x smaller{', labels entropy-coded' if args.entropy else ''}) "
          f"in {info['seconds']:.1f} s")
    print(f"load it with ps.load(model, {os.path.basename(args.output)!r}); `paramshare inspect {args.output}` shows the codebooks")
    return 0
