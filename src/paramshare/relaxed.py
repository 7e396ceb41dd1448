"""Relaxed cross-layer sharing: shared weights plus small per-use low-rank deltas.

``convert_to_shared`` turns N pretrained layers into M shared ones (the strategies of
:func:`paramshare.share_layers`) and remembers each layer's original weights;
``relax`` (Relaxed Recursive Transformers, Bae et al. 2024) gives every use of a shared
weight its own rank-r delta ``B @ A`` (the ``delta`` kind), initialised from what sharing
lost.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from ._index import ModelIndex, Use
from ._parametrize import set_derived
from .bank import _check_int
from .errors import SharingError, did_you_mean
from .kinds._common import fmt_shape
from .kinds.delta import Delta, delta_factors
from .layers import layer_assignment, share_layers
from .plans import get_kind

__all__ = ["relax", "convert_to_shared"]

#: module -> {attr: the weight it had before convert_to_shared}; read (and dropped) by relax.
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()

RELAX_INITS = ("svd", "zeros")
CONVERT_INITS = ("mean", "first", "svd")


def _full_rank(shape) -> int:
    return min(int(shape[0]), int(math.prod(shape[1:])))


def _aliased_uses(index: ModelIndex) -> dict[str, Use]:
    """Uses that are members of an alias group (the same stored parameter as another use)."""
    out = {}
    for g in get_kind("alias").find(index):
        for m in g.members:
            out[m] = index.uses[m]
    return out


def relax(model: nn.Module, rank: int, names: str | Sequence[str] | None = None, init: str = "svd") -> nn.Module:
    """Give every use of a shared (aliased) weight its own low-rank delta.

    Each selected use reads ``shared + B @ A`` with its own ``A`` ``(rank, in)`` and ``B``
    ``(out, rank)`` (the ``delta`` kind); the shared weight stays stored once. Weights of one
    dimension (biases, norms) cannot take a low-rank delta and stay shared.

    Args:
        model: the module (changed in place).
        rank: the rank r of each delta, between 1 and the weight's smaller dimension.
        names: uses to relax: dotted names or glob patterns (``"blocks.*.fc1.weight"``); None
            relaxes every shared weight of two or more dimensions (tied embeddings included).
        init: ``"svd"`` sets each delta to the rank-r truncated SVD of (that use's original
            weight - the shared weight) when :func:`convert_to_shared` recorded the original,
            else to zero; ``"zeros"`` always starts at zero. A zero delta has ``B = 0`` and a
            small random ``A``, as in LoRA, so the outputs are unchanged and it still trains.

    Returns:
        ``model``.

    Raises:
        SharingError: a bad rank (too large for a weight: the sizes are shown), a name that
            matches nothing or a use that is not shared, a model with nothing shared. The
            model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> stack = ps.share_layers(nn.ModuleList(nn.Linear(64, 64) for _ in range(4)), unique=1, strategy="all")
        >>> stack = ps.relax(stack, rank=4)
        >>> ps.report(stack).unique_params  # one 64x64 weight + one bias + 4 deltas of 4*(64+64)
        6208
    """
    _check_int(rank, "rank", 1, None)
    if init not in RELAX_INITS:
        raise SharingError(f"init must be one of {', '.join(map(repr, RELAX_INITS))}, got {init!r}")
    index = ModelIndex(model)
    shared = _aliased_uses(index)
    if names is None:
        targets = [u for u in shared.values() if u.param.dim() >= 2]
        if not targets:
            raise SharingError(
                "the model has no shared weights of 2 or more dimensions to relax; share layers first "
                "(ps.share_layers, ps.convert_to_shared or ps.tie)"
            )
    else:
        pats = [names] if isinstance(names, str) else list(names)
        if not pats or not all(isinstance(p, str) and p for p in pats):
            raise SharingError(f"names must be a name, a glob pattern or a list of them, got {names!r}")
        targets = []
        for pat in pats:
            hits = [u for n, u in index.uses.items() if fnmatchcase(n, pat)]
            if not hits:
                raise SharingError(f"{pat!r} matches no parameter of the model" + did_you_mean(pat, index.uses, "parameter"))
            for u in hits:
                if u.name not in shared:
                    why = "computed by " + type(u.plist[0]).__name__ if u.derived else "not shared with another use"
                    raise SharingError(
                        f"cannot relax {u.name!r}: it is {why}; relax adds deltas to shared (aliased) weights "
                        "(share them first with ps.share_layers or ps.tie)"
                    )
                if u.param.dim() < 2:
                    raise SharingError(
                        f"cannot relax {u.name!r}: it has shape {fmt_shape(u.param.shape)}; "
                        "a low-rank delta needs 2 or more dimensions"
                    )
                if u not in targets:
                    targets.append(u)
    for u in targets:
        full = _full_rank(u.param.shape)
        if rank > full:
            raise SharingError(
                f"rank {rank} is larger than {u.name!r} allows: it is {fmt_shape(u.param.shape)}, "
                f"so a delta has rank at most {full}; choose rank <= {full} or relax fewer weights"
            )
    # Everything is valid: build each delta, then install them all.
    built = []
    with torch.no_grad():
        for u in targets:
            base = u.param
            residual = None
            if init == "svd":
                orig = _ORIGINALS.get(u.module, {}).get(u.attr)
                if orig is not None and tuple(orig.shape) == tuple(base.shape) and base.device.type != "meta":
                    residual = orig.to(device=base.device, dtype=base.dtype) - base
            a, b = delta_factors(residual, base.shape, rank, dtype=base.dtype, device=base.device)
            built.append((u, base, a, b))
    for u, base, a, b in built:
        set_derived(u.module, u.attr, Delta(a, b), base)
        kept = _ORIGINALS.get(u.module)
        if kept is not None:
            kept.pop(u.attr, None)
    return model


def convert_to_shared(
    layers: nn.ModuleList | nn.Sequential,
    unique: int,
    strategy: str | Sequence[int] = "cycle",
    init: str = "mean",
    relax_rank: int = 0,
) -> nn.ModuleList | nn.Sequential:
    """Turn N pretrained layers into ``unique`` = M shared ones, optionally relaxed.

    The layers are grouped as :func:`paramshare.share_layers` groups them (``strategy``) and
    each group's shared block is initialised from its members' trained weights. The original
    weights are remembered (until :func:`relax` uses them or the layers are garbage-collected;
    not across ``deepcopy``/pickle), so a later ``ps.relax(model, rank)`` starts each delta at
    the best rank-r correction of what sharing lost.

    Args:
        layers: an ``nn.ModuleList`` or ``nn.Sequential`` of N identical blocks (changed in place).
        unique: M, the number of distinct blocks kept.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"``, ``"cycle_rev"`` or a list of N indices
            (see :func:`paramshare.layer_assignment`).
        init: ``"mean"`` averages each group's weights; ``"first"`` keeps its first layer's;
            ``"svd"`` (needs ``relax_rank``) picks for each weight of 2+ dimensions the shared
            value that rank-``relax_rank`` deltas can correct best (alternating between the
            mean of the corrected weights and each layer's truncated SVD of its residual,
            starting at the mean; other parameters take the mean).
        relax_rank: when positive, call ``relax(layers, relax_rank)`` on the shared weights.

    Returns:
        ``layers``.

    Raises:
        SharingError: bad ``unique``/``strategy``/``init``/``relax_rank`` (a rank larger than
            a weight allows shows the sizes), blocks that differ in structure. The layers are unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> stack = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))
        >>> stack = ps.convert_to_shared(stack, unique=2, strategy="cycle", relax_rank=4)
        >>> [g.kind for g in ps.find_ties(stack)]  # the biases are aliased, the weights relaxed
        ['alias', 'alias', 'delta', 'delta']
    """
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise SharingError(f"convert_to_shared needs an nn.ModuleList or nn.Sequential of blocks, got {type(layers).__name__}")
    if init not in CONVERT_INITS:
        raise SharingError(f"init must be one of {', '.join(map(repr, CONVERT_INITS))}, got {init!r}")
    _check_int(relax_rank, "relax_rank", 0, None)
    if init == "svd" and relax_rank == 0:
        raise SharingError("init='svd' chooses the shared weights for rank-relax_rank deltas: pass relax_rank >= 1 "
                           "(with relax_rank=0 it is init='mean')")
    n = len(layers)
    assign = layer_assignment(n, unique, strategy)
    index = ModelIndex(layers)
    uses = [index.uses_in(str(i)) for i in range(n)]
    if relax_rank:
        for rel, u in uses[0].items():
            with torch.no_grad():
                shape = u.value().shape
            if len(shape) >= 2 and relax_rank > _full_rank(shape):
                raise SharingError(
                    f"relax_rank {relax_rank} is larger than {rel!r} allows: it is {fmt_shape(shape)}, so a delta "
                    f"has rank at most {_full_rank(shape)}"
                )
    with torch.no_grad():
        originals = [{rel: u.value().detach().clone() for rel, u in us.items()} for us in uses]
    share_layers(layers, unique, strategy, init="first")  # validates the structure; raises before any change
    index = ModelIndex(layers)
    uses = [index.uses_in(str(i)) for i in range(n)]
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(assign):
        groups.setdefault(g, []).append(i)
    with torch.no_grad():
        for members in groups.values():
            rep = uses[members[0]]
            done: set[int] = set()
            for rel, u in rep.items():
                p, transposed = u.backing()
                if p is None or id(p) in done:
                    continue
                done.add(id(p))
                vals = [originals[i][rel] for i in members]
                value = _shared_value(vals, init, relax_rank)
                p.copy_(value.transpose(0, 1) if transposed else value)
    # remember the originals of the shared weights for relax
    relax_names = []
    for i, us in enumerate(uses):
        for rel, u in us.items():
            if originals[i][rel].dim() >= 2 and not u.derived and len(groups[assign[i]]) > 1:
                _ORIGINALS.setdefault(u.module, {})[u.attr] = originals[i][rel]
                relax_names.append(u.name)
    if relax_rank and relax_names:
        relax(layers, relax_rank, names=relax_names, init="svd")
    return layers


def _shared_value(vals: list[torch.Tensor], init: str, rank: int, iters: int = 8) -> torch.Tensor:
    dtype = vals[0].dtype
    if init == "first" or len(vals) == 1:
        return vals[0]
    acc = torch.stack([v.to(torch.float64) for v in vals])
    mean = acc.mean(0)
    if init == "mean" or acc.dim() < 3 or acc.device.type == "meta":
        return mean.to(dtype)
    shape = acc.shape[1:]
    flat = acc.reshape(acc.shape[0], shape[0], -1)
    shared = mean.reshape(shape[0], -1)
    for _ in range(iters):
        u, s, vh = torch.linalg.svd(flat - shared, full_matrices=False)
        low = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        shared = (flat - low).mean(0)
    return shared.reshape(shape).to(dtype)
