"""``paramshare dedupe IN OUT``: write a paramshare checkpoint with IN's duplicates tied.

Exact duplicates are stored once (``paramshare.aliases``: :func:`paramshare.load` ties the
names that are parameters and gives buffers the value), a tensor that is exactly another's
transpose becomes a ``transpose`` group of the plan, and with ``--near THRESHOLD`` tensors
whose cosine with a kept tensor is at least THRESHOLD take that tensor's value and are stored
once too (greedy: the tensor with the most near partners is kept first, so every replaced
tensor has cosine >= THRESHOLD with the one it now uses). Loading OUT into the original
architecture gives the same outputs, exactly when only exact duplicates were tied.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="a .safetensors file, or a .pt/.bin state dict")
    parser.add_argument("output", metavar="OUT", help="the paramshare checkpoint to write (.safetensors)")
    parser.add_argument("--near", type=float, default=None, metavar="THRESHOLD",
                        help="also tie near duplicates with cosine >= THRESHOLD (values change slightly)")
    parser.add_argument("--min-numel", type=int, default=16, help="smallest tensor (elements) tied as a near duplicate (default 16)")
    parser.add_argument("--json", action="store_true", help="print what was tied as JSON")


def run(args: argparse.Namespace) -> int:
    from ._cli_inspect import check_near
    from ._format import human_bytes
    from .errors import CheckpointError

    problem = check_near(args.near)
    if problem:
        print(f"paramshare dedupe: {problem}", file=sys.stderr)
        return 2
    try:
        result = dedupe(args.input, args.output, near=args.near, min_numel=args.min_numel)
    except CheckpointError as e:
        print(f"paramshare dedupe: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"wrote {result['output']}: {result['tied']} tensor(s) tied "
        f"({result['exact']} exact, {result['transposed']} transposed, {result['near']} near); "
        f"tensor bytes {human_bytes(result['bytes_before'])} -> {human_bytes(result['bytes_after'])}, "
        f"saved {human_bytes(result['bytes_saved'])} ({result['bytes_saved']:,} bytes)"
    )
    return 0


def dedupe(src, dst, near: float | None = None, min_numel: int = 16) -> dict:
    """Write ``dst``, a paramshare checkpoint of ``src`` with its duplicates tied; returns the counts."""
    from ._inspect import _cosine, find_duplicates, open_weights
    from ._stfile import write_file
    from .checkpoint import ALIASES_KEY, FORMAT_KEY, FORMAT_VERSION, PLAN_KEY, _plan_json
    from .errors import CheckpointError
    from .plans import SharingPlan, TieGroup

    w = open_weights(src)
    plan_groups = list(w.plan or ())
    # tensors an existing plan describes stay as they are
    fixed = set()
    for g in plan_groups:
        fixed.add(g.source)
        fixed.update(g.members)
    prefixes = tuple(g.source + "." for g in plan_groups)

    def free(n: str) -> bool:
        return n not in fixed and not n.startswith(prefixes) and ".parametrizations." not in n

    d = find_duplicates(w, near=near, min_numel=min_numel)
    aliases = dict(w.aliases)
    drop: set[str] = set()
    protected: set[str] = set()
    n_exact = n_trans = n_near = 0
    for grp in d.exact:
        names = [n for n in grp["names"] if free(n)]
        for n in names[1:]:
            aliases[n] = names[0]
            drop.add(n)
            n_exact += 1
    for t in d.transposed:
        a, b = t["source"], t["target"]
        if free(a) and free(b) and a not in drop and b not in drop and t["dtype"] in ("float16", "bfloat16", "float32", "float64"):
            plan_groups.append(TieGroup("transpose", a, (b,), tuple(w.tensors[a].shape)))
            drop.add(b)
            protected.add(a)  # read transposed: it may keep others' values, never take another's
            n_trans += 1
    replaced: dict[str, str] = {}
    if near is not None:
        same = [p for p in d.near if not p["transposed"] and free(p["a"]) and free(p["b"])
                and p["a"] not in drop and p["b"] not in drop]
        neighbours: dict[str, set[str]] = {}
        for p in same:
            neighbours.setdefault(p["a"], set()).add(p["b"])
            neighbours.setdefault(p["b"], set()).add(p["a"])
        order = list(w.tensors)
        pos = {n: i for i, n in enumerate(order)}
        assigned: set[str] = set()
        for center in sorted(neighbours, key=lambda n: (-len(neighbours[n]), pos[n])):
            if center in assigned:
                continue
            assigned.add(center)
            for other in sorted(neighbours[center] - assigned - protected, key=pos.__getitem__):
                assigned.add(other)
                aliases[other] = center
                replaced[other] = center
                drop.add(other)
                n_near += 1
        # exact duplicates of a replaced tensor follow it to the kept tensor
        for k, v in list(aliases.items()):
            if v in replaced:
                aliases[k] = replaced[v]
    for k, v in list(aliases.items()):
        while v in aliases:  # no chains
            v = aliases[v]
        aliases[k] = v
    tensors = [(n, t) for n, t in w.tensors.items() if n not in drop]
    if not tensors:
        raise CheckpointError(f"{w.path}: nothing would be left to store")
    meta = {k: v for k, v in w.metadata.items() if not k.startswith("paramshare.") and k not in w.aliases}
    meta[FORMAT_KEY] = str(FORMAT_VERSION)
    meta[PLAN_KEY] = _plan_json(SharingPlan(tuple(plan_groups)), dict(tensors))
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    write_file(dst, tensors, meta)
    before = sum(w.nbytes(n) for n in w.tensors)
    after = sum(t.numel() * t.element_size() for _, t in tensors)
    worst = min((_cosine(w.tensors[o], w.tensors[c]) for o, c in replaced.items()), default=None)
    return {
        "input": w.path,
        "output": str(dst),
        "tied": n_exact + n_trans + n_near,
        "exact": n_exact,
        "transposed": n_trans,
        "near": n_near,
        "near_threshold": near,
        "lowest_near_cosine": worst,
        "bytes_before": before,
        "bytes_after": after,
        "bytes_saved": before - after,
    }
