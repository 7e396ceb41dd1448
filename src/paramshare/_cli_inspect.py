"""``paramshare inspect FILE``: what a weights file holds and what tying would save.

Works on any safetensors file (paramshare checkpoints, ``safetensors``/Hugging Face files) and
on ``.pt``/``.bin`` state dicts (read with ``torch.load(weights_only=True)`` only). Prints the
tensor count, total and unique bytes, the sharing plan and alias metadata if present, the
codebooks of clustered weights (shape, clusters, bits, stored and dense bytes), exact and
transposed duplicates and, with ``--near``, near duplicates, each with the bytes that tying
would save. ``--json`` prints the same as JSON. Exit code 2 on an unreadable file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .safetensors file, or a .pt/.bin state dict")
    parser.add_argument(
        "--near", type=float, default=None, metavar="THRESHOLD",
        help="also list near duplicates: tensors of one shape (or transposed shapes) with cosine >= THRESHOLD, e.g. 0.95",
    )
    parser.add_argument("--min-numel", type=int, default=16, help="smallest tensor (elements) searched for near duplicates (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--limit", type=int, default=20, help="rows shown per table (default 20; 0: all)")


def check_near(value) -> str | None:
    if value is not None and not 0.0 < value <= 1.0:
        return f"--near must be a cosine threshold in (0, 1], got {value}"
    return None


def run(args: argparse.Namespace) -> int:
    from .errors import CheckpointError

    problem = check_near(args.near)
    if problem:
        print(f"paramshare inspect: {problem}", file=sys.stderr)
        return 2
    try:
        info = inspect_file(args.file, near=args.near, min_numel=args.min_numel)
    except CheckpointError as e:
        print(f"paramshare inspect: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render(info, limit=args.limit))
    return 0


def inspect_file(path, near: float | None = None, min_numel: int = 16) -> dict:
    """Everything ``paramshare inspect`` shows, as a JSON-ready dict."""
    from ._inspect import find_duplicates, open_weights

    w = open_weights(path)
    d = find_duplicates(w, near=near, min_numel=min_numel)
    total = sum(w.nbytes(n) for n in w.tensors)
    return {
        "file": w.path,
        "format": w.format,
        "file_bytes": w.file_bytes,
        "header_bytes": w.header_bytes,
        "tensors": len(w.tensors),
        "tensor_bytes": total,
        "unique_bytes": total - d.exact_bytes_saved,
        "metadata": w.metadata,
        "plan": None if w.plan is None else w.plan.to_dict(),
        "aliases": w.aliases,
        "compressed": {n: dict(s, stored_bytes=_stored(w, n)) for n, s in w.encoding.items()},
        "codebooks": _codebooks(w),
        "exact_duplicates": d.exact,
        "transposed_duplicates": d.transposed,
        "near_threshold": near,
        "near_duplicates": d.near if near is not None else None,
        "bytes_saved": {
            "exact": d.exact_bytes_saved,
            "transposed": d.transposed_bytes_saved,
            "near": d.near_bytes_saved if near is not None else None,
        },
    }


def _stored(w, name: str) -> int:
    return len(w.raw(name)) if w.raw is not None else 0


def _codebooks(w) -> list[dict]:
    """One entry per clustered weight of the plan: its shape, clusters, bits and bytes.

    ``stored_bytes`` is what the file holds for it (centroids plus packed labels, entropy-coded
    when the file was saved with ``compress=True``); ``dense_bytes`` the weight in the
    centroids' dtype.
    """
    if w.plan is None:
        return []
    out = []
    for g in w.plan:
        if g.kind != "codebook":
            continue
        o = dict(g.options)
        shape = [int(s) for s in o.get("weight_shape", [])]
        names = [n for n in (g.source, g.source + ".labels") if n in w.tensors]
        stored = sum(_stored(w, n) if n in w.encoding else w.nbytes(n) for n in names)
        cent = w.tensors.get(g.source)
        size = cent.element_size() if cent is not None else 4
        out.append({
            "weight": g.members[0],
            "uses": list(g.members),
            "shape": shape,
            "clusters": o.get("clusters"),
            "granularity": o.get("granularity"),
            "bits": o.get("bits"),
            "zero_pinned": bool(o.get("zero", False)),
            "stored_bytes": stored,
            "dense_bytes": math.prod(shape) * size if shape else None,
        })
    return out


def render(info: dict, limit: int = 20) -> str:
    """The human-readable report."""
    from ._format import human_bytes, render_table, shorten

    def cap(rows):
        return rows if not limit or len(rows) <= limit else rows[:limit]

    def more(rows):
        return [f"  ... {len(rows) - limit} more (--limit 0 shows all)"] if limit and len(rows) > limit else []

    lines = [info["file"]]
    fmt = {"paramshare": "paramshare checkpoint", "safetensors": "safetensors file", "torch": "PyTorch state dict (weights_only)"}
    lines.append(f"  format        {fmt[info['format']]}")
    n_alias = len(info["aliases"])
    lines.append(f"  tensors       {info['tensors']} stored" + (f" (+{n_alias} names stored under another)" if n_alias else ""))
    if info["header_bytes"]:
        lines.append(f"  file          {human_bytes(info['file_bytes'])} ({info['file_bytes']:,} bytes; header {human_bytes(info['header_bytes'])})")
    else:
        lines.append(f"  file          {human_bytes(info['file_bytes'])} ({info['file_bytes']:,} bytes)")
    lines.append(f"  tensor bytes  {human_bytes(info['tensor_bytes'])} ({info['tensor_bytes']:,})")
    saved = info["bytes_saved"]["exact"]
    lines.append(f"  unique bytes  {human_bytes(info['unique_bytes'])} ({info['unique_bytes']:,}; exact duplicates hold {human_bytes(saved)})")
    if info["metadata"]:
        shown = ", ".join(f"{k}={shorten(v, 40)}" for k, v in list(info["metadata"].items())[:6])
        extra = f", ... ({len(info['metadata'])} in all)" if len(info["metadata"]) > 6 else ""
        lines.append(f"  metadata      {shown}{extra}")
    if info["compressed"]:
        lines.append(f"  compressed    {len(info['compressed'])} integer tensor(s) entropy-coded")

    plan = info["plan"]
    lines.append("")
    if plan is None:
        lines.append("sharing plan: none (not a paramshare checkpoint)")
    elif not plan["groups"]:
        lines.append("sharing plan: no ties")
    else:
        kinds = Counter(g["kind"] for g in plan["groups"])
        lines.append(f"sharing plan: {len(plan['groups'])} group(s): " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
        # clustered weights get their own table below; the rest are listed here
        groups = [g for g in plan["groups"] if g["kind"] != "codebook"]
        rows = [[g["kind"], shorten(g["source"], 40), shorten(", ".join(g["members"]), 60), len(g["members"]),
                 "x".join(map(str, g.get("shape", []))) or "-"] for g in groups]
        if rows:
            lines.append(_indent(render_table(["kind", "stored as", "used by", "uses", "shape"], cap(rows), "lllrl")))
            lines += more(rows)
    books = info["codebooks"]
    if books:
        stored = sum(b["stored_bytes"] for b in books)
        dense = sum(b["dense_bytes"] or 0 for b in books)
        lines.append("")
        lines.append(
            f"codebooks: {len(books)} clustered weight(s), {human_bytes(dense)} dense -> {human_bytes(stored)} stored"
            + (f" ({dense / stored:.2f}x smaller)" if stored else "")
        )
        rows = [[shorten(", ".join(b["uses"]), 50), "x".join(map(str, b["shape"])) or "-", b["clusters"],
                 _granularity(b["granularity"]) + (", zero pinned" if b["zero_pinned"] else ""), b["bits"],
                 human_bytes(b["stored_bytes"]), human_bytes(b["dense_bytes"] or 0)] for b in books]
        lines.append(_indent(render_table(
            ["weight", "shape", "clusters", "granularity", "bits/label", "stored", "dense"], cap(rows), "llrlrrr")))
        lines += more(rows)
    if info["aliases"]:
        lines.append("")
        lines.append(f"aliases ({len(info['aliases'])} names the file stores once, under another name):")
        rows = [[shorten(k, 50), shorten(v, 50)] for k, v in info["aliases"].items()]
        lines.append(_indent(render_table(["name", "stored as"], cap(rows), "ll")))
        lines += more(rows)

    lines.append("")
    ex = info["exact_duplicates"]
    if not ex:
        lines.append("exact duplicates: none")
    else:
        lines.append(f"exact duplicates: {len(ex)} group(s); tying them saves {human_bytes(saved)}")
        rows = [[shorten(", ".join(d["names"]), 70), d["dtype"], "x".join(map(str, d["shape"])) or "scalar",
                 human_bytes(d["bytes_saved"])] for d in sorted(ex, key=lambda d: -d["bytes_saved"])]
        lines.append(_indent(render_table(["tensors (same bytes)", "dtype", "shape", "saves"], cap(rows), "lllr")))
        lines += more(rows)
    tr = info["transposed_duplicates"]
    if not tr:
        lines.append("transposed duplicates: none")
    else:
        lines.append(f"transposed duplicates: {len(tr)}; tying them transposed saves {human_bytes(info['bytes_saved']['transposed'])}")
        rows = [[shorten(d["target"], 40), shorten(d["source"], 40), "x".join(map(str, d["shape"])), human_bytes(d["bytes_saved"])]
                for d in sorted(tr, key=lambda d: -d["bytes_saved"])]
        lines.append(_indent(render_table(["tensor", "= transpose of", "shape of source", "saves"], cap(rows), "lllr")))
        lines += more(rows)
    near = info["near_duplicates"]
    if near is None:
        lines.append("near duplicates: not searched (pass --near 0.95 to search)")
    elif not near:
        lines.append(f"near duplicates (cosine >= {info['near_threshold']}): none")
    else:
        lines.append(
            f"near duplicates (cosine >= {info['near_threshold']}): {len(near)} pair(s); "
            f"tying each cluster saves {human_bytes(info['bytes_saved']['near'])}"
        )
        rows = [[shorten(d["a"], 40), shorten(d["b"] + (" (T)" if d["transposed"] else ""), 44),
                 f"{d['cosine']:.4f}", "x".join(map(str, d["shape"])), human_bytes(d["bytes_saved"])] for d in near]
        lines.append(_indent(render_table(["tensor", "near (T: transposed)", "cosine", "shape", "saves"], cap(rows), "llrlr")))
        lines += more(rows)
    return "\n".join(lines)


def _granularity(g) -> str:
    """A codebook granularity as the plan stores it, in words: a tensor, a channel, n channels."""
    if g == 1:
        return "channel"
    if isinstance(g, int):
        return f"{g} channels"
    return str(g)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
