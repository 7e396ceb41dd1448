"""The ``hash`` kind: used weights read a small budget through a hash (HashedNets).

A group's ``source`` is the budget (a 1-D ``nn.Parameter`` held as the ``original`` of the
members' :class:`~paramshare.hashing.HashedWeight` parametrizations, so its name is
``<module>.parametrizations.<attr>.original``); ``shape`` is ``(budget,)``; the options
record the hash function, and each member's seed and virtual shape. Nothing else is stored:
no index tensor, the hash is recomputed at every forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .._format import human_bytes
from .._index import ModelIndex
from .._parametrize import is_derived, set_derived, set_plain
from ..errors import did_you_mean
from ..hashing import HASH_NAME, MAX_BUDGET, HashedWeight, project_to_budget
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import fmt_shape


def budget_path(member: str) -> str:
    """Where the budget of a hashed ``member`` (``"fc.weight"``) is registered."""
    mod, _, attr = member.rpartition(".")
    return f"{mod}.parametrizations.{attr}.original" if mod else f"parametrizations.{attr}.original"


def _hashed(use) -> HashedWeight | None:
    if use is not None and is_derived(use.module, use.attr, HashedWeight):
        return use.plist[0]
    return None


def _options(group: TieGroup) -> tuple[list[int] | None, list[tuple[int, ...]] | None, list[str]]:
    """(seeds, shapes, problems) read from a group's options."""
    problems = []
    opts = group.options
    name = opts.get("hash", HASH_NAME)
    if name != HASH_NAME:
        problems.append(
            f"the hash group of {group.source!r} uses hash function {name!r}, but this paramshare computes {HASH_NAME!r}; "
            "use the paramshare version that wrote the plan"
        )
    n = len(group.members)
    seeds, shapes = opts.get("seeds"), opts.get("shapes")
    if not (isinstance(seeds, (list, tuple)) and len(seeds) == n
            and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"the hash group of {group.source!r} needs options 'seeds', one integer per member ({n}), got {seeds!r}")
        seeds = None
    if not (isinstance(shapes, (list, tuple)) and len(shapes) == n and all(
            isinstance(s, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes)):
        problems.append(f"the hash group of {group.source!r} needs options 'shapes', one shape per member ({n}), got {shapes!r}")
        shapes = None
    else:
        shapes = [tuple(s) for s in shapes]
    if group.shape is None or len(group.shape) != 1 or group.shape[0] < 1:
        problems.append(f"the hash group of {group.source!r} needs shape [budget] with budget >= 1, got {group.shape!r}")
    return seeds, shapes, problems


@register_kind
class Hash(Kind):
    name = "hash"
    priority = 50

    def find(self, index: ModelIndex) -> list[TieGroup]:
        buckets: dict[int, list[str]] = {}
        originals: dict[int, torch.Tensor] = {}
        for name, use in index.derived_uses.items():
            if _hashed(use) is not None:
                orig = use.plist.original
                buckets.setdefault(id(orig), []).append(name)
                originals[id(orig)] = orig
        groups = []
        for key, names in buckets.items():
            hws = [_hashed(index.uses[n]) for n in names]
            options = {"hash": HASH_NAME, "seeds": [h.seed for h in hws], "shapes": [list(h.shape) for h in hws]}
            groups.append(TieGroup(self.name, index.canonical(originals[key]), tuple(names), tuple(originals[key].shape), options))
        return groups

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        seeds, shapes, problems = _options(group)
        if problems:
            return problems
        size = group.shape[0]
        if size > MAX_BUDGET:
            problems.append(f"the hash group of {group.source!r} has a budget of {size}, more than the largest, 2**30")
        src = index.stored_param(group.source)
        if src is None:
            want = budget_path(group.members[0])
            if group.source != want:
                problems.append(
                    f"the budget of a hash group is registered at its first member's parametrization: "
                    f"source must be {want!r}, got {group.source!r}"
                )
        elif group.source in index.uses:
            problems.append(
                f"hash source {group.source!r} is a parameter the model uses, not a budget; "
                f"a hash group's source is {budget_path(group.members[0])!r}"
            )
        elif src.dim() != 1 or src.numel() != size:
            problems.append(f"budget {group.source!r} has shape {fmt_shape(src.shape)} but the plan says {fmt_shape(group.shape)}")
        ref = src
        for m, shape in zip(group.members, shapes):
            use = index.uses.get(m)
            if use is None:
                problems.append(f"hash member {m!r} does not exist in the model" + did_you_mean(m, index.uses, "parameter"))
                continue
            hw = _hashed(use)
            if use.plist is not None and hw is None:
                names = ", ".join(type(p).__name__ for p in use.plist)
                problems.append(
                    f"{m!r} is computed by other parametrizations ({names}); ps.untie({m!r}) it (or build the model "
                    "fresh) before hashing"
                )
                continue
            t = use.plist.original if hw is not None else use.param
            have = hw.shape if hw is not None else tuple(t.shape)
            if tuple(have) != tuple(shape):
                problems.append(f"{m!r} has shape {fmt_shape(have)} but the plan hashes it as {fmt_shape(shape)}")
            if not t.is_floating_point():
                problems.append(f"{m!r} is {t.dtype}; only floating-point weights can be hashed")
            elif ref is None:
                ref = t
            elif t.dtype != ref.dtype:
                problems.append(f"{m!r} is {t.dtype} but the budget is {ref.dtype}; convert the model to one dtype first")
            elif t.device != ref.device:
                problems.append(f"{m!r} is on {t.device} but the budget is on {ref.device}; move the model to one device first")
        return problems

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        seeds, shapes, _ = _options(group)
        size = group.shape[0]
        src = index.stored_param(group.source)
        uses = [index.uses[m] for m in group.members]
        if src is None:
            with torch.no_grad():
                values = [(u.value().detach(), s) for u, s in zip(uses, seeds)]
            first = uses[0].plist.original if _hashed(uses[0]) is not None else uses[0].param
            src = nn.Parameter(project_to_budget(values, size), requires_grad=first.requires_grad)
        for use, seed, shape in zip(uses, seeds, shapes):
            hw = _hashed(use)
            if (hw is not None and use.plist.original is src and hw.seed == seed
                    and hw.shape == tuple(shape) and hw.budget == size):
                continue
            set_derived(use.module, use.attr, HashedWeight(shape, size, seed), src)

    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        seeds, shapes, problems = _options(group)
        if problems:
            return problems
        src = index.stored_param(group.source)
        if src is None:
            problems.append(f"missing budget {group.source!r}; hash the model with ps.apply_plan(model, plan)")
        elif tuple(src.shape) != tuple(group.shape):
            problems.append(f"budget {group.source!r} has shape {fmt_shape(src.shape)} but the plan says {fmt_shape(group.shape)}")
        for m, seed, shape in zip(group.members, seeds, shapes):
            use = index.uses.get(m)
            if use is None:
                problems.append(f"missing parameter {m!r}")
                continue
            hw = _hashed(use)
            if hw is None:
                problems.append(f"{m!r} is not hashed; hash it with ps.apply_plan(model, plan)")
                continue
            if src is not None and use.plist.original is not src:
                problems.append(
                    f"{m!r} reads a budget that is not {group.source!r} "
                    "(as after to_empty or load_state_dict(assign=True)); re-tie with ps.apply_plan(model, plan)"
                )
            if hw.seed != seed:
                problems.append(f"{m!r} is hashed with seed {hw.seed} but the plan says {seed}")
            if hw.shape != tuple(shape):
                problems.append(f"{m!r} is hashed as {fmt_shape(hw.shape)} but the plan says {fmt_shape(shape)}")
            if hw.budget != group.shape[0]:
                problems.append(f"{m!r} reads a budget of {hw.budget} but the plan says {group.shape[0]}")
        return problems

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        src = index.stored_param(group.source)
        es = src.element_size()
        used = 0
        for m in group.members:
            hw = _hashed(index.uses[m])
            used += hw.numel if hw is not None else index.uses[m].value().numel()
        stored_bytes = src.numel() * es
        bits = 8 * stored_bytes / used if used else 0.0
        detail = f"hashed: {bits:.2f} bits/weight, {human_bytes(stored_bytes)} (1/{used / src.numel():.3g} stored)"
        return GroupStats(uses=len(group.members), used_numel=used, stored_numel=src.numel(),
                          stored_bytes=stored_bytes, saved_bytes=used * es - stored_bytes, detail=detail)

    def untie(self, index: ModelIndex, group: TieGroup, names: set[str]) -> None:
        with torch.no_grad():
            for m in group.members:
                use = index.uses.get(m)
                if m not in names or _hashed(use) is None:
                    continue
                budget = use.plist.original
                value = use.value().detach().clone()
                set_plain(use.module, use.attr, nn.Parameter(value, requires_grad=budget.requires_grad))

    # ---- checkpoints: the budget is all there is --------------------------------------------
    def stored(self, index: ModelIndex, group: TieGroup) -> dict[str, torch.Tensor]:
        return {group.source: index.stored_param(group.source)}

    def owned(self, index: ModelIndex, group: TieGroup) -> list[torch.Tensor]:
        return [index.stored_param(group.source)]

    def restore(self, index: ModelIndex, group: TieGroup, tensors: Mapping[str, torch.Tensor], apply: bool) -> list[str]:
        src = index.stored_param(group.source)
        if src is None:
            return [f"the model has no budget {group.source!r} for the hash group of {', '.join(group.members)}; "
                    "apply the plan first"]
        t = tensors.get(group.source)
        if t is None:
            return [f"the file has no tensor {group.source!r} for the hash group of {', '.join(group.members)}"]
        if tuple(t.shape) != tuple(src.shape):
            return [f"tensor {group.source!r} has shape {fmt_shape(t.shape)} in the file but {fmt_shape(src.shape)} in the model"]
        if not t.is_floating_point():
            return [f"tensor {group.source!r} is {t.dtype} in the file; a hash budget is floating point"]
        if apply:
            with torch.no_grad():
                src.copy_(t.to(device=src.device, dtype=src.dtype))
        return []

    def extra_bytes(self, index: ModelIndex, group: TieGroup) -> int:
        return 0  # no index tensor: the budget (a parameter) is everything the group stores
