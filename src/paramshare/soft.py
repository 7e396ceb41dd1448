"""Soft tying: penalties that pull parameters toward each other instead of sharing them.

Two models for related tasks, a classifier and an autoencoder of its inputs, a fine-tuned
model and its pretrained start: their parameters should stay *close*, not be one tensor.
A :class:`SoftTie` is an ``nn.Module`` whose call returns a scalar penalty to add to the
loss:

* :func:`soft_tie` ``Omega(a, b) = strength * sum_name dist(a.name, b.name)`` between two models;
* :func:`anchor` the same toward a frozen reference (L2-SP, Li et al. 2018);
* :func:`group_tie` each group of parameters of one model pulled toward the group mean.

Soft tying stores nothing new in the models: both sets of weights stay. When tied pairs have
converged, :func:`harden` turns them into hard ties (one ``nn.Parameter``, the mean value)
and the penalty drops them, which gives the memory back.

The penalty over many tensors is computed with fused multi-tensor ops (``torch._foreach_*``)
inside one autograd function with a hand-written backward, not a Python loop of small
kernels per tensor; it works under ``torch.compile``.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._index import ModelIndex
from .errors import SharingError, did_you_mean
from .kinds._common import fmt_shape
from .plans import TieGroup, get_kind

__all__ = ["SoftTie", "SoftTieWarning", "soft_tie", "anchor", "group_tie", "harden", "NORMS"]

#: The distances a soft tie can use between two tensors ``a`` and ``b`` (``d = a - b``):
#: ``"l2"`` ``sum(d**2)``; ``"l1"`` ``sum(|d|)``; ``"huber"`` ``sum(huber_delta(d))``
#: (quadratic within ``delta``, linear outside); ``"cosine"`` ``1 - cos(a, b)`` of the
#: flattened tensors.
NORMS = ("l2", "l1", "huber", "cosine")

_EPS = 1e-12

Strength = float | Mapping[str, "float | Callable[[int], float]"] | Callable[[int], float]


class SoftTieWarning(UserWarning):
    """Parameters a soft tie left out by default (names on one side only, other shapes)."""


# ---- the fused penalty -------------------------------------------------------------------
def _norms(ts, ord: float = 2.0) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(ts, ord))


def _values(norm: str, delta: float, left, right):
    """Per-entry distances and what the backward pass needs (no autograd)."""
    if norm == "cosine":
        d = torch._foreach_sub(left, right)
        na = _norms(left).clamp_min(_EPS)
        nb = _norms(right).clamp_min(_EPS)
        nd = _norms(d)
        # 1 - cos written as (|a-b|^2 - (|a|-|b|)^2) / (2|a||b|): exact near cos = 1
        v = (nd.square() - (na - nb).square()) / (2 * na * nb)
        return v, (na, nb, 1 - v)
    d = torch._foreach_sub(left, right)
    if norm == "l2":
        return _norms(d).square(), d
    if norm == "l1":
        return _norms(d, 1.0), d
    # huber: with c = clamp(d, -delta, delta), huber(d) = c**2 / 2 + delta * |d - c|
    c = torch._foreach_clamp_min(d, -delta)
    torch._foreach_clamp_max_(c, delta)
    quad = _norms(c).square()
    torch._foreach_sub_(d, c)  # d is now the part beyond +-delta
    return 0.5 * quad + delta * _norms(d, 1.0), c


def _accumulate(contribs: list[list[torch.Tensor]]) -> list[torch.Tensor | None]:
    """Sum each slot's list of gradients, a round of one fused add per extra contribution."""
    out = [c[0] if c else None for c in contribs]
    r = 1
    while True:
        idx = [u for u, c in enumerate(contribs) if len(c) > r]
        if not idx:
            return out
        summed = torch._foreach_add([out[u] for u in idx], [contribs[u][r] for u in idx])
        for u, t in zip(idx, summed):
            out[u] = t
        r += 1


class _Penalty(torch.autograd.Function):
    """``sum_i weights[i] * dist(left[i], right[i])`` with a fused backward.

    The inputs are distinct tensors (``uniq``); ``lmap[i]``/``rmap[i]`` say which of them are
    the left and right side of entry ``i`` (a tensor may appear in several entries, e.g. a
    group mean; ``torch.compile`` needs each input passed once).
    """

    @staticmethod
    def forward(ctx, weights, norm, delta, uniform, lmap, rmap, *uniq):
        left = [uniq[i] for i in lmap]
        right = [uniq[i] for i in rmap]
        v, saved = _values(norm, delta, left, right)
        ctx.norm, ctx.delta, ctx.uniform, ctx.lmap, ctx.rmap, ctx.n_uniq = norm, delta, uniform, lmap, rmap, len(uniq)
        ctx.reuse = None
        ctx.in_place = False
        if norm == "cosine":
            na, nb, cos = saved
            ctx.save_for_backward(weights, na, nb, cos, *uniq)
        elif torch.compiler.is_compiling():
            ctx.save_for_backward(weights, *saved)
        else:
            # Eager: the differences (clamped, for huber) become the gradients in place in the
            # first backward, saving an allocation and a pass; a second backward through the
            # same graph (retain_graph=True) recomputes them from the inputs.
            ctx.save_for_backward(weights, *uniq)
            ctx.reuse = list(saved)
            ctx.in_place = True
        return (v * weights).sum()

    @staticmethod
    def backward(ctx, g):
        lmap, rmap, norm = ctx.lmap, ctx.rmap, ctx.norm
        needs = ctx.needs_input_grad[6:]
        need_left = any(needs[i] for i in lmap)
        need_right = any(needs[i] for i in rmap)
        gl = gr = None
        if norm == "cosine":
            weights, na, nb, cos, *uniq = ctx.saved_tensors
            left = [uniq[i] for i in lmap]
            right = [uniq[i] for i in rmap]
            s = g * weights
            inv = (s / (na * nb)).unbind()
            if need_left:
                gl = torch._foreach_sub(torch._foreach_mul(left, (s * cos / na.square()).unbind()), torch._foreach_mul(right, inv))
            if need_right:
                gr = torch._foreach_sub(torch._foreach_mul(right, (s * cos / nb.square()).unbind()), torch._foreach_mul(left, inv))
        elif need_left or need_right:
            weights, *rest = ctx.saved_tensors
            s = g * weights
            if norm == "l2":
                s = 2 * s
            s = s[0] if ctx.uniform else s.unbind()  # one scalar for all tensors: no per-tensor views
            if not ctx.in_place:  # compiled: the saved differences, left intact
                saved = rest
                if norm == "l1":
                    saved = torch._foreach_sign(saved)
                grads = torch._foreach_mul(saved, s)
            else:
                saved, ctx.reuse = ctx.reuse, None
                if saved is None:  # a second backward: recompute
                    saved = _values(norm, ctx.delta, [rest[i] for i in lmap], [rest[i] for i in rmap])[1]
                if norm == "l1":
                    torch._foreach_sign_(saved)
                torch._foreach_mul_(saved, s)
                grads = saved
            gl = grads if need_left else None
            if need_right:
                gr = torch._foreach_neg(grads)
        contribs: list[list[torch.Tensor]] = [[] for _ in range(ctx.n_uniq)]
        for grads, index in ((gl, lmap), (gr, rmap)):
            if grads is not None:
                for t, u in zip(grads, index):
                    if needs[u]:
                        contribs[u].append(t)
        return (None, None, None, None, None, None, *_accumulate(contribs))


def _get(module: nn.Module, attr: str) -> torch.Tensor:
    p = module._parameters.get(attr)
    return p if p is not None else getattr(module, attr)


# ---- the module --------------------------------------------------------------------------
@dataclass
class _Term:
    """One tied pair, anchored parameter or group: what the penalty sums over."""

    label: str
    left: list[tuple[nn.Module, str]]  # (module, attr) of each model-side member
    right: list | None = None  # pair: [(module, attr)]; anchor: [buffer name]; group: None
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    active: bool = True


class SoftTie(nn.Module):
    """A soft tie: calling it returns the penalty (a scalar tensor) to add to the loss.

    Made by :func:`soft_tie`, :func:`anchor` or :func:`group_tie`. The tied models are not
    registered as submodules: ``soft.parameters()`` is empty, so an optimizer over the models'
    parameters is all that is needed, and ``soft.to(...)`` moves only its own buffers (the
    references of an anchor). Parameters are looked up on their modules at every call, so the
    penalty follows ``load_state_dict(assign=True)`` and re-ties. The penalty is computed by
    one autograd function with fused multi-tensor ops; it can be backpropagated more than
    once (``retain_graph=True``) and compiled with ``torch.compile``, but not differentiated
    twice (``create_graph=True``).

    Attributes:
        kind: ``"pair"`` (soft_tie), ``"anchor"`` or ``"group"``.
        norm: one of :data:`NORMS`.
        names: the labels of the active terms (parameter names; group labels for groups).
        skipped: ``{name: reason}`` for parameters left out by default (also warned about).
        hardened: labels of the terms :func:`harden` turned into hard ties (no longer penalised).
        step_count: how many times :meth:`step` was called (the schedules' argument).

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> soft = ps.soft_tie(a, b, strength=0.1)
        >>> loss = a(torch.ones(1, 4)).sum() + b(torch.ones(1, 4)).sum() + soft()
        >>> loss.backward()
        >>> sorted(soft.distances())
        ['bias', 'weight']
    """

    def __init__(
        self,
        kind: str,
        terms: list[_Term],
        norm: str,
        delta: float,
        strength,
        skipped: dict[str, str],
        roots: tuple[nn.Module, ...],
        references: dict[str, torch.Tensor] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.kind = kind
        self.norm = norm
        self.delta = float(delta)
        self.skipped = dict(skipped)
        self.hardened: list[str] = []
        self.step_count = 0
        self._terms = terms
        self._roots = tuple(roots)  # a tuple: not registered as submodules
        self._schedule = strength  # one float or callable per term
        for name, t in (references or {}).items():
            self.register_buffer(name, t)
        self.register_buffer("weights", torch.zeros(0, dtype=dtype or torch.get_default_dtype(), device=device), persistent=False)
        self._rebuild()

    # ---- structure ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Labels of the terms the penalty sums over (hardened ones excluded)."""
        return [t.label for t in self._terms if t.active]

    def _rebuild(self) -> None:
        """Flatten the active terms into the lists the fused penalty reads."""
        left, right, entry_term, active = [], [], [], []
        groups: dict[int, list[int]] = {}  # group size -> entry offsets of its groups
        for t in self._terms:
            if not t.active:
                continue
            ti = len(active)
            active.append(t)
            if self.kind == "group":
                groups.setdefault(len(t.left), []).append(len(left))
            else:
                right.extend(t.right)
            left.extend(t.left)
            entry_term.extend([ti] * len(t.left))
        self._active = active
        self._left = left
        self._right = right
        self._groups = sorted(groups.items())
        self._entry_term = entry_term
        self._refresh_weights(self._strength_values(self.step_count))

    def _strength_values(self, step: int) -> list[float]:
        """The current strength of every active term; a SharingError for a bad schedule value."""
        out = []
        for t in self._active:
            s = self._schedule[t.label]
            value = s(step) if callable(s) else s
            out.append(_check_strength(value, f"strength of {t.label!r} at step {step}"))
        return out

    def _refresh_weights(self, per_term: list[float]) -> None:
        values = [per_term[i] for i in self._entry_term]
        self._uniform = len(set(values)) <= 1
        w = torch.tensor(values, dtype=self.weights.dtype).to(self.weights.device)
        if w.shape == self.weights.shape:
            with torch.no_grad():
                self.weights.copy_(w)  # in place: a compiled caller sees the same buffer
        else:
            self.weights = w

    # ---- the tensors ---------------------------------------------------------------------
    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        left = [_get(m, a) for m, a in self._left]
        if self.kind == "pair":
            right = [_get(m, a) for m, a in self._right]
        elif self.kind == "anchor":
            bufs = self._buffers
            right = [bufs[n] for n in self._right]
        else:
            right = [None] * len(left)
            for k, starts in self._groups:
                acc = [left[s] for s in starts]
                for j in range(1, k):
                    acc = torch._foreach_add(acc, [left[s + j] for s in starts])
                means = torch._foreach_div(acc, float(k))
                for s, mean in zip(starts, means):
                    right[s : s + k] = [mean] * k
        return left, right

    def forward(self) -> torch.Tensor:
        """The penalty: ``sum over terms of strength * distance`` (a scalar tensor)."""
        if not self._left:
            return self.weights.new_zeros(())
        left = [_get(m, a) for m, a in self._left]
        slot: dict[int, int] = {}
        uniq: list[torch.Tensor] = []
        lmap = []
        for t in left:  # each distinct tensor is one input (aliases appear once)
            u = slot.get(id(t))
            if u is None:
                u = slot[id(t)] = len(uniq)
                uniq.append(t)
            lmap.append(u)
        if self.kind == "group":
            rmap = [0] * len(left)
            for k, starts in self._groups:
                acc = [left[s] for s in starts]
                for j in range(1, k):
                    acc = torch._foreach_add(acc, [left[s + j] for s in starts])
                for s, mean in zip(starts, torch._foreach_div(acc, float(k))):
                    rmap[s : s + k] = [len(uniq)] * k
                    uniq.append(mean)
        else:
            if self.kind == "pair":
                right = [_get(m, a) for m, a in self._right]
            else:
                bufs = self._buffers
                right = [bufs[n] for n in self._right]
            rmap = []
            for t in right:
                u = slot.get(id(t))
                if u is None:
                    u = slot[id(t)] = len(uniq)
                    uniq.append(t)
                rmap.append(u)
        return _Penalty.apply(self.weights, self.norm, self.delta, self._uniform, tuple(lmap), tuple(rmap), *uniq)

    # ---- schedules -------------------------------------------------------------------------
    def step(self) -> None:
        """Advance the strength schedules by one step (call once per training step or epoch).

        Raises:
            SharingError: a schedule returned a negative or non-finite strength; the step
                count is then unchanged.
        """
        values = self._strength_values(self.step_count + 1)
        self.step_count += 1
        self._refresh_weights(values)

    def strengths(self) -> dict[str, float]:
        """The current strength of every active term, by label."""
        return dict(zip(self.names, self._strength_values(self.step_count)))

    # ---- logging ---------------------------------------------------------------------------
    @torch.no_grad()
    def _entry_values(self) -> torch.Tensor:
        left, right = self._tensors()
        return _values(self.norm, self.delta, left, right)[0]

    @torch.no_grad()
    def distances(self) -> dict[str, float]:
        """The unweighted distance of every active term (for logging and plots).

        For a pair or an anchored parameter, the norm's distance between the two tensors
        (the squared L2 distance for ``"l2"``); for a group, the sum over its members of
        their distance to the group mean.
        """
        if not self._left:
            return {}
        v = self._entry_values().double()
        per_term = torch.zeros(len(self._active), dtype=v.dtype, device=v.device)
        per_term.index_add_(0, torch.tensor(self._entry_term, device=v.device), v)
        return dict(zip(self.names, per_term.tolist()))

    @torch.no_grad()
    def relative_distances(self) -> dict[str, float]:
        """The scale-free distance :func:`harden` compares with its threshold, by label.

        ``max ||w_i - w_j|| / max ||w_i||`` over the members of a term (two for a pair: ``||a -
        b|| / max(||a||, ||b||)``; the parameter and its reference for an anchor). 0 when every
        member is zero.
        """
        out = {}
        left, right = self._tensors() if self._left else ([], [])
        if self.kind == "group":
            pos = 0
            for t in self._active:
                members = left[pos : pos + len(t.left)]
                pos += len(t.left)
                scale = max(float(torch.linalg.vector_norm(m.detach().double())) for m in members)
                diam = max(
                    float(torch.linalg.vector_norm((x.detach().double() - y.detach().double())))
                    for i, x in enumerate(members) for y in members[i + 1 :]
                )
                out[t.label] = diam / scale if scale > 0 else 0.0
            return out
        dn = _norms(torch._foreach_sub(left, right)).double()
        scale = torch.maximum(_norms(left).double(), _norms(right).double())
        rel = torch.where(scale > 0, dn / scale.clamp_min(_EPS), torch.zeros_like(dn))
        return dict(zip(self.names, rel.tolist()))

    def extra_repr(self) -> str:
        s = f"kind={self.kind}, norm={self.norm!r}, terms={len(self._active)}"
        if self.norm == "huber":
            s += f", delta={self.delta}"
        if self.hardened:
            s += f", hardened={len(self.hardened)}"
        if self.skipped:
            s += f", skipped={len(self.skipped)}"
        return s + f", step={self.step_count}"


# ---- validation helpers ------------------------------------------------------------------
def _check_strength(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SharingError(f"{what} must be a non-negative number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise SharingError(f"{what} must be a non-negative finite number, got {value!r}; use e.g. strength=1e-3")
    return value


def _check_norm(norm, delta) -> None:
    if not isinstance(norm, str) or norm not in NORMS:
        raise SharingError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, NORMS))}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not (math.isfinite(delta) and delta > 0):
        raise SharingError(f"the Huber delta must be a positive finite number, got {delta!r}")


def _resolve_strength(strength, labels: list[str]) -> dict[str, object]:
    """One float or callable per label, validated at step 0."""
    if isinstance(strength, Mapping):
        keys = list(strength)
        for k in keys:
            if not isinstance(k, str):
                raise SharingError(f"strength dict keys are parameter names or glob patterns, got {k!r}")
        out, used = {}, set()
        for label in labels:
            key = label if label in strength else next((k for k in keys if fnmatch.fnmatchcase(label, k)), None)
            if key is None:
                raise SharingError(
                    f"the strength dict gives no strength for {label!r}; add it (or a '*' default) to the dict"
                )
            used.add(key)
            out[label] = strength[key]
        unused = [k for k in keys if k not in used]
        if unused:
            raise SharingError(
                f"strength dict key {unused[0]!r} matches no tied parameter" + did_you_mean(unused[0], labels, "tied parameter")
            )
    else:
        out = {label: strength for label in labels}
    for label, s in out.items():
        if callable(s):
            try:
                v = s(0)
            except Exception as e:  # a schedule that cannot be evaluated is bad input
                raise SharingError(f"the strength schedule of {label!r} failed at step 0: {e}") from None
            _check_strength(v, f"strength of {label!r} at step 0")
        else:
            _check_strength(s, f"strength of {label!r}")
    return out


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


@dataclass
class _Info:
    """A used parameter as a soft tie sees it."""

    name: str
    module: nn.Module
    attr: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    key: object  # identity of the stored tensor (for deduplication)


def _infos(model: nn.Module, what: str) -> dict[str, _Info]:
    if not isinstance(model, nn.Module):
        raise SharingError(f"{what} must be an nn.Module, got {type(model).__name__}")
    index = ModelIndex(model)
    out = {}
    with torch.no_grad():
        for name, use in index.uses.items():
            v = use.value()
            p = use.param
            key = ("param", id(p)) if p is not None else ("use", id(use.module), use.attr)
            out[name] = _Info(name, use.module, use.attr, tuple(v.shape), v.dtype, v.device, key)
    return out


def _names_list(names) -> list[str]:
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise SharingError(f"names must be a parameter name, a glob pattern or a non-empty list of them, got {names!r}")
    for n in names:
        if not isinstance(n, str) or not n:
            raise SharingError(f"names must be strings (parameter names or glob patterns), got {n!r}")
    return list(names)


def _expand(patterns: list[str], first: Mapping[str, object], second: Mapping[str, object], where: str) -> list[str]:
    """Names selected by exact names and glob patterns, in order, each once."""
    out: dict[str, None] = {}
    for p in patterns:
        if _is_pattern(p):
            matched = [n for n in list(first) + [n for n in second if n not in first] if fnmatch.fnmatchcase(n, p)]
            if not matched:
                raise SharingError(f"pattern {p!r} matches no parameter of {where}" + did_you_mean(p, first, "parameter"))
            out.update(dict.fromkeys(matched))
        else:
            out[p] = None
    return list(out)


def _same_kind(name: str, a: _Info, b, what_a: str, what_b: str) -> None:
    if a.dtype != b.dtype:
        raise SharingError(
            f"cannot soft-tie {name!r}: it is {a.dtype} in {what_a} but {b.dtype} in {what_b}; "
            f"convert both to one dtype first (e.g. .to({a.dtype}))"
        )
    if a.device != b.device:
        raise SharingError(
            f"cannot soft-tie {name!r}: it is on {a.device} in {what_a} but on {b.device} in {what_b}; "
            "move both to one device first"
        )


# ---- public constructors -----------------------------------------------------------------
def soft_tie(a: nn.Module, b: nn.Module, names=None, norm: str = "l2", strength: Strength = 1e-3, *, delta: float = 1.0) -> SoftTie:
    """Pull the parameters of two models with the same layout toward each other.

    The penalty is ``sum over names of strength[name] * dist(a.name, b.name)``, differentiable
    with respect to both models (a side whose parameters do not require gradients is a frozen
    reference). Nothing in either model changes.

    Args:
        a, b: the two models (or two submodules of one model).
        names: parameter names or glob patterns (``"encoder.*"``) present in both models;
            None ties every name present in both with the same shape, and reports (warns
            about and lists in ``.skipped``) the names on one side only or with other shapes.
        norm: ``"l2"`` (squared L2, the default), ``"l1"``, ``"huber"`` or ``"cosine"``
            (``1 - cos``); see :data:`NORMS`.
        strength: a non-negative float; a dict from names or glob patterns to floats or
            schedules (an exact name wins over a pattern, then the first matching pattern);
            or a schedule, a callable ``step -> float`` advanced by :meth:`SoftTie.step`.
        delta: the Huber threshold (only used by ``norm="huber"``).

    Returns:
        A :class:`SoftTie`; call it for the penalty.

    Raises:
        SharingError: a name missing on one side, different shapes, dtypes or devices, a
            glob matching nothing, ``a is b``, a negative strength, an unknown norm. Nothing
            is changed.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> make = lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> net_a, net_b = make(), make()
        >>> soft = ps.soft_tie(net_a, net_b, names="0.*", strength=1e-2)
        >>> soft.names
        ['0.weight', '0.bias']
        >>> soft().item() > 0
        True
    """
    _check_norm(norm, delta)
    if a is b:
        raise SharingError("soft_tie needs two different modules, got the same one twice; to tie parameters within one model use ps.group_tie")
    ia, ib = _infos(a, "a"), _infos(b, "b")
    skipped: dict[str, str] = {}
    if names is None:
        selected = []
        for n, x in ia.items():
            y = ib.get(n)
            if y is None:
                skipped[n] = "only in the first model (a)"
            elif x.shape != y.shape:
                skipped[n] = f"shape {fmt_shape(x.shape)} in a but {fmt_shape(y.shape)} in b"
            else:
                selected.append(n)
        for n in ib:
            if n not in ia:
                skipped[n] = "only in the second model (b)"
        if not selected:
            detail = "".join(f"\n  - {n}: {r}" for n, r in list(skipped.items())[:8])
            raise SharingError("soft_tie found no parameter with the same name and shape in both models:" + (detail or " both have no parameters"))
    else:
        selected = _expand(_names_list(names), ia, ib, "either model")
        for n in selected:
            for info, what, other in ((ia, "the first model (a)", ib), (ib, "the second model (b)", ia)):
                if n not in info:
                    raise SharingError(f"parameter {n!r} is missing in {what}" + did_you_mean(n, info, "parameter"))
            if ia[n].shape != ib[n].shape:
                raise SharingError(
                    f"cannot soft-tie {n!r}: shape {fmt_shape(ia[n].shape)} in the first model (a) but "
                    f"{fmt_shape(ib[n].shape)} in the second model (b); tie only parameters with the same shape"
                )
    terms, seen = [], set()
    for n in selected:
        x, y = ia[n], ib[n]
        _same_kind(n, x, y, "the first model (a)", "the second model (b)")
        if (x.key, y.key) in seen:  # aliases on both sides: one stored pair, one term
            continue
        seen.add((x.key, y.key))
        terms.append(_Term(n, [(x.module, x.attr)], [(y.module, y.attr)], [x.shape]))
    sched = _resolve_strength(strength, [t.label for t in terms])
    _warn_skipped(skipped, "soft_tie")
    first = ia[selected[0]]
    return SoftTie("pair", terms, norm, delta, sched, skipped, (a, b), device=first.device)


def anchor(model: nn.Module, reference=None, names=None, norm: str = "l2", strength: Strength = 1e-3, *, delta: float = 1.0) -> SoftTie:
    """Pull a model's parameters toward a frozen reference (L2-SP when the reference is the start).

    The reference is copied once, without gradients, into the returned module's buffers (it
    is not in ``model.parameters()``, and ``soft.to(...)`` moves it). With ``reference=None``
    the copy is the model's current parameters: call ``anchor`` right before fine-tuning.

    Args:
        model: the model being trained.
        reference: None (snapshot the model now), an ``nn.Module`` with the same parameter
            names, or a state dict (``{name: tensor}``; converted to each parameter's dtype
            and device).
        names: parameter names or glob patterns; None anchors every parameter the reference
            has with the same shape and reports (warns about, lists in ``.skipped``) the others,
            e.g. a new classification head.
        norm, strength, delta: as in :func:`soft_tie`.

    Returns:
        A :class:`SoftTie` of kind ``"anchor"``.

    Raises:
        SharingError: a name missing in the model or the reference, a reference tensor of
            another shape (both shapes shown), a reference that is not a module or a dict of
            tensors, a negative strength, an unknown norm. Nothing is changed.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> net = nn.Linear(4, 2)
        >>> l2sp = ps.anchor(net, strength=0.1)   # snapshot of the start
        >>> l2sp().item()
        0.0
        >>> with torch.no_grad():
        ...     net.bias += 1.0
        >>> round(l2sp().item(), 4)   # 0.1 * (1**2 + 1**2)
        0.2
    """
    _check_norm(norm, delta)
    im = _infos(model, "model")
    ref: dict[str, torch.Tensor]
    if reference is None:
        ref = {n: _get(i.module, i.attr) for n, i in im.items()}
        where = "the model"
    elif isinstance(reference, nn.Module):
        ir = ModelIndex(reference)
        with torch.no_grad():
            ref = {n: u.value() for n, u in ir.uses.items()}
        where = "the reference module"
    elif isinstance(reference, Mapping):
        ref = {}
        for k, v in reference.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise SharingError(f"a reference state dict maps parameter names to tensors; got {k!r}: {type(v).__name__}")
            ref[k] = v
        where = "the reference"
    else:
        raise SharingError(f"reference must be None, an nn.Module or a state dict, got {type(reference).__name__}")
    skipped: dict[str, str] = {}
    if names is None:
        selected = []
        for n, i in im.items():
            r = ref.get(n)
            if r is None:
                skipped[n] = f"not in {where}"
            elif tuple(r.shape) != i.shape:
                skipped[n] = f"shape {fmt_shape(i.shape)} in the model but {fmt_shape(r.shape)} in {where}"
            else:
                selected.append(n)
        if not selected:
            detail = "".join(f"\n  - {n}: {r}" for n, r in list(skipped.items())[:8])
            raise SharingError(f"anchor found no parameter with the same name and shape in the model and {where}:" + (detail or " the model has no parameters"))
    else:
        selected = _expand(_names_list(names), im, {}, "the model")
        for n in selected:
            if n not in im:
                raise SharingError(f"parameter {n!r} is missing in the model" + did_you_mean(n, im, "parameter"))
            if n not in ref:
                raise SharingError(f"{where} has no tensor for parameter {n!r}" + did_you_mean(n, ref, "tensor"))
            if tuple(ref[n].shape) != im[n].shape:
                raise SharingError(
                    f"cannot anchor {n!r}: shape {fmt_shape(im[n].shape)} in the model but "
                    f"{fmt_shape(ref[n].shape)} in {where}; the reference must have the model's shapes"
                )
    terms, buffers, seen = [], {}, set()
    with torch.no_grad():
        for n in selected:
            i = im[n]
            if i.key in seen:  # one stored tensor, one term
                continue
            seen.add(i.key)
            buf = f"ref_{len(buffers)}"
            buffers[buf] = ref[n].detach().to(device=i.device, dtype=i.dtype).clone(memory_format=torch.contiguous_format)
            terms.append(_Term(n, [(i.module, i.attr)], [buf], [i.shape]))
    sched = _resolve_strength(strength, [t.label for t in terms])
    _warn_skipped(skipped, "anchor")
    first = im[selected[0]]
    return SoftTie("anchor", terms, norm, delta, sched, skipped, (model,), references=buffers, device=first.device)


def group_tie(model: nn.Module, groups, norm: str = "l2", strength: Strength = 1e-3, *, delta: float = 1.0) -> SoftTie:
    """Pull each group of same-shaped parameters of one model toward the group mean.

    For a group ``w_1..w_k`` with mean ``m`` the penalty is ``strength * sum_i dist(w_i, m)``
    (gradients flow through the mean too). For ``"l2"`` that is ``sum_i ||w_i - m||^2``.

    Args:
        model: the model.
        groups: a dict ``{label: [names or patterns]}``, or a list whose entries are lists
            of names or patterns (label: the entries joined by ``","``) or single glob patterns
            (``"blocks.*.fc.weight"``: every match forms one group; label: the pattern).
            A group needs at least two distinct stored tensors of one shape.
        norm, strength, delta: as in :func:`soft_tie`; a strength dict is keyed by group labels.

    Returns:
        A :class:`SoftTie` of kind ``"group"``.

    Raises:
        SharingError: unknown names, patterns matching nothing, a group with fewer than two
            distinct tensors or with different shapes (names and shapes shown), a negative
            strength, an unknown norm. Nothing is changed.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> stack = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
        >>> soft = ps.group_tie(stack, ["*.weight", "*.bias"], strength=1e-2)
        >>> soft.names
        ['*.weight', '*.bias']
    """
    _check_norm(norm, delta)
    im = _infos(model, "model")
    if isinstance(groups, Mapping):
        items = list(groups.items())
        for label, _ in items:
            if not isinstance(label, str) or not label:
                raise SharingError(f"group labels must be non-empty strings, got {label!r}")
    elif isinstance(groups, (list, tuple)) and groups:
        items = []
        for g in groups:
            if isinstance(g, str):
                items.append((g, [g]))
            elif isinstance(g, (list, tuple)):
                items.append((",".join(map(str, g)), list(g)))
            else:
                raise SharingError(f"each group is a list of parameter names or one glob pattern, got {g!r}")
    else:
        raise SharingError(f"groups must be a non-empty list of groups or a dict {{label: names}}, got {groups!r}")
    if not items:
        raise SharingError("groups is empty; give at least one group of two or more parameters")
    terms, labels = [], set()
    for label, members in items:
        if label in labels:
            raise SharingError(f"group {label!r} is given twice")
        labels.add(label)
        sel = _expand(_names_list(members), im, {}, "the model")
        for n in sel:
            if n not in im:
                raise SharingError(f"parameter {n!r} of group {label!r} is missing in the model" + did_you_mean(n, im, "parameter"))
        first = im[sel[0]]
        for n in sel[1:]:
            if im[n].shape != first.shape:
                raise SharingError(
                    f"group {label!r} mixes shapes: {sel[0]!r} is {fmt_shape(first.shape)} but {n!r} is "
                    f"{fmt_shape(im[n].shape)}; a group's parameters must have one shape"
                )
            _same_kind(n, im[n], first, f"group {label!r}", f"its first member {sel[0]!r}")
        distinct, keys = [], set()
        for n in sel:
            if im[n].key not in keys:
                keys.add(im[n].key)
                distinct.append(n)
        if len(distinct) < 2:
            raise SharingError(
                f"group {label!r} has fewer than two distinct tensors ({', '.join(map(repr, sel))}"
                f"{' are already hard-tied' if len(sel) > 1 else ''}); a group needs at least two"
            )
        terms.append(_Term(label, [(im[n].module, im[n].attr) for n in distinct], None, [im[n].shape for n in distinct]))
    sched = _resolve_strength(strength, [t.label for t in terms])
    return SoftTie("group", terms, norm, delta, sched, {}, (model,), device=next(iter(im.values())).device)


def _warn_skipped(skipped: Mapping[str, str], what: str) -> None:
    if skipped:
        lines = "".join(f"\n  - {n}: {r}" for n, r in list(skipped.items())[:10])
        more = f"\n  ... {len(skipped) - 10} more (see .skipped)" if len(skipped) > 10 else ""
        warnings.warn(
            f"{what} left out {len(skipped)} parameter{'s' if len(skipped) != 1 else ''} "
            f"(pass names= to choose explicitly):{lines}{more}",
            SoftTieWarning,
            stacklevel=3,
        )


# ---- hardening ---------------------------------------------------------------------------
def harden(model: nn.Module, soft: SoftTie, threshold: float) -> list[TieGroup]:
    """Turn soft-tied pairs and groups that converged into hard ties (aliases, mean value).

    Every active term whose :meth:`SoftTie.relative_distance <SoftTie.relative_distances>` is
    below ``threshold`` becomes an ``alias`` group: its stored tensors are replaced by one
    ``nn.Parameter`` holding their mean (the member first in model order keeps its object, so
    an optimizer that steps it keeps working; every use of the merged tensors reads it).
    Terms sharing a tensor are merged into one group. The penalty drops those terms, and
    :func:`paramshare.find_ties` and :func:`paramshare.report` show the ties.

    Across two models, a hard tie is one ``nn.Parameter`` registered in both: ``model`` must
    hold both sides of the soft tie, e.g. ``nn.ModuleDict({"a": a, "b": b})`` (which copies
    nothing). The group names are relative to ``model``. Afterwards ``a`` and ``b`` share the
    tensor; optimise ``model.parameters()`` (deduplicated) rather than both models' lists.

    Args:
        model: a module holding every parameter of the soft tie.
        soft: a soft tie from :func:`soft_tie` or :func:`group_tie`.
        threshold: relative distance below which a term is hardened (non-negative).

    Returns:
        The alias groups made, as :func:`paramshare.find_ties` reports them.

    Raises:
        SharingError: ``soft`` is an anchor (a frozen reference is not a parameter to share),
            ``soft`` covers parameters outside ``model`` (a soft tie of another model, or only
            one side of two models), a member to harden is computed by a parametrization, a
            bad threshold. Nothing is changed.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> a, b = nn.Linear(4, 4), nn.Linear(4, 4)
        >>> with torch.no_grad():
        ...     _ = b.weight.copy_(a.weight + 1e-4)
        >>> both = nn.ModuleDict({"a": a, "b": b})
        >>> soft = ps.soft_tie(a, b)
        >>> [g.members for g in ps.harden(both, soft, threshold=0.01)]
        [('a.weight', 'b.weight')]
        >>> a.weight is b.weight, soft.names
        (True, ['bias'])
    """
    if not isinstance(soft, SoftTie):
        raise SharingError(f"harden needs a SoftTie (from ps.soft_tie or ps.group_tie), got {type(soft).__name__}")
    if not isinstance(model, nn.Module):
        raise SharingError(f"harden needs the model as an nn.Module, got {type(model).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold) or threshold < 0:
        raise SharingError(f"threshold must be a non-negative number (a relative distance, e.g. 0.01), got {threshold!r}")
    if soft.kind == "anchor":
        raise SharingError(
            "cannot harden an anchor: its reference is a frozen copy, not a parameter to share; "
            "to make parameters equal to the reference, copy it in (param.copy_) and freeze them"
        )
    index = ModelIndex(model)
    where: dict[tuple[int, str], str] = {}
    for name, use in index.uses.items():
        where.setdefault((id(use.module), use.attr), name)
    outside = []
    for t in soft._active:
        for i, (m, a) in enumerate(t.left + (t.right or [])):
            if (id(m), a) not in where:
                outside.append((t.label, i))
    if outside:
        label, i = outside[0]
        side = "" if soft.kind == "group" else (" (first model, a)" if i == 0 else " (second model, b)")
        raise SharingError(
            f"cannot harden: parameter {label!r}{side} of this soft tie is not in the model passed "
            f"({len(outside)} member{'s' if len(outside) != 1 else ''} outside it); the soft tie was made for "
            "another model, or spans two models: pass a module holding both, e.g. nn.ModuleDict({'a': a, 'b': b})"
        )
    rel = soft.relative_distances()
    chosen = [t for t in soft._active if rel[t.label] < threshold]
    # union of stored tensors over the chosen terms (terms sharing a tensor merge)
    parent: dict[int, int] = {}
    params: dict[int, nn.Parameter] = {}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for t in chosen:
        ids = []
        for m, a in t.left + (t.right or []):
            name = where[(id(m), a)]
            p = index.uses[name].param
            if p is None:
                raise SharingError(
                    f"cannot harden {name!r}: it is computed by a parametrization "
                    f"({', '.join(type(x).__name__ for x in index.uses[name].plist)}), not stored; "
                    "ps.untie it first or lower the threshold"
                )
            parent.setdefault(id(p), id(p))
            params[id(p)] = p
            ids.append(id(p))
        for x in ids[1:]:
            parent[find(x)] = find(ids[0])
    components: dict[int, list[int]] = {}
    for pid in parent:
        components.setdefault(find(pid), []).append(pid)
    # every use of a merged tensor follows it
    uses_of: dict[int, list[str]] = {}
    for name, use in index.uses.items():
        p = use.param
        if p is not None and id(p) in parent:
            uses_of.setdefault(id(p), []).append(name)
    plan_ops = []
    alias = get_kind("alias")
    for pids in components.values():
        names = sorted((n for pid in pids for n in uses_of.get(pid, [])), key=index.position)
        source = names[0]
        src = index.uses[source].param
        targets = tuple(n for n in names if index.uses[n].param is not src)
        if not targets:
            continue
        problems = alias.validate(index, TieGroup("alias", source, (source,) + targets, tuple(src.shape)))
        if problems:
            raise SharingError(f"cannot harden {source!r}:\n  - " + "\n  - ".join(problems))
        plan_ops.append((source, src, targets, [params[pid] for pid in pids]))
    from .tying import find_ties, tie

    with torch.no_grad():
        for _, src, _, members in plan_ops:
            acc = src.dtype if src.dtype in (torch.float32, torch.float64) else torch.float32
            mean = torch.stack([p.detach().to(acc) for p in members]).mean(0)
            src.copy_(mean.to(src.dtype))
    for source, _, targets, _ in plan_ops:
        tie(model, source, *targets)
    for t in chosen:
        t.active = False
        soft.hardened.append(t.label)
    if chosen:
        soft._rebuild()
    sources = {source for source, *_ in plan_ops}
    return [g for g in find_ties(model) if g.kind == "alias" and sources & set(g.members)]
