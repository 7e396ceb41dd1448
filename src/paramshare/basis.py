"""Basis sharing (Wang et al., ICLR 2025): consecutive layers share one SVD basis.

For each family of same-shaped weights (one glob of ``pattern``: the query projections of
every layer, say), groups of ``group_size`` consecutive layers share a basis ``B`` ``(k, in)``
and each layer keeps its own coefficients ``C_i`` ``(out, k)``: ``W_i ~ C_i @ B`` (the ``bank``
kind, form ``"basis_in"``). With calibration inputs the factorisation minimises the error of
each layer's *outputs* on those inputs, not of its weights (whitening by the inputs' second
moments, as SVD-LLM does), which is what keeps a compressed model's behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from ._index import ModelIndex, Use
from ._parametrize import set_derived
from .bank import _check_int
from .errors import SharingError, did_you_mean
from .kinds._common import fmt_shape
from .kinds._derived import dense, requires_grad_of
from .kinds.bank import Bank, fit_basis

__all__ = ["basis_share"]

FORM = "basis_in"


def _family_uses(index: ModelIndex, pattern) -> list[tuple[str, list[Use]]]:
    pats = [pattern] if isinstance(pattern, str) else pattern
    try:
        pats = list(pats)
    except TypeError:
        raise SharingError(f"pattern must be a glob or a list of globs, got {pattern!r}") from None
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise SharingError(f"pattern must be a glob or a non-empty list of globs, got {pattern!r}")
    families = []
    owner: dict[str, str] = {}
    for pat in pats:
        hits = [u for n, u in index.uses.items() if fnmatchcase(n, pat)]
        if not hits:
            raise SharingError(f"pattern {pat!r} matches no parameter of the model" + did_you_mean(pat, index.uses, "parameter"))
        for u in hits:
            if u.name in owner:
                raise SharingError(
                    f"{u.name!r} matches both {owner[u.name]!r} and {pat!r}; each weight may belong to one family "
                    "(in these globs '*' also matches dots: narrow one, e.g. with '?' or '[0-9]' for a layer number)"
                )
            owner[u.name] = pat
            if u.derived:
                kinds = ", ".join(type(p).__name__ for p in u.plist)
                raise SharingError(
                    f"{u.name!r} (matched by {pat!r}) is computed by a parametrization ({kinds}); basis_share needs "
                    "plain weights: ps.materialize or ps.untie it first"
                )
        shapes = {tuple(u.param.shape) for u in hits}
        if len(shapes) > 1:
            listing = ", ".join(f"{u.name} {fmt_shape(u.param.shape)}" for u in hits[:6])
            raise SharingError(
                f"pattern {pat!r} matches weights of different shapes ({listing}{', ...' if len(hits) > 6 else ''}); "
                "a family shares one basis, so give each shape its own glob"
            )
        w = hits[0].param
        if w.dim() < 2:
            raise SharingError(f"pattern {pat!r} matches {hits[0].name!r} of shape {fmt_shape(w.shape)}; a basis needs weights of 2 or more dimensions")
        for u in hits[1:]:
            if u.param.dtype != w.dtype:
                raise SharingError(f"{u.name!r} is {u.param.dtype} but {hits[0].name!r} is {w.dtype}; convert the model to one dtype first")
            if u.param.device != w.device:
                raise SharingError(f"{u.name!r} is on {u.param.device} but {hits[0].name!r} is on {w.device}; move the model to one device first")
        families.append((pat, hits))
    seen: dict[int, str] = {}
    for _, hits in families:
        for u in hits:
            if id(u.param) in seen:
                raise SharingError(
                    f"{u.name!r} and {seen[id(u.param)]!r} are the same parameter; basis_share factorises distinct "
                    "weights: untie them first (ps.untie) or match only one of them"
                )
            seen[id(u.param)] = u.name
    return families


def _rank_for(n: int, shape, ratio: float | None, rank: int | None, what: str) -> int:
    out, inn = int(shape[0]), int(math.prod(shape[1:]))
    full = min(n * out, inn)
    if rank is not None:
        if rank > full:
            raise SharingError(
                f"rank {rank} is larger than {what} allows: {n} stacked weight{'s' if n > 1 else ''} of "
                f"{fmt_shape(shape)} have rank at most {full}; choose rank <= {full}"
            )
        return rank
    k = int(math.floor((1.0 - ratio) * n * out * inn / (inn + n * out) + 1e-9))
    if k < 1:
        raise SharingError(
            f"ratio {ratio} removes every parameter of {what} ({n} x {fmt_shape(shape)}: even a rank-1 basis keeps "
            f"{inn + n * out} of {n * out * inn}); choose a smaller ratio"
        )
    return min(k, full)


def basis_share(
    model: nn.Module,
    pattern: str | Sequence[str],
    ratio: float | None = None,
    rank: int | None = None,
    group_size: int = 2,
    calibration: Iterable | None = None,
) -> nn.Module:
    """Compress same-shaped weights of consecutive layers into shared SVD bases.

    Each glob of ``pattern`` selects a family of same-shaped weights (one per layer, in model
    order); groups of ``group_size`` consecutive members share a basis ``B`` ``(k, in)`` and
    each member keeps coefficients ``C`` ``(out, k)``, so it computes ``W = C @ B`` (the ``bank``
    kind, form ``"basis_in"``). A group of n weights of ``(out, in)`` stores ``k * (in + n * out)``
    numbers instead of ``n * out * in``; ``ratio`` picks the largest k that removes at least that
    fraction of every family's parameters. ``group_size=1`` is per-layer truncated SVD.

    With ``calibration`` (activation-aware, as SVD-LLM), the weights' inputs on those batches
    are recorded and the factorisation minimises the error of each layer's outputs on them
    rather than of its weights: the shared basis comes from the SVD of the stacked weights
    whitened by the group's input second moments, and each layer's coefficients are then
    refitted to its own inputs.

    Args:
        model: the model (changed in place), e.g. a Hugging Face BERT or a plain stack.
        pattern: a glob or a list of globs over used parameter names, e.g.
            ``"encoder.layer.*.attention.self.query.weight"``; each glob is one family.
        ratio: fraction of each family's parameters to remove, in (0, 1).
        rank: or an explicit basis rank k for every group (give ``ratio`` or ``rank``).
        group_size: how many consecutive layers share one basis (the last group may be smaller).
        calibration: optional iterable of input batches: a tensor is passed positionally
            (``model(batch)``), a dict as keyword arguments (``model(**batch)``), a tuple or list
            as positional arguments. Run in eval mode without gradients; a dict's
            ``attention_mask`` (batch, sequence) leaves padding positions out. Calibration needs
            weights applied to the last dimension of their module's input (``nn.Linear``).

    Returns:
        ``model``.

    Raises:
        SharingError: a pattern that matches nothing or matches weights of different shapes,
            ``ratio`` outside (0, 1), a rank larger than the stacked weights allow, both or
            neither of ratio and rank, calibration batches the model cannot run. The model is
            unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> net = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])
        >>> net = ps.basis_share(net, "*.weight", ratio=0.5, group_size=2)
        >>> r = ps.report(net)
        >>> round(1 - (r.unique_params - 4 * 64) / (4 * 64 * 64), 3)  # share of the weights removed
        0.508
        >>> [g.kind for g in ps.find_ties(net)]
        ['bank', 'bank']
    """
    index = ModelIndex(model)
    if (ratio is None) == (rank is None):
        raise SharingError("give exactly one of ratio (the fraction of parameters to remove) or rank (the basis rank)")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
            raise SharingError(f"ratio must be a fraction strictly between 0 and 1, got {ratio!r}")
        ratio = float(ratio)
    if rank is not None:
        _check_int(rank, "rank", 1, None)
    _check_int(group_size, "group_size", 1, None)
    families = _family_uses(index, pattern)
    groups: list[tuple[list[Use], int]] = []
    for pat, uses in families:
        shape = tuple(uses[0].param.shape)
        for g0 in range(0, len(uses), group_size):
            members = uses[g0 : g0 + group_size]
            what = f"the group {members[0].name!r}" + (f" .. {members[-1].name!r}" if len(members) > 1 else "")
            groups.append((members, _rank_for(len(members), shape, ratio, rank, what)))
    grams = None
    if calibration is not None:
        grams = _calibrate(model, calibration, [u for members, _ in groups for u in members])
    # Everything is valid: factorise each group, then install.
    built = []
    for members, k in groups:
        with torch.no_grad():
            values = [u.param.detach() for u in members]
            if values[0].device.type == "meta":
                t = torch.empty((k,) + tuple(values[0].shape[1:]), dtype=values[0].dtype, device="meta")
                coeffs = [torch.empty(v.shape[0], k, dtype=v.dtype, device="meta") for v in values]
            else:
                gs = None if grams is None else [grams[u.name] for u in members]
                t, coeffs = fit_basis(values, k, FORM, gs)
        built.append((members, nn.Parameter(dense(t), requires_grad=requires_grad_of(members[0])), coeffs))
    for members, tmpl, coeffs in built:
        for u, c in zip(members, coeffs):
            set_derived(u.module, u.attr, Bank(FORM, c, tuple(u.param.shape)), tmpl)
    return model


# ---- calibration -------------------------------------------------------------------------------
def _run(model: nn.Module, batch, i: int) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch)
    elif isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        raise SharingError(
            f"calibration batch {i} is a {type(batch).__name__}; give tensors (passed positionally), "
            "dicts (keyword arguments) or tuples (positional arguments)"
        )


def _calibrate(model: nn.Module, calibration, uses: list[Use]) -> dict[str, torch.Tensor]:
    """Input Gram matrices ``X^T X`` (float64) of each use's module over the calibration batches."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        batches = [calibration]
    else:
        try:
            batches = list(calibration)
        except TypeError:
            raise SharingError(f"calibration must be an iterable of input batches, got {type(calibration).__name__}") from None
    if not batches:
        raise SharingError("calibration has no batches; pass at least one input batch (or calibration=None)")
    for u in uses:
        if u.param.dim() != 2:
            raise SharingError(
                f"calibration needs 2-D weights applied to their module's input (nn.Linear); {u.name!r} has shape "
                f"{fmt_shape(u.param.shape)}: call basis_share without calibration for it"
            )
    by_module: dict[int, list[Use]] = {}
    for u in uses:
        by_module.setdefault(id(u.module), []).append(u)
    grams: dict[str, torch.Tensor] = {}
    state = {"mask": None}
    problems: list[str] = []

    def hook(module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        for u in by_module[id(module)]:
            if x is None or x.shape[-1] != u.param.shape[1]:
                got = "no tensor" if x is None else f"an input of shape {fmt_shape(x.shape)}"
                problems.append(
                    f"{u.name!r} of shape {fmt_shape(u.param.shape)} got {got} in calibration; calibration needs "
                    "weights applied to the last dimension of their module's input (nn.Linear)"
                )
                continue
            rows = x.detach()
            mask = state["mask"]
            if mask is not None and rows.dim() >= 3 and tuple(rows.shape[:2]) == tuple(mask.shape):
                rows = rows[mask.to(device=rows.device, dtype=torch.bool)]
            rows = rows.reshape(-1, rows.shape[-1]).to(torch.float64)
            g = rows.T @ rows
            grams[u.name] = grams[u.name] + g if u.name in grams else g

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    try:
        for mid, us in by_module.items():
            handles.append(us[0].module.register_forward_pre_hook(hook, with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(batches):
                state["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                if isinstance(state["mask"], torch.Tensor) and state["mask"].dim() != 2:
                    state["mask"] = None
                try:
                    _run(model, batch, i)
                except SharingError:
                    raise
                except Exception as e:
                    raise SharingError(
                        f"calibration batch {i} cannot run through the model ({type(e).__name__}: {e}); pass batches the "
                        "model accepts: a tensor is passed positionally, a dict as keyword arguments, a tuple as "
                        "positional arguments"
                    ) from None
                if problems:
                    raise SharingError(problems[0])
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    unused = [u.name for u in uses if u.name not in grams]
    if unused:
        raise SharingError(
            f"the calibration batches never reached {', '.join(map(repr, unused[:4]))}"
            f"{' and more' if len(unused) > 4 else ''}; pass batches that run through those layers"
        )
    return grams
