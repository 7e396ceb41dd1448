"""Helpers shared by the kinds whose uses are computed by a paramshare parametrization."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .._index import Use
from .._parametrize import parametrization_of, remove_derived, set_plain
from ..plans import TieGroup


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with standard row-major strides (a copy unless it already has them; detached)."""
    t = t.detach()
    if t.device.type != "meta" and t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def host_path(use_name: str, suffix: str = "original") -> str:
    """Where a parametrized use keeps a tensor: ``<module>.parametrizations.<attr>.<suffix>``."""
    mod, _, attr = use_name.rpartition(".")
    pre = f"{mod}." if mod else ""
    return f"{pre}parametrizations.{attr}.{suffix}"


def own_parametrization(use: Use | None, cls: type) -> nn.Module | None:
    """The ``cls`` parametrization computing ``use`` (None when it is something else)."""
    if use is None:
        return None
    plist = parametrization_of(use.module, use.attr)
    if plist is not None and len(plist) == 1 and isinstance(plist[0], cls):
        return plist[0]
    return None


def foreign_problem(use: Use, kind: str, cls: type) -> list[str]:
    plist = use.plist
    if plist is None or (len(plist) == 1 and isinstance(plist[0], cls)):
        return []
    names = ", ".join(type(m).__name__ for m in plist)
    return [
        f"{use.name!r} is computed by other parametrizations ({names}); "
        f"ps.untie or ps.materialize it before making it a {kind} member"
    ]


def members_of(index, group: TieGroup) -> list[Use | None]:
    return [index.uses.get(m) for m in group.members]


def options_problems(group: TieGroup, kind: str, extra: Sequence[str]) -> list[str]:
    o = group.options
    problems = []
    ws = o.get("weight_shape")
    sizes_ok = isinstance(ws, (list, tuple)) and ws and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in ws)
    if not sizes_ok:
        problems.append(f"{kind} group of {group.source!r} needs options.weight_shape, a list of positive sizes, got {ws!r}")
    for key in extra:
        if key not in o:
            problems.append(f"{kind} group of {group.source!r} needs options.{key}")
    if group.shape is None:
        problems.append(f"{kind} group of {group.source!r} needs the stored tensor's shape")
    return problems


def materialize_uses(uses: list[Use]) -> None:
    """Replace each computed use by a plain parameter holding its current value."""
    with torch.no_grad():
        values = [(u, u.value().detach().clone(), requires_grad_of(u)) for u in uses]
    for use, value, req in values:
        remove_derived(use.module, use.attr)
        set_plain(use.module, use.attr, nn.Parameter(value, requires_grad=req))


def requires_grad_of(use: Use) -> bool:
    """Whether the tensors behind ``use`` are trained (a frozen weight stays frozen)."""
    if use.plist is None:
        p = use.param
        return True if p is None else p.requires_grad
    return any(p.requires_grad for p in use.plist.parameters()) or not any(True for _ in use.plist.parameters())
