"""Template banks: N layers' weights as combinations of T shared templates; back to dense.

``template_share`` (Savarese & Maire 2019) turns the same parameter of N structurally
identical layers into ``sum_t coeff[l, t] * template[t]`` (the ``bank`` kind, form ``"mix"``);
``materialize`` turns any bank or delta weight back into a plain parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from ._index import ModelIndex, Use
from ._parametrize import set_derived
from .errors import SharingError, did_you_mean
from .kinds._common import fmt_shape
from .kinds._derived import dense, materialize_uses, own_parametrization, requires_grad_of
from .kinds.bank import Bank, fit_mix
from .kinds.delta import Delta

__all__ = ["template_share", "materialize"]

INITS = ("lstsq", "random")


def _layer_modules(layers, what: str) -> list[nn.Module]:
    if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise SharingError(
            f"{what} needs the layers as an nn.ModuleList, nn.Sequential or a list of modules, got one {type(layers).__name__}"
        )
    try:
        mods = list(layers)
    except TypeError:
        raise SharingError(f"{what} needs a sequence of layers, got {type(layers).__name__}") from None
    bad = [i for i, m in enumerate(mods) if not isinstance(m, nn.Module)]
    if bad:
        raise SharingError(f"{what}: layer {bad[0]} is a {type(mods[bad[0]]).__name__}, not an nn.Module")
    if not mods:
        raise SharingError(f"{what} needs at least one layer, got none")
    ids = [id(m) for m in mods]
    if len(set(ids)) != len(ids):
        dup = next(i for i, x in enumerate(ids) if ids.index(x) != i)
        raise SharingError(
            f"{what}: layer {dup} is the same module object as layer {ids.index(ids[dup])}; "
            "pass distinct layers"
        )
    return mods


def _patterns(params, what: str) -> list[str]:
    if isinstance(params, str):
        params = (params,)
    try:
        pats = list(params)
    except TypeError:
        raise SharingError(f"{what} must be a name, a glob pattern or a list of them, got {params!r}") from None
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise SharingError(f"{what} must be a non-empty list of names or glob patterns, got {params!r}")
    return pats


def _check_int(value, name: str, lo: int, hi: int | None, hint: str = "") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise SharingError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise SharingError(f"{name}={value} is out of range: it must be {rng}{hint}")
    return value


def template_share(
    layers: nn.ModuleList | nn.Sequential | Sequence[nn.Module],
    templates: int,
    params: str | Sequence[str] = ("weight",),
    init: str = "lstsq",
):
    """Express a parameter of N identical layers as mixtures of T shared templates.

    For each parameter named by ``params``, layer ``l`` uses ``sum_t coeff[l, t] * template[t]``:
    the T templates are stored once, each layer keeps only T coefficients (the ``bank`` kind,
    form ``"mix"``). Templates and coefficients are ``nn.Parameter`` s, so they train.
    ``T = N`` (with ``init="lstsq"``) reproduces every layer exactly; ``T = 1`` is full
    sharing up to a per-layer scale.

    Args:
        layers: N structurally identical modules (``nn.ModuleList``, ``nn.Sequential`` or a
            list); changed in place.
        templates: T, between 1 and N.
        params: names or glob patterns of parameters inside each layer, e.g. ``("weight",)``
            for Linear layers, ``("0.weight",)`` or ``("*.weight",)`` for blocks. Each matched
            name becomes its own bank across the layers.
        init: ``"lstsq"`` fits templates and coefficients to the current weights (the best
            rank-T approximation across layers, in the least-squares sense); ``"random"``
            starts fresh (templates drawn like ``nn.Linear``'s initialisation, unit-norm random
            coefficients).

    Returns:
        ``layers``.

    Raises:
        SharingError: T outside 1..N, a pattern that matches nothing, layers whose matched
            parameters differ in shape, dtype or device or are already computed by a
            parametrization, a bad ``init``. The layers are unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> stack = nn.ModuleList(nn.Linear(32, 32) for _ in range(6))
        >>> x = torch.randn(2, 32)
        >>> before = [layer(x) for layer in stack]
        >>> stack = ps.template_share(stack, templates=6)  # T = N: exact
        >>> all(torch.equal(layer(x), y) for layer, y in zip(stack, before))
        True
        >>> stack = ps.template_share(nn.ModuleList(nn.Linear(32, 32) for _ in range(6)), templates=2)
        >>> ps.report(stack).unique_params  # 2 templates of 32*32, 6*2 coefficients, 6 biases
        2252
    """
    mods = _layer_modules(layers, "template_share")
    n = len(mods)
    _check_int(templates, "templates", 1, n, f" (the number of layers, {n})")
    if init not in INITS:
        raise SharingError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    pats = _patterns(params, "params")
    indexes = [ModelIndex(m) for m in mods]
    names0 = list(indexes[0].uses)
    matched: list[str] = []
    for pat in pats:
        hits = [r for r in names0 if fnmatchcase(r, pat)]
        if not hits:
            raise SharingError(
                f"params pattern {pat!r} matches no parameter of layer "
                "0" + did_you_mean(pat, names0, "parameter")
            )
        matched += [h for h in hits if h not in matched]
    plans: list[tuple[str, list[Use]]] = []
    for rel in matched:
        uses = []
        for i, ix in enumerate(indexes):
            use = ix.uses.get(rel)
            if use is None:
                raise SharingError(f"layer {i} has no parameter {rel!r} (layer 0 has); template_share needs identical layers")
            if use.derived:
                kinds = ", ".join(type(p).__name__ for p in use.plist)
                raise SharingError(
                    f"layer {i}'s {rel!r} is computed by a parametrization ({kinds}); template_share needs plain "
                    "parameters: ps.materialize or ps.untie it first"
                )
            uses.append(use)
        v0 = uses[0].param
        for i, u in enumerate(uses[1:], 1):
            p = u.param
            if tuple(p.shape) != tuple(v0.shape):
                raise SharingError(f"{rel!r} is {fmt_shape(v0.shape)} in layer 0 but {fmt_shape(p.shape)} in layer {i}; "
                                   "template_share needs identical layers")
            if p.dtype != v0.dtype:
                raise SharingError(
                    f"{rel!r} is {v0.dtype} in layer 0 but {p.dtype} in layer {i}; "
                    "convert the layers to one dtype first"
                )
            if p.device != v0.device:
                raise SharingError(
                    f"{rel!r} is on {v0.device} in layer 0 but on {p.device} in layer {i}; "
                    "move the layers to one device first"
                )
        plans.append((rel, uses))
    # Everything is valid: compute the banks, then install them.
    built = []
    with torch.no_grad():
        for rel, uses in plans:
            values = torch.stack([u.param.detach() for u in uses])
            if values.device.type == "meta":
                t = torch.empty((templates,) + tuple(values.shape[1:]), dtype=values.dtype, device=values.device)
                c = torch.empty(n, templates, dtype=values.dtype, device=values.device)
            elif init == "lstsq":
                t, c = fit_mix(values, templates)
            else:
                t, c = _random_bank(values, templates)
            built.append((uses, nn.Parameter(dense(t), requires_grad=requires_grad_of(uses[0])), c))
    for uses, tmpl, c in built:
        shape = tuple(tmpl.shape[1:])
        for i, u in enumerate(uses):
            set_derived(u.module, u.attr, Bank("mix", c[i].clone(), shape), tmpl)
    return layers


def _random_bank(values: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.shape[0]
    shape = tuple(values.shape[1:])
    tmpl = torch.empty((t,) + shape, dtype=values.dtype, device=values.device)
    for i in range(t):
        if len(shape) >= 2:
            nn.init.kaiming_uniform_(tmpl[i], a=math.sqrt(5))
        else:
            bound = 1.0 / math.sqrt(max(1, shape[0] if shape else 1))
            nn.init.uniform_(tmpl[i], -bound, bound)
    c = torch.randn(n, t, dtype=torch.float64)
    c = c / c.norm(dim=1, keepdim=True)
    return tmpl, c.to(dtype=values.dtype, device=values.device)


def materialize(model: nn.Module, *names: str) -> nn.Module:
    """Turn bank and delta weights back into plain, dense parameters with the same values.

    Each named use (with no names: every use computed by a ``bank`` or ``delta``) becomes an
    ordinary ``nn.Parameter`` holding exactly the tensor it computed, so the model's outputs
    are unchanged. Templates, coefficients, bases and deltas that no use needs any more are
    dropped. Like :func:`paramshare.untie`, for the learned kinds.

    Args:
        model: the module (changed in place).
        *names: dotted names of used parameters, as in ``named_parameters`` before sharing
            (e.g. ``"blocks.0.weight"``); none means all bank and delta uses.

    Returns:
        ``model``.

    Raises:
        SharingError: an unknown name, or a name that is not computed by a bank or delta.
            The model is unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> stack = ps.template_share(nn.ModuleList(nn.Linear(8, 8) for _ in range(4)), templates=2)
        >>> x = torch.randn(3, 8)
        >>> y = stack[1](x)
        >>> stack = ps.materialize(stack)
        >>> type(stack[1].weight).__name__, torch.equal(stack[1](x), y)
        ('Parameter', True)
    """
    index = ModelIndex(model)
    if names:
        targets = []
        for n in names:
            use = index.use(n)
            if own_parametrization(use, Bank) is None and own_parametrization(use, Delta) is None:
                kinds = ", ".join(type(p).__name__ for p in use.plist) if use.derived else ""
                what = "computed by " + kinds if use.derived else "a plain parameter"
                raise SharingError(
                    f"{n!r} is {what}, not a bank or delta weight; materialize only turns bank/delta weights "
                    "into plain parameters (ps.untie handles aliases and transposes)"
                )
            if use not in targets:
                targets.append(use)
    else:
        targets = [
            u for u in index.uses.values()
            if own_parametrization(u, Bank) is not None or own_parametrization(u, Delta) is not None
        ]
    materialize_uses(targets)
    return model
