"""Sharing-aware checkpoints: ``save``, ``load``, ``read`` and the on-disk format.

A paramshare checkpoint is a standard safetensors file:

* one tensor per *stored* tensor, written once however many uses share it. Each tie group's
  tensors come from its kind's :meth:`~paramshare.Kind.stored` hook (for ``alias`` and
  ``transpose``: the source parameter under the source's name); every other parameter and
  persistent buffer is written under its ``state_dict`` name;
* metadata: ``paramshare.format`` (the format version, ``"1"``), ``paramshare.plan`` (the
  :class:`~paramshare.SharingPlan` as compact JSON: ``{"alias": [[source, member, ...], ...],
  "groups": [...]}``, the leading alias groups as bare name lists whose shape is their file
  tensor's, the others as :meth:`~paramshare.SharingPlan.to_dict` writes them; a plan in that
  full form is read too), ``paramshare.aliases`` when buffers outside any
  tie group share memory (JSON ``{name: stored name}``; :func:`load` ties the names that are
  plain parameters of the model, and gives buffers the value), ``paramshare.encoding`` when
  ``compress=True`` entropy-coded integer tensors (JSON ``{name: {codec, dtype, shape}}``), and
  the user's own string metadata.

So the file opens with plain ``safetensors`` (``load_file``, ``safe_open``), its size is the
stored bytes plus the header, and :func:`load` re-imposes the plan on a model built untied.
The data is laid out small tensors first (within each element size), so offsets are short:
with the plan included the header is no larger than ``safetensors.torch.save_model``'s.
Checkpoint code calls kinds only through ``stored``, ``owned`` and ``restore``, so kinds
added later work unchanged.
"""

from __future__ import annotations

import copy
import json
import lzma
import os
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from . import distributed as _distributed
from ._index import ModelIndex
from ._stfile import DTYPES, SafetensorsFile, dtype_code, open_file, tensor_bytes, write_file
from .errors import CheckpointError, SharingError
from .kinds._common import fmt_shape, view_key
from .plans import Kind, SharingPlan, TieGroup, get_kind, kind_names

__all__ = ["save", "load", "read", "LoadResult", "Checkpoint", "FORMAT_VERSION"]

#: Version of the on-disk layout written by :func:`save`.
FORMAT_VERSION = 1
FORMAT_KEY = "paramshare.format"
PLAN_KEY = "paramshare.plan"
ALIASES_KEY = "paramshare.aliases"
ENCODING_KEY = "paramshare.encoding"
_RESERVED = "paramshare."
_CODECS = ("zlib", "lzma")
_INT_DTYPES = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool}
for _a in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _a):
        _INT_DTYPES.add(getattr(torch, _a))


class LoadResult(NamedTuple):
    """What :func:`load` could not match, like ``load_state_dict``'s result.

    Attributes:
        missing: names the model has that the file does not provide.
        unexpected: names in the file that the model does not use.
    """

    missing: list[str]
    unexpected: list[str]


@dataclass
class Checkpoint:
    """The contents of a checkpoint file, as :func:`read` returns them.

    Attributes:
        path: the file.
        tensors: name -> tensor in stored form (one entry per stored tensor; compressed
            tensors decoded to their dtype and shape).
        plan: the sharing plan (None for a file paramshare did not write).
        metadata: the user's metadata (for other files: all of the header's metadata).
        aliases: names stored under another name (``paramshare.aliases``, or the alias
            metadata ``safetensors.torch.save_model`` writes), name -> stored name.
        format: the paramshare format version, None for other files.
        encoding: how compressed tensors are coded, name -> {codec, dtype, shape}.
        header_bytes: bytes before the tensor data (length prefix and JSON header).
        file_bytes: size of the file.
    """

    path: str
    tensors: dict[str, torch.Tensor]
    plan: SharingPlan | None
    metadata: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    format: int | None = None
    encoding: dict[str, dict] = field(default_factory=dict)
    header_bytes: int = 0
    file_bytes: int = 0

    def __repr__(self) -> str:
        plan = "no plan" if self.plan is None else f"plan of {len(self.plan)} group{'s' if len(self.plan) != 1 else ''}"
        return (
            f"Checkpoint({self.path!r}, {len(self.tensors)} tensor{'s' if len(self.tensors) != 1 else ''}, "
            f"{self.stored_bytes} bytes, {plan}, metadata={self.metadata!r})"
        )

    @property
    def stored_bytes(self) -> int:
        """Bytes of the tensors in their stored form (decoded when compressed)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---- the file's metadata --------------------------------------------------------------------
@dataclass
class _Parsed:
    file: SafetensorsFile
    plan: SharingPlan | None
    fmt: int | None
    aliases: dict[str, str]
    encoding: dict[str, dict]
    user: dict[str, str]


def _parse(path) -> _Parsed:
    f = open_file(path)
    p = f.path
    meta = f.metadata
    if FORMAT_KEY not in meta:
        for k in (PLAN_KEY, ALIASES_KEY, ENCODING_KEY):
            if k in meta:
                raise CheckpointError(f"{p}: metadata has {k!r} but no {FORMAT_KEY!r}; the file is corrupt")
        aliases = {
            k: v for k, v in meta.items()
            if k != "format" and k not in f.entries and v in f.entries and not k.startswith(_RESERVED)
        }
        return _Parsed(f, None, None, aliases, {}, dict(meta))
    raw = meta[FORMAT_KEY]
    if not raw.isdigit() or len(raw) > 6:
        raise CheckpointError(f"{p}: {FORMAT_KEY!r} is {raw!r}, not a version number; the file is corrupt")
    fmt = int(raw)
    if fmt < 1:
        raise CheckpointError(f"{p}: {FORMAT_KEY!r} is {raw!r}, not a valid version")
    if fmt > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: written in paramshare checkpoint format {fmt}, newer than this paramshare reads ({FORMAT_VERSION}); "
            "upgrade paramshare"
        )
    if PLAN_KEY not in meta:
        raise CheckpointError(f"{p}: a paramshare checkpoint without {PLAN_KEY!r} metadata; the file is corrupt")
    encoding = _json_meta(p, meta, ENCODING_KEY)
    for name, spec in encoding.items():
        _check_encoding(p, f, name, spec)

    def shape_of(name):
        if name in encoding:
            return tuple(encoding[name]["shape"])
        e = f.entries.get(name)
        return None if e is None else e.shape

    plan = _plan_from_text(p, meta[PLAN_KEY], shape_of)
    aliases = _json_meta(p, meta, ALIASES_KEY)
    for k, v in aliases.items():
        if not isinstance(v, str) or v not in f.entries:
            raise CheckpointError(f"{p}: alias {k!r} points at {v!r}, which is not a tensor in the file")
        if k in f.entries:
            raise CheckpointError(f"{p}: {k!r} is both a tensor and an alias of {v!r} in the file")
    user = {k: v for k, v in meta.items() if not k.startswith(_RESERVED)}
    parsed = _Parsed(f, plan, fmt, aliases, encoding, user)
    _check_plan_against_file(parsed)
    return parsed


def _json_meta(p: str, meta: Mapping[str, str], key: str) -> dict:
    if key not in meta:
        return {}
    try:
        obj = json.loads(meta[key])
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: metadata {key!r} is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p}: metadata {key!r} must be a JSON object, got {type(obj).__name__}")
    return obj


def _check_encoding(p: str, f: SafetensorsFile, name: str, spec) -> None:
    e = f.entries.get(name)
    if e is None:
        raise CheckpointError(f"{p}: metadata {ENCODING_KEY!r} describes {name!r}, which is not a tensor in the file")
    if e.code != "U8" or len(e.shape) != 1:
        raise CheckpointError(f"{p}: compressed tensor {name!r} must be stored as 1-D U8, but it is {e.code} {e.shape}")
    if not isinstance(spec, dict) or set(spec) != {"codec", "dtype", "shape"}:
        raise CheckpointError(f"{p}: the encoding of {name!r} must have exactly codec, dtype and shape, got {spec!r}")
    if spec["codec"] not in _CODECS:
        raise CheckpointError(f"{p}: tensor {name!r} uses codec {spec['codec']!r}; this paramshare knows {', '.join(_CODECS)}")
    code = spec["dtype"]
    if not isinstance(code, str) or code not in DTYPES or DTYPES[code] not in _INT_DTYPES:
        raise CheckpointError(f"{p}: compressed tensor {name!r} has dtype {code!r}; only integer dtypes are compressed")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise CheckpointError(f"{p}: compressed tensor {name!r} has an invalid shape {shape!r}")


def _check_plan_against_file(parsed: _Parsed) -> None:
    """For kinds that store their source under its own name: the file has it, with the plan's shape."""
    p, f = parsed.file.path, parsed.file
    for g in parsed.plan or ():
        kind = get_kind(g.kind)
        if type(kind).stored is not Kind.stored:
            continue  # the kind's own restore checks its file form at load time
        e = f.entries.get(g.source)
        if e is None:
            raise CheckpointError(f"{p}: the plan's {g.kind} group of {g.source!r} has no tensor {g.source!r} in the file")
        shape = tuple(parsed.encoding[g.source]["shape"]) if g.source in parsed.encoding else e.shape
        if g.shape is not None and tuple(shape) != tuple(g.shape):
            raise CheckpointError(
                f"{p}: the plan says {g.source!r} has shape {fmt_shape(g.shape)} but the file's tensor has {fmt_shape(shape)}"
            )


def _decode(p: str, f: SafetensorsFile, name: str, spec: dict) -> torch.Tensor:
    dtype = DTYPES[spec["dtype"]]
    shape = tuple(spec["shape"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = 1
    for s in shape:
        n *= s
    want = n * itemsize
    data = f.raw(name)
    try:
        if spec["codec"] == "zlib":
            d = zlib.decompressobj()
            out = d.decompress(data, want)
            ok = d.eof and not d.unconsumed_tail and not d.unused_data
        else:
            d = lzma.LZMADecompressor()
            out = d.decompress(data, max_length=want)
            ok = d.eof and not d.unused_data
    except (zlib.error, lzma.LZMAError, EOFError) as e:
        raise CheckpointError(f"{p}: compressed tensor {name!r} is corrupt ({spec['codec']}: {e})") from None
    if not ok or len(out) != want:
        raise CheckpointError(
            f"{p}: compressed tensor {name!r} does not decode to {spec['dtype']} {shape} ({want} bytes); the file is corrupt"
        )
    if want == 0:
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(bytearray(out), dtype=torch.uint8)
    if dtype == torch.bool and bool((t > 1).any()):
        raise CheckpointError(f"{p}: compressed tensor {name!r} is BOOL but holds bytes other than 0 and 1")
    return t.view(dtype).reshape(shape)


class _FileTensors(Mapping):
    """The file's tensors in stored form, decoded on first access (views of the file otherwise)."""

    def __init__(self, parsed: _Parsed, copy: bool = False):
        self._p = parsed
        self._copy = copy
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self._cache.get(name)
        if t is None:
            f = self._p.file
            if name not in f.entries:
                raise KeyError(name)
            spec = self._p.encoding.get(name)
            t = _decode(f.path, f, name, spec) if spec is not None else f.tensor(name, copy=self._copy)
            self._cache[name] = t
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._p.file.entries)

    def __len__(self) -> int:
        return len(self._p.file.entries)

    def __contains__(self, name) -> bool:
        return name in self._p.file.entries

    def shape(self, name: str) -> tuple[int, ...]:
        spec = self._p.encoding.get(name)
        return tuple(spec["shape"]) if spec is not None else self._p.file.entries[name].shape


class _Tracked(Mapping):
    """A view of the file's tensors that remembers which names a kind looked up."""

    def __init__(self, inner: Mapping):
        self.inner = inner
        self.seen: set[str] = set()

    def __getitem__(self, name):
        self.seen.add(name)
        return self.inner[name]

    def __contains__(self, name) -> bool:
        self.seen.add(name)
        return name in self.inner

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


# ---- public API -----------------------------------------------------------------------------
def read(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint (or any safetensors file) without a model.

    Args:
        path: the file.

    Returns:
        A :class:`Checkpoint`: tensors in stored form (independent of the file), the plan
        (None for files paramshare did not write), the user's metadata.

    Raises:
        CheckpointError: a missing path, a directory, a truncated or corrupt file, an invalid
            plan or a kind this version does not know.

    Example:
        >>> import os, tempfile, torch.nn as nn, paramshare as ps
        >>> m = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> ps.save(m, path, metadata={"run": "1"})
        >>> ck = ps.read(path)
        >>> sorted(ck.tensors), len(ck.plan), ck.metadata
        (['0.bias', '0.weight', '1.bias'], 1, {'run': '1'})
    """
    parsed = _parse(path)
    tensors = _FileTensors(parsed, copy=True)
    return Checkpoint(
        path=parsed.file.path,
        tensors={name: tensors[name] for name in parsed.file.entries},
        plan=parsed.plan,
        metadata=dict(parsed.user),
        aliases=dict(parsed.aliases),
        format=parsed.fmt,
        encoding={k: dict(v) for k, v in parsed.encoding.items()},
        header_bytes=parsed.file.header_bytes,
        file_bytes=parsed.file.size,
    )


def save(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    compress: bool = False,
) -> None:
    """Save a model's stored tensors, once each, with its sharing plan, as a safetensors file.

    Every stored tensor is written once (a tied embedding and output layer: one tensor), so
    the file is the unique bytes plus a header. The write is atomic: an error or a crash
    mid-save leaves any existing file at ``path`` intact and no stray temporary file.

    Args:
        model: the model (not changed).
        path: the file to write (its folder must exist).
        metadata: your own string metadata, stored in the header (keys must not start with
            ``"paramshare."``).
        compress: entropy-code integer tensors (e.g. packed codebook indices) with zlib or lzma,
            whichever is smaller; a tensor that does not shrink stays raw. Such tensors are
            stored as 1-D uint8 and decoded by :func:`load` and :func:`read`.

    Returns:
        None.

    Raises:
        CheckpointError: a bad path or metadata, tensors that safetensors cannot store (meta
            tensors, non-tensor extra state), an OS error while writing.

    Example:
        >>> import os, tempfile, torch.nn as nn, paramshare as ps
        >>> lm = nn.ModuleDict({"embed": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
        >>> lm = ps.tie(lm, "embed.weight", "head.weight")
        >>> path = os.path.join(tempfile.mkdtemp(), "lm.safetensors")
        >>> ps.save(lm, path)
        >>> os.path.getsize(path) - ps.read(path).header_bytes == 100 * 16 * 4  # stored once
        True
    """
    if not isinstance(compress, bool):
        raise CheckpointError(f"compress must be True or False, got {compress!r}")
    user = _check_metadata(metadata)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"ps.save needs an nn.Module, got {type(model).__name__}")
    if _distributed.gathers(model):  # FSDP2-sharded: gathered on every rank, rank 0 writes
        return _distributed.save(model, path, metadata=metadata, compress=compress)
    entries, plan, aliases = _collect(model)
    meta = {FORMAT_KEY: str(FORMAT_VERSION), PLAN_KEY: _plan_json(plan, entries)}
    if aliases:
        meta[ALIASES_KEY] = json.dumps(aliases, separators=(",", ":"))
    if compress:
        encoding = {}
        for name, t in list(entries.items()):
            coded = _encode(t)
            if coded is not None:
                entries[name], encoding[name] = coded
        if encoding:
            meta[ENCODING_KEY] = json.dumps(encoding, separators=(",", ":"))
    meta.update(user)
    write_file(path, entries.items(), meta)


def _plan_json(plan: SharingPlan, tensors: Mapping[str, torch.Tensor]) -> str:
    """The plan in its file form: compact JSON that the file's own tensors complete.

    ``format`` and a version 1 are implied by the metadata key. The leading alias groups whose
    source is their first member and is stored under its own name (``tensors``: the file's
    tensors by name) are written as bare name lists, ``{"alias": [[source, member, ...], ...]}``:
    their kind, source and shape follow from the list and the file. The other groups follow
    under ``"groups"`` as :meth:`SharingPlan.to_dict` writes them. :func:`_plan_from_text`
    reads both forms back into the same plan.
    """
    def implied(g: TieGroup) -> bool:  # the name list and the file say all there is
        return (g.kind == "alias" and g.members[0] == g.source and not g.options
                and g.source in tensors and tuple(tensors[g.source].shape) == g.shape)

    groups = list(plan.groups)
    n_short = next((i for i, g in enumerate(groups) if not implied(g)), len(groups))
    out: dict[str, object] = {} if plan.version == 1 else {"version": plan.version}
    if n_short:
        out["alias"] = [list(g.members) for g in groups[:n_short]]
    if groups[n_short:]:
        out["groups"] = [g.to_dict() for g in groups[n_short:]]
    return json.dumps(out, separators=(",", ":"))


def _plan_from_text(p: str, text: str, shape_of) -> SharingPlan:
    """The plan of a file's ``paramshare.plan`` text (:func:`_plan_json`'s form or a full plan).

    ``shape_of(name)`` is the shape of the file's tensor ``name`` (None when there is none).
    """
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{p}: the sharing plan in the file is invalid: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: the sharing plan in the file is invalid: a JSON object is needed, got {type(d).__name__}")
    short = d.pop("alias", [])
    if not isinstance(short, list) or not all(
        isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) and n for n in names) for names in short
    ):
        raise CheckpointError(f"{p}: the sharing plan in the file is invalid: 'alias' must list lists of two or more names")
    groups = []
    for names in short:
        shape = shape_of(names[0])
        if shape is None:
            raise CheckpointError(f"{p}: the plan's alias group of {names[0]!r} has no tensor {names[0]!r} in the file")
        groups.append({"kind": "alias", "source": names[0], "members": names, "shape": list(shape)})
    rest = d.get("groups", [])
    if isinstance(rest, list):  # otherwise from_dict names the problem
        d["groups"] = groups + rest
    try:
        return SharingPlan.from_dict(d)
    except SharingError as e:
        raise CheckpointError(f"{p}: the sharing plan in the file is invalid: {e}") from None


def _check_metadata(metadata) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"metadata must be a dict of strings, got {type(metadata).__name__}")
    bad = [(k, v) for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        k, v = bad[0]
        raise CheckpointError(
            f"metadata must map strings to strings; {k!r}: {v!r} is {type(k).__name__}: {type(v).__name__} "
            "(convert values with str() or json.dumps)"
        )
    reserved = sorted(k for k in metadata if k.startswith(_RESERVED))
    if reserved:
        raise CheckpointError(f"metadata keys starting with {_RESERVED!r} are reserved for paramshare: {reserved}; rename them")
    return dict(metadata)


def _encode(t: torch.Tensor):
    """(uint8 tensor, spec) when entropy coding shrinks an integer tensor, else None."""
    if t.dtype not in _INT_DTYPES or t.numel() == 0:
        return None
    raw = bytes(tensor_bytes(t))
    best = min(
        ((zlib.compress(raw, 6), "zlib"), (lzma.compress(raw, preset=6), "lzma")),
        key=lambda x: len(x[0]),
    )
    if len(best[0]) >= len(raw):
        return None
    data = torch.frombuffer(bytearray(best[0]), dtype=torch.uint8)
    return data, {"codec": best[1], "dtype": dtype_code(t.dtype), "shape": list(t.shape)}


def _member_prefixes(groups) -> tuple[str, ...]:
    out = []
    for g in groups:
        for m in g.members:
            mod, _, attr = m.rpartition(".")
            out.append(f"{mod}.parametrizations.{attr}." if mod else f"parametrizations.{attr}.")
    return tuple(out)


def _covered(name: str, names: set[str], prefixes: tuple[str, ...]) -> bool:
    return name in names or name.startswith(prefixes)


def _collect(model: nn.Module) -> tuple[dict[str, torch.Tensor], SharingPlan, dict[str, str]]:
    """The file's tensors (stored form, deterministic names), the plan, and buffer aliases."""
    from .tying import _find

    index = ModelIndex(model)
    groups = _find(index)
    entries: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    owned: set[int] = set()
    for g in groups:
        kind = get_kind(g.kind)
        for name, t in kind.stored(index, g).items():
            where = f"the {g.kind} group of {g.source!r}"
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{where} stores {name!r} as a {type(t).__name__}, not a tensor")
            prev = entries.get(name)
            if prev is not None:
                if prev is t or view_key(prev) == view_key(t):
                    continue
                raise CheckpointError(f"{where} and {origin[name]} both store a tensor called {name!r}")
            entries[name] = t
            origin[name] = where
        owned.update(id(t) for t in kind.owned(index, g))
    names = {n for g in groups for n in (*g.members, g.source)}
    prefixes = _member_prefixes(groups)
    aliases: dict[str, str] = {}
    first_by_view: dict[object, str] = {}
    for name, t in index.state_entries().items():
        if _covered(name, names, prefixes) or (isinstance(t, torch.Tensor) and id(t) in owned):
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(
                f"cannot save {name!r}: it is a {type(t).__name__}, not a tensor (extra state from get_extra_state); "
                "a safetensors checkpoint holds tensors only"
            )
        if name in entries:
            raise CheckpointError(f"{name!r} is both a state_dict entry and a tensor that {origin[name]} stores")
        key = view_key(t)
        if key in first_by_view:
            aliases[name] = first_by_view[key]
            continue
        first_by_view[key] = name
        entries[name] = t
        origin[name] = "the state_dict"
    for name, t in entries.items():
        if t.is_meta:
            raise CheckpointError(
                f"cannot save {name!r}: it is on the meta device and holds no values; "
                "materialise the model first (model.to_empty(device='cpu') and load its weights)"
            )
        if t.layout != torch.strided:
            raise CheckpointError(f"cannot save {name!r}: {t.layout} tensors are not supported; convert it with .to_dense()")
        dtype_code(t.dtype)
    return entries, SharingPlan(tuple(groups)), aliases


def load(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> LoadResult:
    """Load a checkpoint into a model, restoring its ties, even into a model built untied.

    The whole file and its plan are checked against the model before anything changes;
    then the file's plan is imposed (as :func:`paramshare.apply_plan` does) and the values are
    copied in (converted to the model's dtype and device). Also loads files written by
    ``safetensors.torch.save_model`` (their alias metadata ties the named parameters again)
    and plain safetensors state dicts (values only; ties the model already has are kept).

    Args:
        model: the model (changed in place).
        path: the file.
        strict: raise when names are missing from the file or unexpected in it; with
            ``strict=False`` they are returned and the rest is loaded.

    Returns:
        ``LoadResult(missing, unexpected)``.

    Raises:
        CheckpointError: an unreadable or corrupt file, a plan that does not fit the model
            (unknown names, shapes, kinds), tensors of the wrong shape, missing or unexpected
            names when ``strict``. The model is then exactly as it was.

    Example:
        >>> import os, tempfile, torch.nn as nn, paramshare as ps
        >>> make = lambda: nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 8))
        >>> path = os.path.join(tempfile.mkdtemp(), "ae.safetensors")
        >>> ps.save(ps.tie(make(), "0.weight", "2.weight", transpose=True), path)
        >>> fresh = make()                      # built untied
        >>> ps.load(fresh, path)
        LoadResult(missing=[], unexpected=[])
        >>> ps.find_ties(fresh)[0].kind
        'transpose'
    """
    if not isinstance(strict, bool):
        raise CheckpointError(f"strict must be True or False, got {strict!r}")
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"ps.load needs an nn.Module, got {type(model).__name__}")
    if _distributed.gathers(model):  # FSDP2-sharded: every rank loads the full tensors, keeps its shard
        return _distributed.load(model, path, strict=strict)
    parsed = _parse(path)
    p = parsed.file.path
    what = f"cannot load {p!r} into {type(model).__name__}"
    tensors = _FileTensors(parsed)
    index = ModelIndex(model)
    groups = list(parsed.plan or ()) + _groups_from_aliases(index, parsed)

    # 1. the plan against the model, as it is
    problems = _plan_problems(index, groups)
    if problems:
        raise CheckpointError(f"{what}: the file's sharing plan does not fit the model:\n  - " + "\n  - ".join(problems))

    # 2. the groups' tensors, checked by each kind against the model with the plan installed
    installed = [not get_kind(g.kind).check(index, g) for g in groups]
    tracked = _Tracked(tensors)
    if all(installed):
        target = index
    else:
        trial = _trial_copy(model, index, groups, what)
        try:
            _install(trial, groups)
        except Exception as e:  # the model itself is untouched
            raise CheckpointError(
                f"{what}: installing the file's sharing plan on a trial copy failed ({type(e).__name__}: {e}); "
                "impose the plan first (ps.apply_plan(model, ps.read(path).plan)) and load again"
            ) from None
        target = ModelIndex(trial)
    try:
        for g in groups:
            problems += get_kind(g.kind).restore(target, g, tracked, False)
    except CheckpointError:
        raise
    except Exception as e:  # a kind that cannot read this file's form for its group
        raise CheckpointError(f"{what}: checking the file's tensors failed: {type(e).__name__}: {e}") from None
    claimed = set(tracked.seen) & set(tensors)

    # 3. everything else: parameters and persistent buffers outside the groups, by state_dict name
    copies, missing, consumed, rest_problems = _match_rest(model, index, groups, installed, parsed, tensors)
    problems += rest_problems
    if problems:
        raise CheckpointError(f"{what}:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    unexpected = [n for n in parsed.file.entries if n not in claimed and n not in consumed]
    in_groups = {n for g in groups for n in g.members}
    unexpected += [a for a in parsed.aliases if a not in consumed and a not in in_groups]
    if strict and (missing or unexpected):
        msg = f"Error(s) in loading {p!r} into {type(model).__name__}:"
        if missing:
            msg += "\n    Missing key(s) in the file: " + ", ".join(f'"{k}"' for k in missing) + "."
        if unexpected:
            msg += "\n    Unexpected key(s) in the file: " + ", ".join(f'"{k}"' for k in unexpected) + "."
            hint = [n for n in unexpected if n in index.uses and any(n in g.members for g in _model_ties(index))]
            if hint:
                msg += f"\n    The model ties {', '.join(map(repr, hint))}, the file does not: ps.untie them first."
        msg += "\n    Pass strict=False to load the rest and get these names back in the LoadResult."
        raise CheckpointError(msg)

    # 4. change the model: impose the plan, then copy values in
    if groups and not all(installed):
        _install(model, groups)
        index = ModelIndex(model)
    with torch.no_grad():
        for g in groups:
            late = get_kind(g.kind).restore(index, g, tensors, True)
            if late:
                raise CheckpointError(
                    f"{what}: the {g.kind} kind accepted the file's tensors on a trial copy but not on the model "
                    f"(the model is partly loaded): {'; '.join(late)}"
                )
        for t, fname in copies:
            src = tensors[fname]
            t.copy_(src.to(device=t.device, dtype=t.dtype) if (src.dtype != t.dtype or src.device != t.device) else src)
    return LoadResult(missing, unexpected)


# ---- load internals -------------------------------------------------------------------------
def _model_ties(index: ModelIndex) -> list[TieGroup]:
    from .tying import _find

    return _find(index)


def _groups_from_aliases(index: ModelIndex, parsed: _Parsed) -> list[TieGroup]:
    """Alias groups for parameters the file stores once under another name.

    The alias metadata of ``safetensors.torch.save_model`` (removed name -> kept name) and
    ``paramshare.aliases`` say these names held one tensor: the ones that are plain
    parameters of the model (and in no group of the file's plan) are tied again; buffers
    just get the value.
    """
    if not parsed.aliases:
        return []
    in_plan = {m for g in parsed.plan or () for m in g.members}
    by_kept: dict[str, list[str]] = {}
    for removed, kept in parsed.aliases.items():
        by_kept.setdefault(kept, [kept]).append(removed)
    groups = []
    for kept, names in by_kept.items():
        uses = [n for n in names if n in index.uses and not index.uses[n].derived and n not in in_plan]
        if kept not in uses or len(uses) < 2:
            continue
        uses.sort(key=index.position)
        spec = parsed.encoding.get(kept)
        shape = tuple(spec["shape"]) if spec is not None else parsed.file.entries[kept].shape
        groups.append(TieGroup("alias", kept, tuple(uses), shape))
    return groups


def _plan_problems(index: ModelIndex, groups: list[TieGroup]) -> list[str]:
    problems: list[str] = []
    owner: dict[str, TieGroup] = {}
    for g in groups:
        problems += get_kind(g.kind).validate(index, g)
        for m in g.members:
            if m in owner and not (owner[m].kind == g.kind == "alias" and m == g.source):
                problems.append(f"{m!r} is a member of two groups ({owner[m]}) and ({g})")
            owner.setdefault(m, g)
    return list(dict.fromkeys(problems))


def _install(model: nn.Module, groups: list[TieGroup]) -> None:
    order = {name: i for i, name in enumerate(kind_names())}
    for kind_name in sorted({g.kind for g in groups}, key=order.__getitem__):
        kind = get_kind(kind_name)
        index = ModelIndex(model)
        for g in groups:
            if g.kind == kind_name:
                kind.install(index, g)


def _host(index: ModelIndex, name: str) -> str | None:
    mod = name.rpartition(".")[0]
    while True:
        if mod in index.modules:
            return mod
        if not mod:
            return None
        mod = mod.rpartition(".")[0]


def _trial_copy(model: nn.Module, index: ModelIndex, groups: list[TieGroup], what: str) -> nn.Module:
    """A copy of the model to install the plan on, sharing or copying only what installation reads.

    Tensors in modules that hold members or sources of kinds that only re-point uses
    (``shares_backing``: alias, transpose; their installation never writes into a tensor)
    are shared with the model; those of other kinds' modules are copied; every other
    tensor becomes a meta tensor (no memory).
    """
    def tensors_of(names) -> set[int]:
        out: set[int] = set()
        for n in names:
            h = _host(index, n)
            if h is not None:
                m = index.modules[h]
                out.update(id(t) for t in m.parameters())
                out.update(id(t) for t in m.buffers())
        return out

    pointer = [g for g in groups if get_kind(g.kind).shares_backing]
    other = [g for g in groups if not get_kind(g.kind).shares_backing]
    copied = tensors_of(n for g in other for n in (*g.members, g.source))
    shared = tensors_of(n for g in pointer for n in (*g.members, g.source)) - copied
    memo: dict[int, object] = {}
    for _, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        if id(t) in copied or id(t) in memo:
            continue
        if id(t) in shared:
            memo[id(t)] = t
            continue
        ghost = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(ghost, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else ghost
    try:
        return copy.deepcopy(model, memo)
    except Exception as e:
        raise CheckpointError(
            f"{what}: the model cannot be copied to check the file against its plan ({type(e).__name__}: {e}); "
            "impose the plan first (ps.apply_plan(model, ps.read(path).plan)) and load again"
        ) from None


def _match_rest(model, index, groups, installed, parsed: _Parsed, tensors: _FileTensors):
    """Copies (model tensor, file name) for state entries outside the groups; missing names; problems."""
    owned: set[int] = set()
    for g, ok in zip(groups, installed):
        kind = get_kind(g.kind)
        if ok or type(kind).owned is Kind.owned:
            owned.update(id(t) for t in kind.owned(index, g) if t is not None)
    names = {n for g in groups for n in (*g.members, g.source)}
    prefixes = _member_prefixes(groups)
    buckets: dict[object, list[tuple[str, torch.Tensor]]] = {}
    for name, t in index.state_entries().items():
        if _covered(name, names, prefixes) or not isinstance(t, torch.Tensor) or id(t) in owned:
            continue
        buckets.setdefault(view_key(t), []).append((name, t))
    copies, missing, problems = [], [], []
    consumed: set[str] = set()
    for items in buckets.values():
        found = []
        for name, _ in items:
            fname = name if name in tensors else parsed.aliases.get(name)
            if fname is not None and fname in tensors:
                found.append((name, fname))
        if not found:
            missing += [n for n, _ in items]
            continue
        t = items[0][1]
        if t.is_meta:
            problems.append(
                f"{items[0][0]!r} is on the meta device; materialise the model first (model.to_empty(device='cpu'))"
            )
            continue
        ok = True
        for name, fname in found:
            consumed.update((name, fname))
            if tensors.shape(fname) != tuple(t.shape):
                problems.append(
                    f"size mismatch for {name!r}: the file has shape {fmt_shape(tensors.shape(fname))}, "
                    f"the model {fmt_shape(t.shape)}"
                )
                ok = False
        if not ok:
            continue
        distinct = list(dict.fromkeys(f for _, f in found))
        first = tensors[distinct[0]]
        for other in distinct[1:]:
            if not torch.equal(first, tensors[other]):
                names_ = ", ".join(repr(n) for n, _ in found)
                problems.append(
                    f"the file holds different values for {names_}, which the model stores as one tensor; "
                    f"untie them (ps.untie(model, {found[1][0]!r})) to load both"
                )
                ok = False
                break
        if ok:
            copies.append((t, distinct[0]))
    return copies, missing, consumed, problems
