"""What a weights file holds and what tying would save: the engine behind ``inspect`` and ``dedupe``.

Reads safetensors files (paramshare checkpoints, ``safetensors`` and Hugging Face files) and
PyTorch ``.pt``/``.bin`` state dicts (only through ``torch.load(weights_only=True)``), then finds

* exact duplicates: same dtype, shape and bytes (a cheap fingerprint of the first and last
  bytes, then a hash, then a byte-for-byte comparison);
* transposed duplicates: ``a == b.transpose(0, 1)`` exactly (first row against first
  column, then a full comparison);
* near duplicates: cosine similarity >= a threshold between tensors of the same shape (or
  transposed shapes). Every candidate tensor is reduced to a 512-number random sketch
  (each element multiplied by a random sign and summed into ``i mod 512`` buckets: one pass,
  inner products preserved in expectation), sketches are compared all-pairs in one matrix
  product, and only pairs whose sketch is close are confirmed with the exact cosine. Tensors
  with no partner of the same shape are never read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from ._stfile import tensor_bytes
from .errors import CheckpointError
from .kinds._common import view_key

__all__ = ["WeightsFile", "open_weights", "Duplicates", "find_duplicates", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_SKETCH = 512
_FLOAT = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass
class WeightsFile:
    """The distinct tensors of a file, by name, with what the file says about sharing."""

    path: str
    format: str  # "paramshare", "safetensors" or "torch"
    tensors: dict[str, torch.Tensor]  # distinct stored tensors (stored form; compressed ones decoded)
    metadata: dict[str, str] = field(default_factory=dict)
    plan: object = None  # SharingPlan or None
    aliases: dict[str, str] = field(default_factory=dict)  # name -> stored name
    encoding: dict[str, dict] = field(default_factory=dict)
    file_bytes: int = 0
    header_bytes: int = 0
    raw: object = None  # callable name -> bytes-like, or None to use tensor_bytes

    def nbytes(self, name: str) -> int:
        t = self.tensors[name]
        return t.numel() * t.element_size()

    def data(self, name: str):
        if self.raw is not None and name not in self.encoding:
            return self.raw(name)
        return tensor_bytes(self.tensors[name])


def open_weights(path) -> WeightsFile:
    """Open a safetensors file or a PyTorch state dict for inspection (never unpickling objects).

    Raises:
        CheckpointError: a missing, unreadable or malformed file, one that holds no tensors.
    """
    from .checkpoint import _FileTensors, _parse

    p = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if isinstance(p, str) and p.lower().endswith(TORCH_SUFFIXES):
        return _open_torch(p)
    try:
        parsed = _parse(p)
    except CheckpointError:
        if isinstance(p, str) and _looks_like_torch(p):
            return _open_torch(p)
        raise
    f = parsed.file
    lazy = _FileTensors(parsed)
    return WeightsFile(
        path=f.path,
        format="paramshare" if parsed.fmt is not None else "safetensors",
        tensors={n: lazy[n] for n in f.entries},
        metadata=dict(f.metadata) if parsed.fmt is None else dict(parsed.user),
        plan=parsed.plan,
        aliases=dict(parsed.aliases),
        encoding=dict(parsed.encoding),
        file_bytes=f.size,
        header_bytes=f.header_bytes,
        raw=f.raw,
    )


def _looks_like_torch(p: str) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def _open_torch(p: str) -> WeightsFile:
    if os.path.isdir(p):
        raise CheckpointError(f"{p}: is a directory, not a weights file")
    if not os.path.exists(p):
        raise CheckpointError(f"{p}: no such file")
    try:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(p, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # weights_only refuses arbitrary objects; corrupt archives raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: cannot read it as a PyTorch state dict with weights_only=True: {first}") from None
    flat: dict[str, torch.Tensor] = {}
    _flatten(obj, "", flat, depth=0)
    if not flat:
        raise CheckpointError(f"{p}: holds no tensors (a {type(obj).__name__})")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_view: dict[object, str] = {}
    for name, t in flat.items():
        key = view_key(t)
        if key in first_by_view:
            aliases[name] = first_by_view[key]
        else:
            first_by_view[key] = name
            tensors[name] = t
    return WeightsFile(p, "torch", tensors, aliases=aliases, file_bytes=os.path.getsize(p))


def _flatten(obj, prefix: str, out: dict, depth: int) -> None:
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _flatten(v, f"{prefix}{k}.", out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}{i}.", out, depth + 1)


# ---- duplicates ----------------------------------------------------------------------------
@dataclass
class Duplicates:
    """Duplicates found in a file; every entry says what tying would save, in bytes."""

    exact: list[dict] = field(default_factory=list)  # {"names", "dtype", "shape", "bytes_saved"}
    transposed: list[dict] = field(default_factory=list)  # {"source", "target", "shape", "bytes_saved"}
    near: list[dict] = field(default_factory=list)  # {"a", "b", "cosine", "transposed", "shape", "bytes_saved"}
    near_threshold: float | None = None
    near_bytes_saved: int = 0  # over clusters of near duplicates, each tensor saved once

    @property
    def exact_bytes_saved(self) -> int:
        return sum(d["bytes_saved"] for d in self.exact)

    @property
    def transposed_bytes_saved(self) -> int:
        return sum(d["bytes_saved"] for d in self.transposed)


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def find_duplicates(w: WeightsFile, near: float | None = None, min_numel: int = 16) -> Duplicates:
    """Exact, transposed and (with ``near``) near duplicates among a file's tensors."""
    out = Duplicates(near_threshold=near)
    names = list(w.tensors)
    exact_of: dict[str, str] = {}  # member -> first name of its exact group
    by_shape: dict[tuple, list[str]] = {}
    for n in names:
        t = w.tensors[n]
        by_shape.setdefault((t.dtype, tuple(t.shape)), []).append(n)
    for (dtype, shape), group in by_shape.items():
        if len(group) < 2 or w.nbytes(group[0]) == 0:
            continue
        for cluster in _equal_clusters(w, group):
            nb = w.nbytes(cluster[0])
            out.exact.append({
                "names": cluster, "dtype": str(dtype).replace("torch.", ""), "shape": list(shape),
                "bytes_saved": nb * (len(cluster) - 1),
            })
            for m in cluster:
                exact_of[m] = cluster[0]
    reps = [n for n in names if exact_of.get(n, n) == n]
    out.transposed = _transposed(w, reps)
    if near is not None:
        taken = {d["target"] for d in out.transposed}
        out.near, out.near_bytes_saved = _near(w, [n for n in reps if n not in taken], near, min_numel)
    return out


def _equal_clusters(w: WeightsFile, group: list[str]) -> list[list[str]]:
    """Clusters (size >= 2) of byte-identical tensors among names of one dtype and shape."""
    by_fp: dict[bytes, list[str]] = {}
    for n in group:
        d = w.data(n)
        by_fp.setdefault(bytes(d[:64]) + bytes(d[-64:]), []).append(n)
    clusters = []
    for cands in by_fp.values():
        if len(cands) < 2:
            continue
        by_hash: dict[bytes, list[str]] = {}
        for n in cands:
            by_hash.setdefault(hashlib.blake2b(w.data(n), digest_size=16).digest(), []).append(n)
        for same in by_hash.values():
            while len(same) >= 2:
                first = _u8(w.tensors[same[0]])
                equal = [m for m in same if torch.equal(_u8(w.tensors[m]), first)]
                if len(equal) >= 2:
                    clusters.append(equal)
                same = [m for m in same if m not in equal]
    return clusters


def _u8(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 tensor (so NaNs compare equal to themselves)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _t2(shape) -> tuple:
    return (shape[1], shape[0]) + tuple(shape[2:])


def _transposed(w: WeightsFile, names: Iterable[str]) -> list[dict]:
    """Pairs with ``target == source.transpose(0, 1)`` exactly (each target listed once)."""
    shapes: dict[tuple, list[str]] = {}
    for n in names:
        t = w.tensors[n]
        if t.dim() >= 2 and t.numel():
            shapes.setdefault((t.dtype, tuple(t.shape)), []).append(n)
    out, taken = [], set()
    for (dtype, shape), group in shapes.items():
        partners = shapes.get((dtype, _t2(shape)))
        if not partners:
            continue
        # fingerprint: a source's first row equals its transpose partner's first column
        cols: dict[bytes, list[str]] = {}
        for b in partners:
            cols.setdefault(bytes(tensor_bytes(w.tensors[b][:, 0])), []).append(b)
        for a in group:
            if a in taken:
                continue
            ta = w.tensors[a]
            for b in cols.get(bytes(tensor_bytes(ta[0])), []):
                if b == a or b in taken or a in taken:
                    continue
                if torch.equal(ta.transpose(0, 1), w.tensors[b]):
                    out.append({"source": a, "target": b, "dtype": _dt(ta), "shape": list(ta.shape),
                                "bytes_saved": w.nbytes(b)})
                    taken.add(b)
                    taken.add(a)
    return out


def _signs(n: int, cache: dict) -> np.ndarray:
    s = cache.get(n)
    if s is None:
        rng = np.random.default_rng(0x5EED + n)
        s = rng.integers(0, 2, n, dtype=np.int8).astype(np.float32) * 2 - 1
        cache[n] = s
    return s


def _flat(x: torch.Tensor, transpose: bool = False) -> np.ndarray:
    """A float32 numpy view (or copy) of a tensor's values, optionally transposed first."""
    t = x.detach()
    if t.dtype != torch.float32:
        t = t.to(torch.float32)
    a = t.numpy()
    if transpose:
        a = np.ascontiguousarray(np.swapaxes(a, 0, 1))
    return a.reshape(-1)


def _sketch(x: torch.Tensor, cache: dict, transpose: bool = False) -> tuple[np.ndarray, bool]:
    """(unit-norm sketch, tensor is non-zero): signed bucket sums, exact for <= 512 elements.

    NumPy, single-threaded: many small reductions are faster there than in a thread pool.
    """
    v = _flat(x, transpose)
    n = v.size
    nonzero = bool(np.any(v))
    if n > _SKETCH:
        v = v * _signs(n, cache)
        pad = -n % _SKETCH
        if pad:
            v = np.concatenate([v, np.zeros(pad, dtype=np.float32)])
        v = v.reshape(-1, _SKETCH).sum(0, dtype=np.float64)
    else:
        v = v.astype(np.float64)
    norm = float(np.sqrt(v @ v))
    return v / max(norm, 1e-30), nonzero


def _cosine(a: torch.Tensor, b: torch.Tensor, transpose_b: bool = False) -> float:
    x = _flat(a).astype(np.float64)
    y = _flat(b, transpose_b).astype(np.float64)
    den = float(np.sqrt(x @ x) * np.sqrt(y @ y))
    return float(x @ y) / den if den > 0 else 0.0


def _near(w: WeightsFile, names: list[str], thr: float, min_numel: int) -> tuple[list[dict], int]:
    """Near-duplicate pairs (cosine >= thr) and the bytes tying each cluster would save."""
    shapes: dict[tuple, list[str]] = {}
    for n in names:
        t = w.tensors[n]
        if t.dtype in _FLOAT and t.numel() >= max(2, min_numel):
            shapes.setdefault((t.dtype, tuple(t.shape)), []).append(n)
    # the slack: sketches estimate 1 - cos with a relative error of about sqrt(2 / 512) = 6%
    loose = 1.0 - min(1.0, (1.0 - thr) * 1.6 + 0.02)
    cache: dict[int, torch.Tensor] = {}
    pairs: list[dict] = []
    done_cross: set[frozenset] = set()
    for (dtype, shape), group in shapes.items():
        tgroup = shapes.get((dtype, _t2(shape))) if len(shape) >= 2 else None
        need_cross = tgroup is not None and frozenset((shape, _t2(shape))) not in done_cross
        if len(group) < 2 and not need_cross:
            continue
        sketches = [_sketch(w.tensors[n], cache) for n in group]
        sk = np.stack([s for s, _ in sketches])
        ok = np.array([nz for _, nz in sketches])
        if len(group) >= 2:
            hits = np.triu((sk @ sk.T >= loose) & ok[:, None] & ok[None, :], k=1)
            for i, j in np.argwhere(hits).tolist():
                c = _cosine(w.tensors[group[i]], w.tensors[group[j]])
                if c >= thr:
                    pairs.append(_pair(w, group[i], group[j], c, False))
        if need_cross:
            done_cross.add(frozenset((shape, _t2(shape))))
            tsketches = [_sketch(w.tensors[n], cache, transpose=True) for n in tgroup]
            tsk = np.stack([s for s, _ in tsketches])
            tok = np.array([nz for _, nz in tsketches])
            hits = (sk @ tsk.T >= loose) & ok[:, None] & tok[None, :]
            if shape == _t2(shape):
                hits = np.triu(hits, k=1)  # square: each unordered pair once, never itself
            for i, j in np.argwhere(hits).tolist():
                b = tgroup[j]
                c = _cosine(w.tensors[group[i]], w.tensors[b], transpose_b=True)
                if c >= thr:
                    pairs.append(_pair(w, group[i], b, c, True))
        cache.clear()
    pairs.sort(key=lambda d: (-d["bytes_saved"], -d["cosine"], d["a"], d["b"]))
    # bytes over connected clusters: a cluster of k tensors stores one
    parent: dict[str, str] = {}

    def find(x):
        while parent.get(x, x) != x:
            x = parent[x]
        return x

    for d in pairs:
        ra, rb = find(d["a"]), find(d["b"])
        if ra != rb:
            parent[rb] = ra
    members: dict[str, list[str]] = {}
    for n in {x for d in pairs for x in (d["a"], d["b"])}:
        members.setdefault(find(n), []).append(n)
    saved = sum(w.nbytes(ms[0]) * (len(ms) - 1) for ms in members.values())
    return pairs, saved


def _pair(w: WeightsFile, a: str, b: str, c: float, transposed: bool) -> dict:
    t = w.tensors[a]
    return {"a": a, "b": b, "cosine": round(c, 6), "transposed": transposed, "dtype": _dt(t),
            "shape": list(t.shape), "bytes_saved": w.nbytes(b)}
