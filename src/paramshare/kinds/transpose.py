"""The ``transpose`` kind: a use reads another parameter with its first two dimensions swapped.

The tied autoencoder's decoder: ``dec.weight`` is ``enc.weight.transpose(0, 1)``, a view with
no copy; gradients flow into ``enc.weight``. Installed as a ``torch.nn.utils.parametrize``
parametrization whose ``original`` is the source ``nn.Parameter`` itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .._index import ModelIndex
from .._parametrize import Transposed, is_derived, set_derived
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import compat_problems, fmt_shape, plan_shape_problem, source_param, target_problems


def transposed_shape(shape) -> tuple[int, ...]:
    shape = tuple(shape)
    return (shape[1], shape[0]) + shape[2:]


def original_path(name: str) -> str:
    """Where a parametrized use keeps its stored tensor: ``dec.weight`` -> ``dec.parametrizations.weight.original``."""
    module, _, attr = name.rpartition(".")
    return f"{module}.parametrizations.{attr}.original" if module else f"parametrizations.{attr}.original"


def _holder(index: ModelIndex, group: TieGroup) -> str | None:
    """The member whose own parametrization holds the source, when no module holds it plainly.

    After ``dec.weight`` reads ``enc.weight`` transposed and ``enc.weight`` is re-tied elsewhere,
    the old tensor lives only in ``dec``'s parametrization; the plan names it by that path,
    and ``apply_plan`` on a fresh model creates it from ``dec.weight``'s current value.
    """
    if index.stored_param(group.source) is not None:
        return None
    for m in group.members:
        if original_path(m) == group.source and m in index.uses:
            return m
    return None


@register_kind
class Transpose(Kind):
    name = "transpose"
    priority = 20
    shares_backing = True

    def find(self, index: ModelIndex) -> list[TieGroup]:
        buckets: dict[int, list[str]] = {}
        originals = {}
        for name, use in index.derived_uses.items():
            if is_derived(use.module, use.attr, Transposed):
                orig = use.plist.original
                buckets.setdefault(id(orig), []).append(name)
                originals[id(orig)] = orig
        return [
            TieGroup(self.name, index.canonical(originals[k]), tuple(names), tuple(originals[k].shape))
            for k, names in buckets.items()
        ]

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        problems: list[str] = []
        holder = _holder(index, group)
        if holder is not None:
            return self._validate_held(index, group, holder)
        src = source_param(index, group.source, self.name, problems)
        if src is None:
            return problems
        problems += plan_shape_problem(group, src)
        if src.dim() < 2:
            return problems + [f"cannot transpose {group.source!r}: it has shape {fmt_shape(src.shape)}, fewer than 2 dimensions"]
        want = transposed_shape(src.shape)
        for m in group.members:
            if m == group.source:
                problems.append(f"{m!r} cannot be its own transpose")
                continue
            use, found = target_problems(index, m, self.name)
            problems += found
            if use is not None and not found:
                problems += compat_problems(m, use.value(), f"{group.source}.T", src, want)
        return problems

    def _validate_held(self, index: ModelIndex, group: TieGroup, holder: str) -> list[str]:
        use, problems = target_problems(index, holder, self.name)
        if problems:
            return problems
        value = use.value()
        if value.dim() < 2:
            return [f"cannot transpose {holder!r}: it has shape {fmt_shape(value.shape)}, fewer than 2 dimensions"]
        if group.shape is not None and transposed_shape(value.shape) != tuple(group.shape):
            problems.append(
                f"{holder!r} has shape {fmt_shape(value.shape)} but the plan stores it as {fmt_shape(group.shape)}"
            )
        for m in group.members:
            if m != holder:
                other, found = target_problems(index, m, self.name)
                problems += found
                if other is not None and not found:
                    problems += compat_problems(m, other.value(), holder, value, value.shape)
        return problems

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        holder = _holder(index, group)
        if holder is not None:
            use = index.uses[holder]
            with torch.no_grad():
                value = use.value().detach().transpose(0, 1).clone(memory_format=torch.contiguous_format)
            src = nn.Parameter(value, requires_grad=True)
        else:
            src = index.stored_param(group.source)
        for m in group.members:
            use = index.uses[m]
            p, transposed = use.backing()
            if p is not src or not transposed:
                set_derived(use.module, use.attr, Transposed(), src)

    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        src = index.stored_param(group.source)
        if src is None:
            return [f"missing parameter {group.source!r}"]
        problems = plan_shape_problem(group, src)
        for m in group.members:
            use = index.uses.get(m)
            if use is None:
                problems.append(f"missing parameter {m!r}")
                continue
            p, transposed = use.backing()
            if not transposed:
                problems.append(f"{m!r} is no longer the transpose of {group.source!r}; re-tie with ps.apply_plan(model, plan)")
            elif p is not src:
                problems.append(
                    f"{m!r} reads a transposed parameter that is not {group.source!r} "
                    "(as after to_empty or load_state_dict(assign=True)); re-tie with ps.apply_plan(model, plan)"
                )
        return problems

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        src = index.stored_param(group.source)
        n, nb = src.numel(), src.numel() * src.element_size()
        k = len(group.members)
        if group.source in index.uses:  # stored in its own right, counted there
            return GroupStats(uses=k, used_numel=n * k, stored_numel=0, stored_bytes=0, saved_bytes=nb * k,
                              detail="transposed view")
        return GroupStats(uses=k, used_numel=n * k, stored_numel=n, stored_bytes=nb, saved_bytes=nb * (k - 1),
                          detail="transposed view")
