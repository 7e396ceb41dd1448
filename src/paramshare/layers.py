"""Cross-layer sharing: N blocks of a stack backed by M distinct blocks' parameters."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._index import ModelIndex
from .errors import SharingError
from .tying import _point, _source_backing, _structure_diffs

__all__ = ["share_layers", "layer_assignment", "STRATEGIES"]

#: Named strategies (Takase & Kiyono 2021; ALBERT; MobileLLM), for N layers and M unique blocks.
STRATEGIES = ("all", "sequence", "cycle", "cycle_rev")


def layer_assignment(n: int, unique: int, strategy: str | Sequence[int] = "cycle") -> list[int]:
    """Which of the ``unique`` blocks each of ``n`` layers uses.

    ``"all"``: one block everywhere (``unique`` must be 1); ``"sequence"``: A A B B C C;
    ``"cycle"``: A B C A B C; ``"cycle_rev"``: A B C C B A (cycles, the last M layers in
    reverse); or an explicit list of ``n`` indices in ``range(unique)``, each used.

    Raises:
        SharingError: ``unique`` out of range or not dividing ``n`` for a named strategy,
            an unknown strategy, a list of the wrong length or with bad indices.

    Example:
        >>> layer_assignment(6, 3, "cycle_rev")
        [0, 1, 2, 2, 1, 0]
    """
    if not isinstance(n, int) or n < 1:
        raise SharingError(f"need at least one layer, got {n!r}")
    if not isinstance(unique, int) or isinstance(unique, bool) or unique < 1:
        raise SharingError(f"unique must be a positive integer, got {unique!r}")
    if unique > n:
        raise SharingError(f"unique={unique} exceeds the {n} layers; choose unique between 1 and {n}")
    if isinstance(strategy, str):
        if strategy not in STRATEGIES:
            raise SharingError(
                f"unknown strategy {strategy!r}; choose one of {', '.join(map(repr, STRATEGIES))} "
                f"or pass a list of {n} block indices"
            )
        if strategy == "all":
            if unique != 1:
                raise SharingError(f"strategy 'all' uses one block for every layer: unique must be 1, got {unique}")
            return [0] * n
        if n % unique:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise SharingError(
                f"unique={unique} does not divide the {n} layers, as strategy {strategy!r} needs; "
                f"choose one of {divisors} or pass an explicit list of {n} block indices"
            )
        if strategy == "sequence":
            return [i // (n // unique) for i in range(n)]
        if strategy == "cycle":
            return [i % unique for i in range(n)]
        head = n - unique
        return [i % unique for i in range(head)] + [unique - 1 - i for i in range(unique)]
    try:
        idx = [int(i) for i in strategy]
        if any(isinstance(i, bool) or int(i) != i for i in strategy):
            raise TypeError
    except (TypeError, ValueError):
        raise SharingError(f"strategy must be a name or a list of integers, got {strategy!r}") from None
    if len(idx) != n:
        raise SharingError(f"explicit strategy has {len(idx)} entries but there are {n} layers; give one block index per layer")
    bad = [i for i in idx if not 0 <= i < unique]
    if bad:
        raise SharingError(f"explicit strategy has block indices {sorted(set(bad))} outside range({unique})")
    unused = sorted(set(range(unique)) - set(idx))
    if unused:
        raise SharingError(f"explicit strategy never uses blocks {unused} of range({unique}); lower unique or use them")
    return idx


def share_layers(
    layers: nn.ModuleList | nn.Sequential,
    unique: int,
    strategy: str | Sequence[int] = "cycle",
    init: str = "first",
) -> nn.ModuleList | nn.Sequential:
    """Back N structurally identical blocks by the parameters of ``unique`` = M of them.

    Afterwards only M distinct blocks' parameters exist (aliases: zero overhead, and DDP,
    FSDP2 and optimizers count each once). Buffers (e.g. BatchNorm running statistics) stay
    per position. See :func:`layer_assignment` for the strategies.

    Args:
        layers: an ``nn.ModuleList`` or ``nn.Sequential`` of N blocks (changed in place).
        unique: M, the number of distinct blocks kept.
        strategy: ``"all"``, ``"sequence"``, ``"cycle"``, ``"cycle_rev"`` or a list of N indices.
        init: ``"first"`` keeps each group's first block's weights; ``"mean"`` averages the
            group's current weights (to impose sharing on a trained model).

    Returns:
        ``layers``.

    Raises:
        SharingError: a bad ``unique``/``strategy``/``init``, blocks that differ in structure
            (the differences are listed). The layers are unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> stack = nn.ModuleList(nn.Linear(16, 16) for _ in range(6))
        >>> stack = ps.share_layers(stack, unique=2, strategy="cycle")
        >>> stack[0].weight is stack[2].weight, stack[0].weight is stack[1].weight
        (True, False)
        >>> ps.report(stack).unique_params  # 2 blocks of 16*16 + 16
        544
    """
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise SharingError(
            f"share_layers needs an nn.ModuleList or nn.Sequential of blocks, got {type(layers).__name__}"
        )
    if init not in ("first", "mean"):
        raise SharingError(f"init must be 'first' or 'mean', got {init!r}")
    n = len(layers)
    assign = layer_assignment(n, unique, strategy)
    index = ModelIndex(layers)
    keys = [str(i) for i in range(n)]
    if [k for k in layers._modules] != keys:
        raise SharingError("share_layers needs blocks indexed 0..N-1 (a plain ModuleList or Sequential)")
    uses = [index.uses_in(k) for k in keys]
    if not uses[0]:
        raise SharingError("the blocks have no parameters to share")
    cls0 = parametrize.type_before_parametrizations(layers[0])
    for i in range(1, n):
        cls_i = parametrize.type_before_parametrizations(layers[i])
        if cls_i is not cls0:
            raise SharingError(f"blocks differ: block 0 is a {cls0.__name__} but block {i} is a {cls_i.__name__}")
        diffs = _structure_diffs(uses[0], uses[i], "block 0", f"block {i}")
        if diffs:
            raise SharingError(
                f"blocks differ: block {i} does not match block 0:\n  - " + "\n  - ".join(diffs[:8])
                + (f"\n  - ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
            )
    reps = {}
    for i, g in enumerate(assign):
        reps.setdefault(g, i)
    sources = {g: {rel: _source_backing(u, "layers") for rel, u in uses[r].items()} for g, r in reps.items()}
    with torch.no_grad():
        if init == "mean":
            for g, r in reps.items():
                members = [i for i, a in enumerate(assign) if a == g]
                done: set[int] = set()
                for rel, (p, t) in sources[g].items():
                    if id(p) in done or len(members) < 2:
                        continue
                    done.add(id(p))
                    vals = [uses[i][rel].value().detach() for i in members]
                    acc = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
                    mean = torch.stack([v.to(acc) for v in vals]).mean(0).to(p.dtype)
                    p.copy_(mean.transpose(0, 1) if t else mean)
        for i, g in enumerate(assign):
            if i == reps[g]:
                continue
            for rel, (p, t) in sources[g].items():
                _point(uses[i][rel], p, t)
    return layers
