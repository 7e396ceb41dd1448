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
from .kinds.bank import Bank, BasisFactors, fit_basis

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
            raise SharingError(
                f"pattern {pat!r} matches no parameter of the "
                "model" + did_you_mean(pat, index.uses, "parameter")
            )
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
            raise SharingError(
                f"pattern {pat!r} matches {hits[0].name!r} of shape {fmt_shape(w.shape)}; "
                "a basis needs weights of 2 or more dimensions"
            )
        for u in hits[1:]:
            if u.param.dtype != w.dtype:
                raise SharingError(
                    f"{u.name!r} is {u.param.dtype} but {hits[0].name!r} is {w.dtype}; "
                    "convert the model to one dtype first"
                )
            if u.param.device != w.device:
                raise SharingError(
                    f"{u.name!r} is on {u.param.device} but {hits[0].name!r} is on {w.device}; "
                    "move the model to one device first"
                )
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
    numbers instead of ``n * out * in``; without calibration ``ratio`` picks the largest k that
    removes at least that fraction of every family's parameters. ``group_size=1`` is per-layer
    truncated SVD.

    With ``calibration`` the factorisation is activation-aware: it minimises an estimate of the
    error in the model's *outputs* on those batches rather than of the weights. Two statistics
    are recorded per weight: the second moments of its inputs (as SVD-LLM whitens by them), and
    how strongly each of its output channels moves the model's outputs (a random projection of
    the outputs backpropagated to the layer: an estimate of the diagonal of ``J^T J``). The
    shared basis is the SVD of the group's stacked weights, rows scaled by that sensitivity and
    columns whitened by the summed input moments; each layer's coefficients are then refitted
    to its own inputs, and a few rounds of basis step + refit fit the shared basis to each
    layer's own input moments (the summed whitening is exact only when they are equal; each
    layer's moments are shrunk toward the group's mean by ``d / (d + tokens)``, so scarce
    calibration data is not overfitted); and with ``ratio`` each family's budget is shared among its groups where
    that error falls fastest, so ranks may differ between groups (the family as a whole still
    loses at least ``ratio`` of its parameters).

    Args:
        model: the model (changed in place), e.g. a Hugging Face BERT or a plain stack.
        pattern: a glob or a list of globs over used parameter names, e.g.
            ``"encoder.layer.*.attention.self.query.weight"``; each glob is one family.
        ratio: fraction of each family's parameters to remove, in (0, 1).
        rank: or an explicit basis rank k for every group (give ``ratio`` or ``rank``).
        group_size: how many consecutive layers share one basis (the last group may be smaller).
            With calibration, sharing pays when there is enough of it: on MiniLM, 512 sentences
            (about 30 tokens per input dimension) favour 2 (cosine 0.953 vs 0.950 for 1 at 20%
            removed), 64 sentences (about 4) favour 1 (0.919 vs 0.916).
        calibration: optional iterable of input batches: a tensor is passed positionally
            (``model(batch)``), a dict as keyword arguments (``model(**batch)``), a tuple or list
            as positional arguments. Run in eval mode (restored afterwards), one forward and
            one backward pass per batch; a dict's ``attention_mask`` (batch, sequence) leaves
            padding positions out. Calibration needs weights applied to the last dimension of
            their module's input (``nn.Linear``). When the model returns no floating tensor,
            every output channel counts the same.

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
    fam_groups: list[list[list[Use]]] = []
    ranks: list[list[int]] = []
    for pat, uses in families:
        shape = tuple(uses[0].param.shape)
        gl = [uses[g0 : g0 + group_size] for g0 in range(0, len(uses), group_size)]
        ks = []
        for members in gl:
            what = f"the group {members[0].name!r}" + (f" .. {members[-1].name!r}" if len(members) > 1 else "")
            ks.append(_rank_for(len(members), shape, ratio, rank, what))
        fam_groups.append(gl)
        ranks.append(ks)
    stats = None
    if calibration is not None:
        stats = _calibrate(model, calibration, [u for _, uses in families for u in uses])

    def weights_of(members):
        grams = None if stats is None else [stats[u.name].gram for u in members]
        rows = None if stats is None else [stats[u.name].row_weights() for u in members]
        tokens = None if stats is None else min(stats[u.name].tokens for u in members)
        return grams, (None if rows is None or any(r is None for r in rows) else rows), tokens

    factors: dict[int, BasisFactors] = {}
    if stats is not None and not _is_meta(families):
        with torch.no_grad():
            for gl in fam_groups:
                for members in gl:
                    factors[id(members[0])] = BasisFactors([u.param.detach() for u in members], *weights_of(members))
        if ratio is not None:
            ranks = [_allocate(gl, ratio, [factors[id(m[0])] for m in gl]) for gl in fam_groups]
    # Everything is valid: factorise each group, then install.
    built = []
    for gl, ks in zip(fam_groups, ranks):
        for members, k in zip(gl, ks):
            with torch.no_grad():
                values = [u.param.detach() for u in members]
                if values[0].device.type == "meta":
                    t = torch.empty((k,) + tuple(values[0].shape[1:]), dtype=values[0].dtype, device="meta")
                    coeffs = [torch.empty(v.shape[0], k, dtype=v.dtype, device="meta") for v in values]
                elif id(members[0]) in factors:
                    t, coeffs = factors[id(members[0])].fit(k)
                else:
                    t, coeffs = fit_basis(values, k, FORM)
            built.append((members, nn.Parameter(dense(t), requires_grad=requires_grad_of(members[0])), coeffs))
    for members, tmpl, coeffs in built:
        for u, c in zip(members, coeffs):
            set_derived(u.module, u.attr, Bank(FORM, c, tuple(u.param.shape)), tmpl)
    return model


def _is_meta(families) -> bool:
    return any(u.param.device.type == "meta" for _, uses in families for u in uses)


def _allocate(groups: list[list[Use]], ratio: float, factors: list[BasisFactors]) -> list[int]:
    """Ranks for a family's groups that keep at most (1 - ratio) of its parameters.

    Every group gets rank 1; the rest of the budget goes, one rank at a time, where it removes
    the most calibrated output error per stored number: the next singular value squared of the
    group's weighted, whitened stacked weights over the numbers that rank costs. With equal
    costs this keeps the largest components across the whole family.
    """
    shape = tuple(groups[0][0].param.shape)
    out, inn = int(shape[0]), int(math.prod(shape[1:]))
    total = sum(len(g) * out * inn for g in groups)
    budget = math.floor((1.0 - ratio) * total + 1e-9)
    costs = [inn + len(g) * out for g in groups]
    ks = [1] * len(groups)
    used = sum(costs)
    candidates = []
    for gi, (members, f) in enumerate(zip(groups, factors)):
        full = min(len(members) * out, inn)
        candidates += [(v * v / costs[gi], gi) for v in f.s[1:full].tolist()]
    candidates.sort(key=lambda c: -c[0])
    for _, gi in candidates:
        if used + costs[gi] <= budget:
            ks[gi] += 1
            used += costs[gi]
    return ks


# ---- calibration -------------------------------------------------------------------------------
def _run(model: nn.Module, batch, i: int):
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    else:
        raise SharingError(
            f"calibration batch {i} is a {type(batch).__name__}; give tensors (passed positionally), "
            "dicts (keyword arguments) or tuples (positional arguments)"
        )


class _Stats:
    """What calibration records for one weight: input Gram, tokens seen, output sensitivity."""

    def __init__(self):
        self.gram: torch.Tensor | None = None
        self.tokens = 0
        self.sens: torch.Tensor | None = None  # sum over tokens of (d proj / d output)^2, per output channel

    def row_weights(self) -> torch.Tensor | None:
        if self.sens is None or self.tokens == 0:
            return None
        d = (self.sens / self.tokens).sqrt()
        return d.clamp(min=1e-6 * float(d.max().clamp(min=1e-30)))


def _float_tensors(out) -> list[torch.Tensor]:
    """The floating tensors a model returned (tensors, tuples, lists, dicts, Hugging Face outputs)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _float_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _float_tensors(v)]
    return []


def _calibrate(model: nn.Module, calibration, uses: list[Use]) -> dict[str, _Stats]:
    """Per use: the Gram matrix ``X^T X`` (float64) of its module's inputs over the calibration
    batches, and how strongly each of its output channels moves the model's outputs.

    The sensitivity is ``E[(d(r . f(x)) / d y)^2]`` per output channel ``y`` of the layer, with
    ``r`` a random Gaussian projection of the model's floating outputs ``f(x)``: an unbiased
    estimate of the diagonal of ``J^T J`` (J: the Jacobian of the outputs with respect to the
    layer's output), i.e. how much an error in that channel changes what the model returns.
    """
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
    stats: dict[str, _Stats] = {u.name: _Stats() for u in uses}
    state: dict = {"mask": None, "outputs": []}
    problems: list[str] = []

    def select(t: torch.Tensor) -> torch.Tensor:
        """Rows of a (..., features) tensor, padding positions left out."""
        mask = state["mask"]
        if mask is not None and t.dim() >= 3 and tuple(t.shape[:2]) == tuple(mask.shape):
            t = t[mask.to(device=t.device, dtype=torch.bool)]
        return t.reshape(-1, t.shape[-1]).to(torch.float64)

    def pre_hook(module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        for u in by_module[id(module)]:
            if x is None or x.shape[-1] != u.param.shape[1]:
                got = "no tensor" if x is None else f"an input of shape {fmt_shape(x.shape)}"
                problems.append(
                    f"{u.name!r} of shape {fmt_shape(u.param.shape)} got {got} in calibration; calibration needs "
                    "weights applied to the last dimension of their module's input (nn.Linear)"
                )
                continue
            rows = select(x.detach())
            st = stats[u.name]
            g = rows.T @ rows
            st.gram = g if st.gram is None else st.gram + g
            st.tokens += rows.shape[0]

    def post_hook(module, args, out):
        if isinstance(out, torch.Tensor) and out.requires_grad:
            state["outputs"].append((id(module), out))

    handles = []
    modes = [(m, m.training) for m in model.modules()]
    grad_flags = [(u.param, u.param.requires_grad) for u in uses]
    gen = torch.Generator().manual_seed(0)
    try:
        for us in by_module.values():
            handles.append(us[0].module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(us[0].module.register_forward_hook(post_hook))
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(True)  # so every layer's output is part of the graph
        for i, batch in enumerate(batches):
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            state["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            state["outputs"] = []
            try:
                with torch.enable_grad():
                    out = _run(model, batch, i)
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
            with torch.enable_grad():
                _accumulate_sensitivity(out, state, stats, by_module, select, gen)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    unused = [u.name for u in uses if stats[u.name].gram is None]
    if unused:
        raise SharingError(
            f"the calibration batches never reached {', '.join(map(repr, unused[:4]))}"
            f"{' and more' if len(unused) > 4 else ''}; pass batches that run through those layers"
        )
    return stats


def _accumulate_sensitivity(out, state, stats, by_module, select, gen) -> None:
    """Backpropagate a random projection of the outputs to every recorded layer output."""
    targets = [t for t in _float_tensors(out) if t.requires_grad]
    captured = state["outputs"]
    state["outputs"] = []
    if not targets or not captured:
        return
    total = 0
    for t in targets:
        r = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(device=t.device, dtype=t.dtype)
        mask = state["mask"]
        if mask is not None and t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
            r = r * mask.to(device=t.device, dtype=t.dtype).reshape(tuple(mask.shape) + (1,) * (t.dim() - 2))
        total = total + (t * r).sum()
    grads = torch.autograd.grad(total, [o for _, o in captured], allow_unused=True)
    for (mid, _), g in zip(captured, grads):
        if g is None:
            continue
        sq = select(g.detach()).square().sum(0)
        for u in by_module[mid]:
            st = stats[u.name]
            if sq.shape[0] == u.param.shape[0]:
                st.sens = sq if st.sens is None else st.sens + sq
