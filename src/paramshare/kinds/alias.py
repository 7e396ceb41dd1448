"""The ``alias`` kind: several uses are the very same ``nn.Parameter`` object.

Plain PyTorch: zero overhead, and DDP, FSDP2 and optimizers already deduplicate it.
"""

from __future__ import annotations

from .._index import ModelIndex
from .._parametrize import set_plain
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import compat_problems, plan_shape_problem, source_param, target_problems, view_key


@register_kind
class Alias(Kind):
    name = "alias"
    priority = 10
    shares_backing = True

    def find(self, index: ModelIndex) -> list[TieGroup]:
        buckets: dict[object, list[str]] = {}
        shapes = {}
        keys: dict[int, object] = {}  # one view key per parameter object (aliases repeat it)
        for name, use in index.uses.items():
            p = use.param
            if p is None:
                continue
            key = keys.get(id(p))
            if key is None:
                key = keys[id(p)] = view_key(p)
                shapes[key] = tuple(p.shape)
            buckets.setdefault(key, []).append(name)
        return [
            TieGroup(self.name, names[0], tuple(names), shapes[key])
            for key, names in buckets.items()
            if len(names) > 1
        ]

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        problems: list[str] = []
        src = source_param(index, group.source, self.name, problems)
        if src is None:
            return problems
        problems += plan_shape_problem(group, src)
        for m in group.members:
            use, found = target_problems(index, m, self.name)
            problems += found
            if use is not None and not found:
                problems += compat_problems(m, use.value(), group.source, src, src.shape)
        return problems

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        src = index.stored_param(group.source)
        for m in group.members:
            use = index.uses[m]
            if use.param is not src:
                set_plain(use.module, use.attr, src)

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
            p = use.param
            if p is src:
                continue
            if p is None:
                problems.append(f"{m!r} is computed by a parametrization, not an alias of {group.source!r}")
            elif view_key(p) == view_key(src):
                problems.append(
                    f"{m!r} shares storage with {group.source!r} but is a different nn.Parameter "
                    "(as after load_state_dict(assign=True)), so their gradients are not summed; "
                    "re-tie with ps.apply_plan(model, plan)"
                )
            else:
                problems.append(f"{m!r} no longer shares storage with {group.source!r}; re-tie with ps.apply_plan(model, plan)")
        return problems

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        src = index.stored_param(group.source)
        n, nb = src.numel(), src.numel() * src.element_size()
        k = len(group.members)
        return GroupStats(uses=k, used_numel=n * k, stored_numel=n, stored_bytes=nb, saved_bytes=nb * (k - 1))
