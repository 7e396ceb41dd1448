"""OWL and GrOWL: sparsity and parameter tying for groups of correlated features.

The ordered weighted L1 (OWL) norm of a vector ``b`` with weights ``w`` is
``sum_i w_i |b|_[i]``, where ``|b|_[1] >= |b|_[2] >= ...`` are the magnitudes sorted in
decreasing order and ``w`` is non-negative and non-increasing. With equal weights it is the
L1 norm (Lasso); with OSCAR weights ``w_i = lambda1 + lambda2 * (p - i)`` it also pulls
coefficients of correlated features to *equal* magnitudes, so a group of correlated
features is selected (or dropped) together instead of one arbitrary member of it.

GrOWL (Zhang, Wang, Figueiredo, Balzano, ICLR 2018) applies the OWL norm to the norms of
the slices of a weight matrix (its rows in the paper's ``in x out`` layout: one per input
feature of an ``nn.Linear``, ``W[:, j]`` in PyTorch's ``out x in`` layout). Training with
it zeroes whole slices and makes the slices of correlated inputs equal; :func:`growl_tie`
then prunes the zero slices and ties the equal ones to shared vectors (the ``rows`` kind),
which plans, reports and checkpoints handle like every other tie.

Public API: :func:`owl_weights`, :func:`owl_norm`, :func:`prox_owl`, :class:`GrOWL`,
:func:`tie_rows`, :func:`growl_tie`, :func:`owl_regression`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ._index import ModelIndex
from .errors import SharingError
from .kinds._common import fmt_shape
from .kinds._derived import host_path
from .plans import TieGroup, get_kind

__all__ = [
    "OWL_KINDS",
    "owl_weights",
    "owl_norm",
    "prox_owl",
    "GrOWL",
    "tie_rows",
    "growl_tie",
    "owl_regression",
]

#: The weight families :func:`owl_weights` builds.
OWL_KINDS = ("oscar", "linear", "spike")


# ---- weights and the norm ---------------------------------------------------------------------
def _check_lambda(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.numel() == 1
    ):
        raise SharingError(f"{name} must be a non-negative number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise SharingError(f"{name} must be a non-negative finite number, got {v!r}; use {name}=0 to switch it off")
    return v


def _check_kind(kind) -> str:
    if kind not in OWL_KINDS:
        raise SharingError(f"unknown OWL weight kind {kind!r}; choose one of {', '.join(map(repr, OWL_KINDS))}")
    return kind


def owl_weights(
    n: int,
    kind: str = "oscar",
    lambda1: float = 1.0,
    lambda2: float = 0.0,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``n`` OWL weights of a named family (non-negative, non-increasing).

    * ``"oscar"``: ``w_i = lambda1 + lambda2 * (n - i)`` for ``i = 1..n`` (Bondell & Reich;
      ``lambda2 = 0`` is the Lasso).
    * ``"linear"``: decays linearly from ``lambda1 + lambda2`` to ``lambda1``:
      ``w_i = lambda1 + lambda2 * (n - i) / (n - 1)`` (``lambda1 + lambda2`` when ``n = 1``);
      OSCAR whose spread does not grow with ``n``.
    * ``"spike"``: ``w_1 = lambda1 + lambda2`` and ``w_i = lambda1`` for ``i > 1`` (group
      Lasso plus a penalty on the largest norm, an L-infinity term).

    Args:
        n: number of weights (positive).
        kind: ``"oscar"``, ``"linear"`` or ``"spike"``.
        lambda1, lambda2: non-negative.
        dtype, device: of the returned tensor.

    Returns:
        A 1-D tensor of ``n`` weights, ``w[0]`` the largest.

    Raises:
        SharingError: ``n`` not a positive integer, an unknown kind, a negative lambda.

    Example:
        >>> owl_weights(4, "oscar", lambda1=1.0, lambda2=0.5).tolist()
        [2.5, 2.0, 1.5, 1.0]
        >>> owl_weights(3, "spike", 1.0, 2.0).tolist()
        [3.0, 1.0, 1.0]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SharingError(f"n must be a positive integer, got {n!r}")
    _check_kind(kind)
    l1 = _check_lambda("lambda1", lambda1)
    l2 = _check_lambda("lambda2", lambda2)
    steps = torch.arange(n - 1, -1, -1, dtype=torch.float64)  # n-1, ..., 0
    if kind == "oscar":
        w = l1 + l2 * steps
    elif kind == "linear":
        w = l1 + l2 * (steps / (n - 1) if n > 1 else torch.ones(1, dtype=torch.float64))
    else:
        w = torch.full((n,), l1, dtype=torch.float64)
        w[0] += l2
    return w.to(dtype=dtype, device=device)


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np

        return torch.as_tensor(np.asarray(x, dtype=np.float64))
    except (TypeError, ValueError):
        raise SharingError(f"{what} must be a tensor or an array of numbers, got {type(x).__name__}") from None


def _check_weights(w: torch.Tensor, n: int) -> None:
    """Raise unless ``w`` is a valid OWL weight vector (or batch of them) of length ``n``."""
    if w.dim() == 0 or w.shape[-1] != n:
        raise SharingError(
            f"the OWL weights have shape {fmt_shape(w.shape)} but the vectors have {n} entries; "
            f"give {n} weights (ps.owl_weights({n}, ...))"
        )
    if not w.is_floating_point():
        w = w.double()
    if not bool(torch.isfinite(w).all()):
        raise SharingError("the OWL weights must be finite numbers")
    if bool((w < 0).any()):
        raise SharingError(f"the OWL weights must be non-negative, got a minimum of {w.min().item():g}")
    if n > 1:
        rise = w[..., 1:] - w[..., :-1]
        if bool((rise > 0).any()):
            i = int((rise > 0).reshape(-1, n - 1).any(0).nonzero()[0])
            raise SharingError(
                f"the OWL weights must be non-increasing (w[0] >= w[1] >= ...), but w[{i}] < w[{i + 1}]; "
                "sort them in decreasing order"
            )


def owl_norm(v, w) -> torch.Tensor:
    """The OWL norm ``sum_i w_i |v|_[i]`` of each vector along the last dimension.

    Args:
        v: a tensor (or array) of shape ``(..., n)``.
        w: non-negative, non-increasing weights of shape ``(n,)`` or broadcastable to ``v``.

    Returns:
        A tensor of shape ``v.shape[:-1]``.

    Raises:
        SharingError: invalid weights or a length mismatch.

    Example:
        >>> owl_norm(torch.tensor([1.0, -3.0, 2.0]), torch.tensor([3.0, 2.0, 1.0]))
        tensor(14.)
    """
    v = _as_tensor(v, "v")
    w = _as_tensor(w, "w")
    if v.dim() == 0:
        raise SharingError("owl_norm needs a vector (or a batch of vectors), got a scalar")
    _check_weights(w, v.shape[-1])
    u = v.abs().sort(dim=-1, descending=True).values
    return (u * w.to(device=u.device, dtype=u.dtype)).sum(-1)


# ---- the proximal operator ----------------------------------------------------------------------
def _pav_clip(z: list[float]) -> list[float]:
    """Non-increasing isotonic regression of ``z`` (pool adjacent violators), clipped at zero."""
    sums: list[float] = []
    counts: list[int] = []
    for x in z:
        s, c = x, 1
        # the previous block's mean is below this one's: a violation, pool them
        while sums and sums[-1] * c < s * counts[-1]:
            s += sums.pop()
            c += counts.pop()
        sums.append(s)
        counts.append(c)
    out: list[float] = []
    for s, c in zip(sums, counts):
        m = s / c
        out.extend([m if m > 0.0 else 0.0] * c)
    return out


def _prox_sorted(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The prox on magnitudes already sorted in decreasing order (float64, shape (B, n))."""
    z = u - w
    if z.shape[-1] < 2:
        return z.clamp_min(0)
    ordered = (z[:, :-1] >= z[:, 1:]).all(dim=1)
    out = z.clamp_min(0)
    todo = (~ordered).nonzero().flatten().tolist()
    if todo:
        rows = z[todo].tolist()
        out[todo] = torch.tensor([_pav_clip(r) for r in rows], dtype=z.dtype)
    return out


def _prox(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """:func:`prox_owl` without input checks (``w`` of shape ``(n,)`` or broadcastable to ``v``)."""
    if w.dim() > 1:
        shape = torch.broadcast_shapes(w.shape, v.shape)
        v = v.expand(shape)
    shape = v.shape
    n = shape[-1]
    flat = v.detach().reshape(-1, n)
    u, perm = flat.abs().to(device="cpu", dtype=torch.float64).sort(dim=1, descending=True)
    ww = w.to(device="cpu", dtype=torch.float64)
    ww = ww.expand(shape).reshape(-1, n) if ww.dim() > 1 else ww.expand_as(u)
    x_sorted = _prox_sorted(u, ww)
    x = torch.empty_like(x_sorted).scatter_(1, perm, x_sorted)
    return (x.to(device=v.device, dtype=v.dtype) * torch.sign(flat)).reshape(shape)


def prox_owl(v, w) -> torch.Tensor:
    """The proximal operator of the OWL norm: ``argmin_x 0.5 ||x - v||^2 + sum_i w_i |x|_[i]``.

    Exact: sort the magnitudes, subtract the weights, project onto the non-increasing cone
    with pool-adjacent-violators, clip at zero, undo the sort and restore the signs (Bogdan
    et al. 2015; Zeng & Figueiredo 2014). ``O(n log n)`` per vector (the sort; the projection
    is linear), computed in float64 on the CPU and returned in ``v``'s dtype and device.
    Batched over every leading dimension of ``v``. Entries of equal magnitude come out equal.

    Args:
        v: a tensor (or array) of shape ``(..., n)``.
        w: the OWL weights: non-negative and non-increasing, shape ``(n,)`` (one set for every
            vector) or ``(..., n)`` (one set per vector); see :func:`owl_weights`.

    Returns:
        A tensor shaped like ``v``.

    Raises:
        SharingError: weights that are negative, increasing, not finite or of the wrong
            length; ``v`` a scalar or not finite.

    Example:
        >>> prox_owl(torch.tensor([3.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 1.0])).tolist()  # soft threshold
        [2.0, -0.0, 0.0]
        >>> prox_owl(torch.tensor([3.0, 2.9, 0.5]), owl_weights(3, "oscar", 0.1, 0.5))  # ties 3.0 and 2.9
        tensor([2.1000, 2.1000, 0.4000])
    """
    v = _as_tensor(v, "v")
    w = _as_tensor(w, "w")
    if v.dim() == 0:
        raise SharingError("prox_owl needs a vector (or a batch of vectors), got a scalar")
    if not v.is_floating_point():
        v = v.double()
    n = v.shape[-1]
    _check_weights(w, n)
    if w.dim() > 1:
        try:
            torch.broadcast_shapes(w.shape, v.shape)
        except RuntimeError:
            raise SharingError(
                f"the OWL weights have shape {fmt_shape(w.shape)}, which does not broadcast to the vectors' "
                f"{fmt_shape(v.shape)}"
            ) from None
    if not bool(torch.isfinite(v).all()):
        raise SharingError("prox_owl needs finite values; v contains inf or nan")
    if v.numel() == 0:
        return v.clone()
    return _prox(v, w)


# ---- GrOWL on the slices of weight matrices -----------------------------------------------------
def _slice_norms(p: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norm of each slice ``p.select(dim, j)`` (float64)."""
    return torch.linalg.vector_norm(p.detach(), dim=1 - dim).to(torch.float64)


class GrOWL:
    """Proximal GrOWL regulariser on the slices of weight matrices; use it after any optimizer.

    The penalty on a matrix ``W`` with ``n`` slices along ``dim`` is
    ``sum_i w_i ||W_slice||_[i]`` (the OWL norm of the slice norms). :meth:`step` applies its
    exact proximal operator with step ``lr``: the slice norms go through :func:`prox_owl`
    with weights ``lr * w`` and each slice is rescaled to its new norm (slices whose norm
    reaches zero become exactly zero). Call it right after ``optimizer.step()``; with plain
    SGD this is proximal gradient descent, with other optimizers it is the usual heuristic.

    ``dim=1`` (the default) groups ``W[:, j]``: the weights leaving input feature ``j`` of an
    ``nn.Linear`` (the rows of the paper's ``in x out`` layout), so whole inputs are pruned
    and correlated inputs are tied. ``dim=0`` groups the rows ``W[i, :]`` (output units).

    Args:
        params: matrices (``nn.Parameter``), or dicts ``{"params": [...], "lambda1": ...}``
            overriding ``lambda1``, ``lambda2``, ``kind`` or ``dim`` for their matrices, as in
            torch optimizers.
        lambda1, lambda2: non-negative; the weights are ``owl_weights(n, kind, lambda1, lambda2)``
            for a matrix with ``n`` slices.
        kind: ``"oscar"`` (default), ``"linear"`` or ``"spike"``; see :func:`owl_weights`.
        dim: 1 (slices ``W[:, j]``) or 0 (rows ``W[i, :]``).

    Raises:
        SharingError: a parameter that is not a floating-point matrix, a negative lambda,
            an unknown kind, a bad ``dim``, no parameters, a parameter listed twice.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> net = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> reg = ps.GrOWL([net[0].weight], lambda1=0.05, lambda2=0.005)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> x, y = torch.randn(64, 20), torch.randint(0, 2, (64,))
        >>> for _ in range(50):
        ...     opt.zero_grad()
        ...     nn.functional.cross_entropy(net(x), y).backward()
        ...     opt.step()
        ...     reg.step(lr=0.1)
        >>> reg.penalty() >= 0.0
        True
    """

    def __init__(self, params, lambda1: float, lambda2: float, kind: str = "oscar", *, dim: int = 1):
        defaults = {"lambda1": lambda1, "lambda2": lambda2, "kind": kind, "dim": dim}
        if isinstance(params, torch.Tensor):
            raise SharingError("GrOWL takes an iterable of parameters (e.g. [layer.weight]), not a single tensor")
        if isinstance(params, nn.Module):
            raise SharingError("GrOWL takes parameters, not a module: pass [m.weight for m in layers]")
        items = list(params)
        if not items:
            raise SharingError("GrOWL got no parameters; pass e.g. [layer.weight for layer in linear_layers]")
        if not all(isinstance(g, Mapping) for g in items):
            if any(isinstance(g, Mapping) for g in items):
                raise SharingError("GrOWL params must be all tensors or all dicts with 'params', not a mix")
            items = [{"params": items}]
        groups = []
        seen: set[int] = set()
        for g in items:
            unknown = set(g) - {"params", *defaults}
            if unknown:
                raise SharingError(f"GrOWL parameter group has unknown keys {sorted(unknown)}; allowed: params, {', '.join(defaults)}")
            group = dict(defaults, **{k: v for k, v in g.items() if k != "params"})
            group["lambda1"] = _check_lambda("lambda1", group["lambda1"])
            group["lambda2"] = _check_lambda("lambda2", group["lambda2"])
            _check_kind(group["kind"])
            if isinstance(group["dim"], bool) or group["dim"] not in (0, 1):
                raise SharingError(f"dim must be 0 (rows W[i, :]) or 1 (columns W[:, j]), got {group['dim']!r}")
            ps_ = g["params"]
            ps_ = [ps_] if isinstance(ps_, torch.Tensor) else list(ps_)
            for i, p in enumerate(ps_):
                if not isinstance(p, torch.Tensor):
                    raise SharingError(f"GrOWL parameters must be tensors, got {type(p).__name__} at position {i}")
                if p.dim() != 2:
                    raise SharingError(
                        f"GrOWL works on the slices of matrices, but parameter {i} has shape {fmt_shape(p.shape)}; "
                        "pass 2-D weights only (e.g. nn.Linear weights)"
                    )
                if not p.is_floating_point():
                    raise SharingError(f"GrOWL needs floating-point parameters, got {p.dtype} at position {i}")
                if id(p) in seen:
                    raise SharingError(f"parameter {i} of shape {fmt_shape(p.shape)} is listed twice")
                seen.add(id(p))
            group["params"] = ps_
            groups.append(group)
        self.param_groups: list[dict] = groups
        self._weights: dict[tuple, torch.Tensor] = {}

    def _w(self, group: dict, n: int) -> torch.Tensor:
        key = (group["kind"], group["lambda1"], group["lambda2"], n)
        w = self._weights.get(key)
        if w is None:
            w = owl_weights(n, group["kind"], group["lambda1"], group["lambda2"])
            self._weights[key] = w
        return w

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Apply the proximal operator of ``lr`` times the penalty to every matrix, in place.

        Raises:
            SharingError: ``lr`` not a positive number.
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise SharingError(f"lr must be a positive number (the step size just used), got {lr!r}")
        for group in self.param_groups:
            dim = group["dim"]
            for p in group["params"]:
                norms = _slice_norms(p, dim).cpu()
                w = self._w(group, norms.numel()) * lr
                new = torch.from_numpy(_prox_np(norms.numpy(), w.numpy()))
                scale = torch.where(norms > 0, new / norms.clamp_min(1e-300), torch.zeros_like(norms))
                scale = scale.to(device=p.device, dtype=p.dtype)
                p.mul_(scale.unsqueeze(0) if dim == 1 else scale.unsqueeze(1))

    @torch.no_grad()
    def penalty(self) -> float:
        """The current value of the penalty, summed over the matrices (for logging)."""
        total = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                norms = _slice_norms(p, group["dim"])
                w = self._w(group, norms.numel())
                total += float((norms.sort(descending=True).values.cpu() * w).sum())
        return total

    @torch.no_grad()
    def zero_slices(self) -> list[int]:
        """How many slices of each matrix are exactly zero, in parameter order."""
        return [
            int((_slice_norms(p, g["dim"]) == 0).sum()) for g in self.param_groups for p in g["params"]
        ]

    def __repr__(self) -> str:
        parts = [
            f"{len(g['params'])} matrices: {g['kind']}, lambda1={g['lambda1']:g}, lambda2={g['lambda2']:g}, dim={g['dim']}"
            for g in self.param_groups
        ]
        return "GrOWL(" + "; ".join(parts) + ")"


# ---- tying the slices ---------------------------------------------------------------------------
def _rows_target(index: ModelIndex, name: str) -> str | None:
    """Why the use ``name`` cannot get rows sharing (None when it can)."""
    use = index.use(name)
    if use.derived:
        kinds = ", ".join(type(m).__name__ for m in use.plist)
        return f"{name!r} is computed by a parametrization ({kinds}); untie it first with ps.untie(model, {name!r})"
    p = use.param
    if p.dim() != 2:
        return f"{name!r} has shape {fmt_shape(p.shape)}; rows sharing needs a matrix (2-D weight)"
    if not p.is_floating_point():
        return f"{name!r} is {p.dtype}; rows sharing needs a floating-point weight"
    others = [n for n, u in index.uses.items() if n != name and u.backing()[0] is p]
    if others:
        return f"{name!r} is tied to {others[0]!r}; untie it first with ps.untie(model, {name!r})"
    return None


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or dim not in (0, 1):
        raise SharingError(f"dim must be 0 (rows W[i, :]) or 1 (columns W[:, j]), got {dim!r}")
    return dim


def _rows_group(name: str, shape, labels: Sequence[int], dim: int) -> TieGroup:
    k = max(labels, default=-1) + 1
    length = shape[1 - dim]
    return TieGroup("rows", host_path(name), (name,), (k, length), {"dim": dim, "labels": [int(v) for v in labels]})


def _install(model: nn.Module, groups: list[TieGroup]) -> None:
    """Validate every group, then install them all (nothing changes when one is invalid)."""
    kind = get_kind("rows")
    index = ModelIndex(model)
    problems = []
    for g in groups:
        problems += kind.validate(index, g)
    if problems:
        raise SharingError("cannot tie the slices:\n  - " + "\n  - ".join(problems))
    for g in groups:
        kind.install(ModelIndex(model), g)


def tie_rows(model: nn.Module, name: str, labels: Sequence[int], dim: int = 1) -> TieGroup:
    """Back the slices of one weight matrix by shared vectors, as ``labels`` says.

    Slice ``j`` (``W[:, j]`` for ``dim=1``, ``W[i, :]`` for ``dim=0``) reads shared vector
    ``labels[j]``; ``-1`` prunes it (zero, stored as nothing). Each vector starts as the mean
    of the slices that read it. The labels must use every vector ``0 .. k-1``.

    Args:
        model: the module (changed in place).
        name: dotted name of a plain, untied 2-D parameter.
        labels: one integer in ``-1 .. k-1`` per slice.
        dim: 1 (columns, one per input feature of an ``nn.Linear``) or 0 (rows).

    Returns:
        The new :class:`~paramshare.TieGroup` (kind ``"rows"``).

    Raises:
        SharingError: an unknown or unsuitable parameter, wrong number of labels, labels
            out of range or leaving a vector unused. The model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> lin = nn.Linear(4, 3)
        >>> g = ps.tie_rows(lin, "weight", [0, 0, -1, 1])   # inputs 0 and 1 tied, input 2 pruned
        >>> bool((lin.weight[:, 0] == lin.weight[:, 1]).all()), lin.weight[:, 2].abs().sum().item()
        (True, 0.0)
        >>> ps.report(lin).unique_params   # 2 vectors of 3, plus the bias
        9
    """
    _check_dim(dim)
    index = ModelIndex(model)
    why = _rows_target(index, name)
    if why:
        raise SharingError("cannot tie the slices of " + why)
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    try:
        labels = [int(v) for v in labels]
        bad_type = False
    except (TypeError, ValueError):
        bad_type = True
    if bad_type:
        raise SharingError(f"labels must be a list of integers, got {labels!r}")
    shape = tuple(index.uses[name].param.shape)
    group = _rows_group(name, shape, labels, dim)
    _install(model, [group])
    return group


def _cluster(slices: torch.Tensor, keep: list[int], threshold: float, method: str) -> list[list[int]]:
    """Leader clustering of the kept slices: clusters of members within ``threshold`` of their leader."""
    if not keep:
        return []
    x = slices[keep].to(torch.float64)
    norms = torch.linalg.vector_norm(x, dim=1)
    if method == "cosine":
        unit = x / norms.unsqueeze(1)
        sim = unit @ unit.t()
    else:
        dist = torch.cdist(x, x)
        sim = 1.0 - dist / torch.maximum(norms.unsqueeze(1), norms.unsqueeze(0))
    order = sorted(range(len(keep)), key=lambda i: (-float(norms[i]), i))
    assigned = [False] * len(keep)
    clusters = []
    sim_rows = sim.tolist()
    for leader in order:
        if assigned[leader]:
            continue
        row = sim_rows[leader]
        members = [i for i in order if not assigned[i] and (i == leader or row[i] >= threshold)]
        for i in members:
            assigned[i] = True
        clusters.append(sorted(keep[i] for i in members))
    return clusters


def growl_tie(
    model: nn.Module,
    names: Iterable[str] | None = None,
    threshold: float = 0.9,
    method: str = "cosine",
    *,
    dim: int = 1,
    prune_tol: float = 0.0,
) -> list[TieGroup]:
    """Prune the zero slices of trained weights and tie the similar ones (after GrOWL training).

    For each selected weight, slices (``W[:, j]`` for ``dim=1``) whose norm is at most
    ``prune_tol`` are pruned: zero, stored as nothing. The others are grouped by *threshold
    (leader) clustering*, deterministic and without a preset number of clusters: take the
    unassigned slice with the largest norm as a leader; every unassigned slice whose
    similarity to it is at least ``threshold`` joins its cluster; repeat. Each cluster is tied
    to one shared vector, the average of its slices (the ``rows`` kind). A weight where
    nothing is pruned or tied is left alone. Fine-tune afterwards: the shared vectors are
    ordinary parameters (``model.parameters()`` lists them; rebuild the optimizer).

    Args:
        model: the module (changed in place).
        names: dotted names of 2-D parameters; ``None`` takes every plain, untied 2-D
            floating-point parameter.
        threshold: in ``(0, 1]``; the similarity a slice needs with its cluster's leader.
        method: ``"cosine"`` (cosine similarity) or ``"euclidean"``
            (``1 - ||a - b|| / max(||a||, ||b||)``, which also asks for similar norms).
        dim: 1 (columns: input features of ``nn.Linear``) or 0 (rows: output units).
        prune_tol: slices with norm ``<= prune_tol`` are pruned (GrOWL makes them exactly 0).

    Returns:
        The new tie groups (kind ``"rows"``), as :func:`paramshare.find_ties` lists them.

    Raises:
        SharingError: threshold outside ``(0, 1]``, an unknown method, a negative
            ``prune_tol``, a named parameter that is unknown, not a matrix, tied or computed.
            The model is unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> lin = nn.Linear(4, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, 1.0, 0.0, 5.0], [2.0, 2.01, 0.0, -1.0]]))
        >>> groups = ps.growl_tie(lin, threshold=0.99)
        >>> groups[0].options["labels"]   # inputs 0 and 1 tied, input 2 pruned
        [0, 0, -1, 1]
        >>> ps.report(lin).unique_params
        4
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise SharingError(f"threshold must be in (0, 1], got {threshold!r}; 0.9 ties slices at cosine similarity 0.9 or more")
    if method not in ("cosine", "euclidean"):
        raise SharingError(f"unknown method {method!r}; choose 'cosine' or 'euclidean'")
    _check_dim(dim)
    if isinstance(prune_tol, bool) or not isinstance(prune_tol, (int, float)) or not prune_tol >= 0:
        raise SharingError(f"prune_tol must be a non-negative number, got {prune_tol!r}")
    index = ModelIndex(model)
    if names is None:
        selected = [n for n in index.uses if _rows_target(index, n) is None]
    else:
        if isinstance(names, str):
            names = [names]
        selected = list(names)
        if len(set(selected)) != len(selected):
            raise SharingError(f"a parameter is named twice: {selected}")
        for n in selected:
            why = _rows_target(index, n)
            if why:
                raise SharingError("cannot tie the slices of " + why)
    groups = []
    with torch.no_grad():
        for n in selected:
            w = index.uses[n].param.detach()
            slices = (w if dim == 0 else w.t()).to(torch.float64)
            norms = torch.linalg.vector_norm(slices, dim=1)
            keep = [j for j, r in enumerate(norms.tolist()) if r > prune_tol]
            clusters = _cluster(slices, keep, float(threshold), method)
            if len(keep) == slices.shape[0] and len(clusters) == len(keep):
                continue  # nothing pruned, nothing tied: sharing would save nothing
            # number the clusters in the order of their first slice
            clusters.sort(key=lambda c: c[0])
            labels = [-1] * slices.shape[0]
            for c, members in enumerate(clusters):
                for j in members:
                    labels[j] = c
            groups.append(_rows_group(n, tuple(w.shape), labels, dim))
    if groups:
        _install(model, groups)
    return groups


# ---- a small solver for linear models -----------------------------------------------------------
def owl_regression(
    X,
    y,
    lambda1: float,
    lambda2: float,
    kind: str = "oscar",
    *,
    max_iter: int = 20000,
    tol: float = 1e-9,
    init=None,
):
    """Minimise ``0.5 * ||y - X b||^2 + OWL_w(b)`` with FISTA and the exact OWL prox.

    The weights are ``owl_weights(p, kind, lambda1, lambda2)`` for ``p`` features: OSCAR by
    default, the Lasso when ``lambda2 = 0``. No ``1/n`` factor and no intercept: centre ``X``
    and ``y`` first (sklearn's ``Lasso(alpha)`` is ``lambda1 = n * alpha``, ``lambda2 = 0``).
    Stops when the duality gap is at most ``tol`` times the objective (or after ``max_iter``
    iterations). Computed in float64.

    Args:
        X: ``(n, p)`` design (tensor or array).
        y: ``(n,)`` targets.
        lambda1, lambda2: non-negative.
        kind: ``"oscar"``, ``"linear"`` or ``"spike"``.
        max_iter: iteration limit.
        tol: relative duality-gap tolerance.
        init: optional ``(p,)`` starting point (a warm start along a path of lambdas).

    Returns:
        The ``(p,)`` coefficients: a numpy array when ``X`` is one, else a float64 tensor.

    Raises:
        SharingError: mismatched shapes, non-finite data, negative lambdas, an unknown kind.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> z = rng.normal(size=(200, 1))
        >>> X = np.hstack([z + 0.05 * rng.normal(size=(200, 1)) for _ in range(3)] + [rng.normal(size=(200, 2))])
        >>> y = X[:, :3].sum(1) + 0.1 * rng.normal(size=200)
        >>> b = owl_regression(X - X.mean(0), y - y.mean(), lambda1=5.0, lambda2=5.0)
        >>> np.round(b, 2).tolist()   # the three correlated features tied, the noise dropped
        [0.97, 0.97, 0.97, -0.0, 0.0]
    """
    import numpy as np

    as_numpy = not isinstance(X, torch.Tensor)
    Xt = _as_tensor(X, "X").to(torch.float64)
    yt = _as_tensor(y, "y").to(torch.float64)
    if Xt.dim() != 2:
        raise SharingError(f"X must be a matrix (n samples, p features), got shape {fmt_shape(Xt.shape)}")
    if yt.dim() == 2 and yt.shape[1] == 1:
        yt = yt[:, 0]
    if yt.dim() != 1 or yt.shape[0] != Xt.shape[0]:
        raise SharingError(f"y must have one value per row of X: X is {fmt_shape(Xt.shape)} but y is {fmt_shape(yt.shape)}")
    if not bool(torch.isfinite(Xt).all()) or not bool(torch.isfinite(yt).all()):
        raise SharingError("X and y must be finite (no inf or nan)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise SharingError(f"max_iter must be a positive integer, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise SharingError(f"tol must be a positive number, got {tol!r}")
    n, p = Xt.shape
    device = Xt.device
    w = owl_weights(p, kind, lambda1, lambda2).numpy()
    # a small dense problem: numpy float64 on the CPU (per-iteration overhead matters more than flops)
    Xn, yn = Xt.cpu().numpy(), yt.cpu().numpy()
    b = np.zeros(p)
    if init is not None:
        b0 = _as_tensor(init, "init").to(torch.float64).cpu().reshape(-1).numpy()
        if b0.size != p:
            raise SharingError(f"init must have {p} entries (one per feature), got {b0.size}")
        b = b0.copy()

    def out(v):
        return v if as_numpy else torch.from_numpy(v).to(device)

    if p == 0 or n == 0:
        return out(b)
    gram = n >= p
    if gram:
        G = Xn.T @ Xn
        Xty = Xn.T @ yn
        L = float(np.linalg.eigvalsh(G)[-1])
    else:
        L = float(np.linalg.norm(Xn, 2)) ** 2
    if L <= 0:
        return out(np.zeros(p))
    w_step = w / L
    yy = float(yn @ yn)
    w_cum = np.cumsum(w)

    def grad(v):
        return G @ v - Xty if gram else Xn.T @ (Xn @ v - yn)

    z, t = b.copy(), 1.0
    for it in range(max_iter):
        b_new = _prox_np(z - grad(z) / L, w_step)
        # adaptive restart (O'Donoghue & Candes): drop the momentum when it points uphill
        if float((z - b_new) @ (b_new - b)) > 0:
            t = 1.0
        t_new = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = b_new + ((t - 1.0) / t_new) * (b_new - b)
        b, t = b_new, t_new
        if it % 10 == 9 or it == max_iter - 1:
            r = yn - Xn @ b
            primal = 0.5 * float(r @ r) + float(np.sort(np.abs(b))[::-1] @ w)
            if w[0] > 0:
                # dual point: the residual scaled into the dual-norm ball of the OWL norm
                c = np.cumsum(np.sort(np.abs(Xn.T @ r))[::-1])
                scale = max(1.0, float(np.max(c / w_cum)))
                theta = r / scale
                dual = 0.5 * yy - 0.5 * float((yn - theta) @ (yn - theta))
                if primal - dual <= tol * max(primal, 1e-300):
                    break
            elif float(np.linalg.norm(Xn.T @ r)) <= tol * max(1.0, math.sqrt(yy)):
                break
    return out(b)


def _prox_np(v, w):
    """The OWL prox of one float64 numpy vector (no checks)."""
    import numpy as np

    a = np.abs(v)
    perm = np.argsort(-a, kind="stable")
    z = a[perm] - w
    if z.size > 1 and not bool((z[:-1] >= z[1:]).all()):
        z = np.asarray(_pav_clip(z.tolist()))
    else:
        z = np.maximum(z, 0.0)
    x = np.empty_like(z)
    x[perm] = z
    return np.sign(v) * x
