"""Hard ties: tie, tie_modules, untie, find_ties, plan, apply_plan, check."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ._index import ModelIndex, Use
from ._parametrize import Transposed, set_derived, set_plain
from .errors import SharingError
from .kinds._common import fmt_shape, view_key
from .kinds.transpose import transposed_shape
from .plans import Kind, SharingPlan, TieGroup, get_kind, kind_names

__all__ = ["tie", "tie_modules", "untie", "find_ties", "plan", "apply_plan", "check"]


# ---- shared internals ---------------------------------------------------------------------
def _point(use: Use, param: nn.Parameter, transposed: bool) -> None:
    """Make ``use`` read ``param`` (transposed or not). Callers have validated everything."""
    p, t = use.backing()
    if p is param and t == transposed:
        return
    if transposed:
        set_derived(use.module, use.attr, Transposed(), param)
    else:
        set_plain(use.module, use.attr, param)


def _source_backing(use: Use, what: str) -> tuple[nn.Parameter, bool]:
    param, transposed = use.backing()
    if param is None:
        kinds = ", ".join(type(m).__name__ for m in use.plist)
        raise SharingError(
            f"cannot tie to {use.name!r}: it is computed by a parametrization ({kinds}), not stored; "
            f"tie {what} before clustering/hashing, or ps.untie it first"
        )
    return param, transposed


def _foreign_parametrization(use: Use) -> str | None:
    plist = use.plist
    if plist is None or (len(plist) == 1 and isinstance(plist[0], Transposed)):
        return None
    return ", ".join(type(m).__name__ for m in plist)


def _target_check(index: ModelIndex, source: Use, src: nn.Parameter, src_t: bool, target: Use, transpose: bool) -> bool:
    """Validate pointing ``target`` at ``src``; returns the orientation. Raises SharingError."""
    foreign = _foreign_parametrization(target)
    if foreign:
        raise SharingError(
            f"cannot tie {target.name!r}: it is computed by parametrizations ({foreign}); "
            "remove them first (torch.nn.utils.parametrize.remove_parametrizations) or ps.untie it"
        )
    t = src_t ^ transpose
    if t and src.dim() < 2:
        raise SharingError(
            f"cannot tie {target.name!r} transposed to {source.name!r}: {source.name!r} has shape "
            f"{fmt_shape(src.shape)}, fewer than 2 dimensions"
        )
    if t and target.param is src:
        raise SharingError(
            f"cannot tie {target.name!r} to {source.name!r}: {target.name!r} is the stored tensor that "
            f"{source.name!r} reads transposed, so the tie would point at itself"
        )
    with torch.no_grad():
        value = target.value()
        src_value = source.value()
    want = transposed_shape(src.shape) if t else tuple(src.shape)
    if tuple(value.shape) != want:
        hint = ""
        if not transpose and len(want) >= 2 and tuple(value.shape) == transposed_shape(want):
            hint = "; pass transpose=True to tie it transposed"
        elif transpose and tuple(value.shape) == tuple(src_value.shape):
            hint = "; the shapes already match: drop transpose=True"
        how = " transposed" if transpose else ""
        raise SharingError(
            f"cannot tie {target.name!r} {fmt_shape(value.shape)} to {source.name!r}{how} "
            f"{fmt_shape(src_value.shape)}: shapes differ{hint}"
        )
    if value.dtype != src.dtype:
        raise SharingError(
            f"cannot tie {target.name!r} ({value.dtype}) to {source.name!r} ({src.dtype}): dtypes differ; "
            f"convert the model to one dtype first (e.g. model.to({src.dtype}))"
        )
    if value.device != src.device:
        raise SharingError(
            f"cannot tie {target.name!r} (on {value.device}) to {source.name!r} (on {src.device}): devices differ; "
            "move the model to one device first"
        )
    return t


def _find(index: ModelIndex) -> list[TieGroup]:
    groups: list[TieGroup] = []
    position = index.position
    for name in kind_names():
        found = get_kind(name).find(index)
        if len(found) > 1:
            found = sorted(found, key=lambda g: min(map(position, g.members)))
        groups += found
    return groups


# ---- public API ---------------------------------------------------------------------------
def tie(model: nn.Module, source: str, *targets: str, transpose: bool = False) -> nn.Module:
    """Make every target parameter use the stored tensor of ``source``.

    By default each target becomes the very same ``nn.Parameter`` object as ``source`` (an
    alias; ``source`` keeps its value). With ``transpose=True`` each target reads
    ``source.transpose(0, 1)`` with no copy (a tied autoencoder's decoder), and gradients flow
    into ``source``. A target that is already tied elsewhere is re-tied (other uses of its old
    tensor keep sharing among themselves).

    Args:
        model: the module holding the parameters (changed in place).
        source: dotted name of the parameter to share, as in ``model.named_parameters()``.
        *targets: dotted names of the parameters that will use it.
        transpose: read ``source`` transposed (first two dimensions swapped).

    Returns:
        ``model``.

    Raises:
        SharingError: unknown names (with close names), shape, dtype or device mismatch,
            a parameter tied to itself. The model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> ae = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 784))
        >>> ae = ps.tie(ae, "0.weight", "2.weight", transpose=True)
        >>> ae[2].weight.shape
        torch.Size([784, 64])
        >>> ps.report(ae).unique_params  # 784*64 weights stored once, plus both biases
        51024
    """
    if not isinstance(transpose, bool):
        raise SharingError(f"transpose must be True or False, got {transpose!r}")
    index = ModelIndex(model)
    if not targets:
        raise SharingError(f"tie needs at least one target: ps.tie(model, {source!r}, 'other.weight')")
    src_use = index.use(source)
    src, src_t = _source_backing(src_use, "it")
    plan_ops = []
    seen = set()
    for name in targets:
        if name == source:
            raise SharingError(f"cannot tie {source!r} to itself; name a different target")
        if name in seen:
            raise SharingError(f"target {name!r} is listed twice")
        seen.add(name)
        use = index.use(name)
        plan_ops.append((use, _target_check(index, src_use, src, src_t, use, transpose)))
    for use, t in plan_ops:
        _point(use, src, t)
    return model


def tie_modules(model: nn.Module, source: str, *targets: str) -> nn.Module:
    """Make every parameter of each target module use the matching parameter of ``source``.

    The modules must have the same structure: the same parameter names and shapes. Ties
    inside the source (an alias, a transposed weight) are reproduced in each target.

    Args:
        model: the module holding the submodules (changed in place).
        source: dotted name of the module whose parameters are shared (as in ``named_modules``).
        *targets: dotted names of the modules that will use them.

    Returns:
        ``model``.

    Raises:
        SharingError: unknown module names, different structures (the differences are
            listed), a module tied to itself. The model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> net = nn.ModuleDict({"a": nn.Linear(8, 8), "b": nn.Linear(8, 8)})
        >>> net = ps.tie_modules(net, "a", "b")
        >>> net["a"].weight is net["b"].weight and net["a"].bias is net["b"].bias
        True
    """
    index = ModelIndex(model)
    if not targets:
        raise SharingError(f"tie_modules needs at least one target module: ps.tie_modules(model, {source!r}, 'other')")
    index.module(source)
    src_uses = index.uses_in(source)
    if not src_uses:
        raise SharingError(f"module {source!r} has no parameters to share")
    ops = []
    seen = set()
    for t in targets:
        if t == source:
            raise SharingError(f"cannot tie module {source!r} to itself; name a different target")
        if t in seen:
            raise SharingError(f"target module {t!r} is listed twice")
        seen.add(t)
        index.module(t)
        if t.startswith(source + ".") or source.startswith(t + ".") or not source or not t:
            raise SharingError(f"cannot tie module {t!r} to {source!r}: one contains the other")
        tgt_uses = index.uses_in(t)
        diffs = _structure_diffs(src_uses, tgt_uses, source or "<model>", t)
        if diffs:
            raise SharingError(
                f"cannot tie module {t!r} to {source!r}: structures differ:\n  - " + "\n  - ".join(diffs[:8])
                + (f"\n  - ... {len(diffs) - 8} more" if len(diffs) > 8 else "")
            )
        for rel, su in src_uses.items():
            p, pt = _source_backing(su, "modules")
            ops.append((tgt_uses[rel], p, pt))
    for use, p, pt in ops:
        _point(use, p, pt)
    return model


def _structure_diffs(a: Mapping[str, Use], b: Mapping[str, Use], a_name: str, b_name: str) -> list[str]:
    """Differences between two modules' uses (names, shapes, dtypes, devices)."""
    diffs = []
    for rel in a:
        if rel not in b:
            diffs.append(f"{b_name!r} has no parameter {rel!r} (which {a_name!r} has)")
    for rel in b:
        if rel not in a:
            diffs.append(f"{b_name!r} has a parameter {rel!r} that {a_name!r} does not have")
    with torch.no_grad():
        for rel in a:
            if rel in b:
                va, vb = a[rel].value(), b[rel].value()
                if tuple(va.shape) != tuple(vb.shape):
                    diffs.append(f"{rel!r} is {fmt_shape(va.shape)} in {a_name!r} but {fmt_shape(vb.shape)} in {b_name!r}")
                elif va.dtype != vb.dtype:
                    diffs.append(f"{rel!r} is {va.dtype} in {a_name!r} but {vb.dtype} in {b_name!r}")
                elif va.device != vb.device:
                    diffs.append(f"{rel!r} is on {va.device} in {a_name!r} but on {vb.device} in {b_name!r}")
                else:
                    foreign = _foreign_parametrization(b[rel])
                    if foreign:
                        diffs.append(f"{b_name}.{rel} is computed by parametrizations ({foreign}); remove them first")
    return diffs


def untie(model: nn.Module, *names: str) -> nn.Module:
    """Give each named parameter (with no names: every shared one) its own copy of its value.

    Sharing is relaxed to independent parameters with the same values. The uses that keep
    sharing (or, when a group dissolves, its first plain use) keep the original
    ``nn.Parameter`` object, so an existing optimizer still steps it. A transposed use
    becomes a plain parameter holding the transposed value. Untying a parameter that shares
    nothing does nothing.

    Args:
        model: the module (changed in place).
        *names: dotted names of used parameters; none means all.

    Returns:
        ``model``.

    Raises:
        SharingError: an unknown name; the model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> m = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
        >>> m = ps.untie(m, "1.weight")
        >>> m[0].weight is m[1].weight, bool((m[0].weight == m[1].weight).all())
        (False, True)
    """
    index = ModelIndex(model)
    for n in names:
        index.use(n)
    wanted = set(names)
    groups = _find(index)
    backing_groups = [g for g in groups if get_kind(g.kind).shares_backing]
    other_groups = [g for g in groups if not get_kind(g.kind).shares_backing and (not wanted or wanted & set(g.members))]
    for g in other_groups:
        if type(get_kind(g.kind)).untie is Kind.untie:
            raise SharingError(f"sharing kind {g.kind!r} cannot be untied")
    # Uses that share a stored parameter, by storage view (aliases, storage-sharing copies,
    # transposed reads).
    buckets: dict[object, list[str]] = {}
    for g in backing_groups:
        for m in g.members:
            p, _ = index.uses[m].backing()
            buckets.setdefault(view_key(p), [])
    for name, use in index.uses.items():
        p, _ = use.backing()
        if p is not None and view_key(p) in buckets:
            buckets[view_key(p)].append(name)
    copies: list[Use] = []
    for members in buckets.values():
        selected = [m for m in members if not wanted or m in wanted]
        if not selected:
            continue
        if len(members) < 2:  # a lone transposed read of a tensor no module holds plainly
            copies += [index.uses[m] for m in members if index.uses[m].derived]
            continue
        remaining = [m for m in members if m not in selected]
        if len(remaining) >= 2:
            copies += [index.uses[m] for m in selected]
            continue
        # the group dissolves: its first plain use keeps the original object
        plain = [m for m in members if not index.uses[m].derived]
        keeper = plain[0] if plain else None
        copies += [index.uses[m] for m in members if m != keeper]
    with torch.no_grad():
        for use in copies:
            p, transposed = use.backing()
            value = p.detach().transpose(0, 1) if transposed else p.detach()
            fresh = nn.Parameter(value.clone(memory_format=torch.contiguous_format), requires_grad=p.requires_grad)
            set_plain(use.module, use.attr, fresh)
    for g in other_groups:
        get_kind(g.kind).untie(ModelIndex(model), g, (wanted & set(g.members)) or set(g.members))
    return model


def find_ties(model: nn.Module) -> list[TieGroup]:
    """The tie groups of a model, every kind, in a deterministic order.

    Finds shared ``nn.Parameter`` objects and distinct parameters that are the same view of
    one storage (``alias``; non-overlapping views of one storage are not ties), transposed
    reads made by :func:`tie` (``transpose``), and the groups of every other registered kind.

    Args:
        model: any ``nn.Module``.

    Returns:
        A list of :class:`TieGroup`, ordered by kind and then by model order.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> m = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
        >>> ps.find_ties(m)[0].members
        ('0.weight', '1.weight')
    """
    return _find(ModelIndex(model))


def plan(model: nn.Module) -> SharingPlan:
    """Read the sharing plan off a live model (every tie group, with shapes).

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> m = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
        >>> print(ps.plan(m))
        SharingPlan (1 group)
          alias: 0.weight -> 0.weight, 1.weight
    """
    return SharingPlan(tuple(find_ties(model)))


def _as_plan(p) -> SharingPlan:
    if isinstance(p, SharingPlan):
        return p
    if isinstance(p, (str, bytes)):
        return SharingPlan.from_json(p)
    if isinstance(p, Mapping):
        return SharingPlan.from_dict(p)
    raise SharingError(f"expected a SharingPlan (or its JSON or dict), got {type(p).__name__}")


def apply_plan(model: nn.Module, plan: SharingPlan | str | Mapping) -> nn.Module:
    """Impose a sharing plan on a model with the same parameter names.

    The model may be freshly built untied, built on the meta device and materialised with
    ``to_empty``, or one whose ties ``load_state_dict(assign=True)`` broke. Each group keeps
    its source's current value. Ties the model has that the plan does not mention are left
    alone (``check`` lists them).

    Args:
        model: the module (changed in place).
        plan: a :class:`SharingPlan`, or its JSON text or dict.

    Returns:
        ``model``.

    Raises:
        SharingError: names the plan uses that the model lacks, shape, dtype or device
            mismatches, a member in two groups; all problems are listed and the model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> make = lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> p = ps.plan(ps.tie(make(), "0.weight", "1.weight"))
        >>> fresh = ps.apply_plan(make(), p)
        >>> fresh[0].weight is fresh[1].weight
        True
    """
    p = _as_plan(plan)
    index = ModelIndex(model)
    problems: list[str] = []
    owner: dict[str, TieGroup] = {}
    for g in p:
        problems += get_kind(g.kind).validate(index, g)
        for m in g.members:
            if m in owner and not (owner[m].kind == g.kind == "alias" and m == g.source):
                problems.append(f"{m!r} is a member of two groups ({owner[m]}) and ({g})")
            owner.setdefault(m, g)
    if problems:
        raise SharingError("cannot apply the sharing plan:\n  - " + "\n  - ".join(dict.fromkeys(problems)))
    order = {name: i for i, name in enumerate(kind_names())}
    for kind_name in sorted({g.kind for g in p}, key=order.__getitem__):
        kind = get_kind(kind_name)
        index = ModelIndex(model)
        for g in p:
            if g.kind == kind_name:
                kind.install(index, g)
    return model


def check(model: nn.Module, plan: SharingPlan | str | Mapping) -> list[str]:
    """How a model differs from a sharing plan: ``[]`` when it matches.

    Lists missing parameters, shape changes, groups whose members no longer share storage
    (as after ``to_empty`` or ``load_state_dict(assign=True)``), and ties the model has that
    the plan does not.

    Args:
        model: the module to check (not changed).
        plan: a :class:`SharingPlan`, or its JSON text or dict.

    Returns:
        Human-readable problems, one string each.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> m = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
        >>> p = ps.plan(m)
        >>> _ = m.load_state_dict(m.state_dict(), assign=True)  # breaks the tie
        >>> len(ps.check(m, p)), ps.check(ps.apply_plan(m, p), p)
        (1, [])
    """
    p = _as_plan(plan)
    index = ModelIndex(model)
    problems: list[str] = []
    for g in p:
        problems += get_kind(g.kind).check(index, g)
    for actual in _find(index):
        covered = any(g.kind == actual.kind and set(actual.members) <= set(g.members) for g in p)
        if not covered:
            problems.append(f"the model has a tie the plan does not: {actual}")
    return list(dict.fromkeys(problems))
