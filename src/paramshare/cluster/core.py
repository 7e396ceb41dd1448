"""``cluster`` and ``uncluster``: weights that share a few values (the ``codebook`` kind).

:func:`cluster` turns selected weights into ``centroids[labels]``; :func:`uncluster` turns
them back into dense parameters; :func:`set_codebook` and :func:`get_codebook` build and
read one codebook weight directly (for code that computes its own centroids and labels,
such as a soft weight-sharing prior that quantizes to its mixture means).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .._index import ModelIndex, Use
from .._parametrize import remove_derived, set_derived, set_plain
from ..errors import SharingError, did_you_mean
from .kmeans import EXACT_POINTS, _Prefix, _fit, _fit_binned, _nearest

__all__ = ["cluster", "uncluster", "set_codebook", "get_codebook", "DEFAULT_TYPES", "INITS"]

#: Module types whose ``weight`` :func:`cluster` selects by default.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)
#: Initialisations of :func:`cluster` (the TF-MOT names, plus the exact optimum).
INITS = ("optimal", "kmeans++", "linear", "density")
_MAX_BITS = 16


# ---- selection ------------------------------------------------------------------------------
def _patterns(p, what: str) -> list[str]:
    if p is None:
        return []
    if isinstance(p, str):
        return [p]
    if isinstance(p, Iterable) and not isinstance(p, (bytes, Mapping)):
        out = list(p)
        if all(isinstance(x, str) and x for x in out):
            return out
    raise SharingError(f"{what} must be a pattern string or a list of them (e.g. 'encoder.*.weight'), got {p!r}")


def _matches(use: Use, pat: str) -> bool:
    return fnmatch.fnmatchcase(use.name, pat) or (bool(use.module_name) and fnmatch.fnmatchcase(use.module_name, pat))


def select(index: ModelIndex, include, exclude, min_numel: int, types=DEFAULT_TYPES) -> list[Use]:
    """The uses a weight-sharing transform applies to, in model order.

    By default the ``weight`` of every module of one of ``types`` with at least
    ``min_numel`` elements. ``include`` patterns (``fnmatch`` globs matched against the
    parameter's dotted name or its module's name) narrow that down; a pattern that names a
    parameter exactly selects it whatever its module. ``exclude`` patterns remove uses.

    Raises:
        SharingError: a pattern that matches no parameter of the model (with close names).
    """
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    uses = list(index.uses.values())
    for what, pats in (("include", inc), ("exclude", exc)):
        for pat in pats:
            if not any(_matches(u, pat) for u in uses):
                raise SharingError(
                    f"{what} pattern {pat!r} matches no parameter of the model" + did_you_mean(pat, index.uses, "parameter")
                )
    from torch.nn.utils import parametrize

    out = []
    for u in uses:
        default = u.attr == "weight" and issubclass(parametrize.type_before_parametrizations(u.module), types)
        exact = u.name in inc
        if inc and not exact and not (default and any(_matches(u, p) for p in inc)):
            continue
        if not inc and not default:
            continue
        if any(_matches(u, p) for p in exc):
            continue
        with torch.no_grad():
            v = u.value()
        if v.numel() < min_numel or not v.dtype.is_floating_point:
            continue
        out.append(u)
    return out


# ---- targets: one stored weight and every use that reads it ----------------------------------
@dataclass
class _Target:
    uses: list[Use]
    value: torch.Tensor  # the current dense value (detached)
    requires_grad: bool
    importance: torch.Tensor | None = None
    rows: int | None = None  # rows per codebook, None: whole tensor
    gram: torch.Tensor | None = None  # E[x x^T] of a Linear weight's input, with calibration data
    result: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.uses[0].name


def _targets(index: ModelIndex, selected: list[Use]) -> list[_Target]:
    from ..kinds.codebook import codebook_of

    by_key: dict[int, _Target] = {}
    order: list[_Target] = []
    for u in selected:
        cb = codebook_of(u)
        if cb is not None:
            key = id(u.plist.original)
        elif u.plist is not None:
            names = ", ".join(type(m).__name__ for m in u.plist)
            raise SharingError(
                f"cannot cluster {u.name!r}: it is computed by another parametrization ({names}); "
                f"ps.untie it first or exclude it (exclude=[{u.name!r}])"
            )
        else:
            key = id(u.param)
        if key in by_key:
            continue
        # every use reading the same stored tensor reads the codebook
        if cb is not None:
            members = [v for v in index.uses.values() if codebook_of(v) is not None and id(v.plist.original) == key]
            req = u.plist.original.requires_grad
        else:
            members = [v for v in index.uses.values() if v.param is u.param]
            for v in index.uses.values():
                q, t = v.backing()
                if t and q is u.param:
                    raise SharingError(
                        f"cannot cluster {u.name!r}: {v.name!r} reads it transposed; untie that transposed tie first "
                        f"(ps.untie(model, {v.name!r})) or exclude it (exclude=[{u.name!r}])"
                    )
            req = u.param.requires_grad
        with torch.no_grad():
            value = u.value().detach()
        t = _Target(members, value, req)
        by_key[key] = t
        order.append(t)
    return order


# ---- activation energies ---------------------------------------------------------------------
def _batches(data):
    if isinstance(data, (torch.Tensor, Mapping)):
        return [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise SharingError(
            f"data must be calibration batches (a tensor, a dict of model inputs, or an iterable of them), "
            f"got {type(data).__name__}"
        )
    return data


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _importance(model: nn.Module, targets: list[_Target], data, gram: bool = False) -> None:
    """Per-element weights for the clustering error: the input energy each weight multiplies.

    ``Linear``: the mean square of input feature ``j`` weights column ``j``; ``Conv``: the
    mean square of input channel ``c`` (over positions) weights its kernels; ``Embedding``:
    how often row ``r`` is looked up. Several uses of one weight add their normalised energies.
    """
    from torch.nn.utils import parametrize

    stats: dict[int, list] = {}  # id(use) -> [sum, count, gram]
    grams: dict[int, list] = {}  # the last input seen -> its Gram matrix (q, k and v share one input)
    hooks = []
    for t in targets:
        want_gram = gram and len(t.uses) == 1 and t.value.dim() == 2
        for u in t.uses:
            base = parametrize.type_before_parametrizations(u.module)
            if u.attr != "weight" or not issubclass(base, DEFAULT_TYPES):
                continue
            acc = [None, 0, None]
            stats[id(u)] = acc

            def hook(mod, args, kwargs, acc=acc, base=base, want_gram=want_gram and issubclass(base, nn.Linear)):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, torch.Tensor):
                    return
                x = x.detach()
                if issubclass(base, nn.Embedding):
                    e = torch.bincount(x.reshape(-1).long().cpu(), minlength=mod.num_embeddings).double()
                    n = 1
                elif issubclass(base, nn.Linear):
                    xf = x.reshape(-1, x.shape[-1]).float()
                    e, n = xf.double().square().sum(0).cpu(), xf.shape[0]
                    if want_gram:
                        key = (x.data_ptr(), tuple(x.shape))
                        g = grams.get(key)
                        if g is None:
                            grams.clear()
                            g = grams[key] = (xf.T @ xf).double().cpu()
                        acc[2] = g if acc[2] is None else acc[2] + g
                else:
                    spatial = x.dim() - (2 if x.dim() == mod.weight.dim() else 1)
                    xx = x.double() if x.dim() == mod.weight.dim() else x.double().unsqueeze(0)
                    xx = xx.transpose(0, 1).reshape(xx.shape[1], -1)
                    e, n = xx.square().sum(1).cpu(), xx.shape[1]
                    del spatial
                acc[0] = e if acc[0] is None else acc[0] + e
                acc[1] += n

            hooks.append(u.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            for i, batch in enumerate(_batches(data)):
                try:
                    _run(model, batch)
                except Exception as e:
                    raise SharingError(
                        f"running the model on calibration batch {i} failed ({type(e).__name__}: {e}); data must hold "
                        "inputs the model accepts: tensors (model(x)), tuples (model(*t)) or dicts (model(**d))"
                    ) from None
    finally:
        for h in hooks:
            h.remove()
    reached = False
    for t in targets:
        total = torch.zeros(t.value.shape, dtype=torch.float64)
        for u in t.uses:
            acc = stats.get(id(u))
            if acc is None or acc[0] is None:
                continue
            reached = True
            e = acc[0] / max(acc[1], 1)
            total += _broadcast(u, e, t.value.shape)
            if acc[2] is not None:
                t.gram = acc[2] / max(acc[1], 1)
        if bool((total > 0).any()):
            t.importance = total
    if not reached:
        raise SharingError(
            "the calibration data never reached the selected weights (no Linear, Conv or Embedding holding them ran); "
            "check that data holds model inputs, or cluster without data"
        )


def _broadcast(use: Use, e: torch.Tensor, shape) -> torch.Tensor:
    """A use's per-input energies as per-weight-element importances (normalised to mean 1)."""
    from torch.nn.utils import parametrize

    base = parametrize.type_before_parametrizations(use.module)
    mean = e.mean()
    e = e / mean if mean > 0 else torch.ones_like(e)
    if issubclass(base, nn.Embedding):
        out = e.view(-1, *([1] * (len(shape) - 1))).expand(shape)
    elif issubclass(base, nn.Linear):
        out = e.view(*([1] * (len(shape) - 1)), -1).expand(shape)
    else:  # conv: weight (out, in/groups, *kernel)
        groups = getattr(use.module, "groups", 1)
        out_ch, in_per = shape[0], shape[1]
        g = torch.arange(out_ch) // (out_ch // groups)
        idx = g.view(-1, 1) * in_per + torch.arange(in_per).view(1, -1)
        out = e[idx].view(out_ch, in_per, *([1] * (len(shape) - 2))).expand(shape)
    return out.to(torch.float64)


# ---- fitting ----------------------------------------------------------------------------------
def _fit_target(t: _Target, k: int, init: str, prune: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids (k,) or (codebooks, k), labels of the weight's shape) for one target."""
    from ..kinds.codebook import labels_dtype, linear_fit

    value = t.value
    shape = tuple(value.shape)
    nb = 1 if t.rows is None else shape[0] // t.rows
    zero = prune > 0
    if value.is_meta:
        return linear_fit(value, k, t.rows, zero)
    # values as float32 when that is exact (float32/16, bfloat16): the fast sort and label paths
    native = value.detach().cpu().reshape(nb, -1)
    native = native if native.dtype == torch.float64 else native.float()
    w = None if t.importance is None else t.importance.reshape(nb, -1)
    if w is not None and not bool((w > 0).any()):
        w = None
    if nb == 1 and not zero and init == "optimal":
        a = native.reshape(-1).numpy()
        if w is None:
            c = _fit(a, None, k, "optimal", EXACT_POINTS)
        else:  # importances estimated from calibration data: the fit on fine bins is enough
            c = _fit_binned(a, w.reshape(-1).numpy(), k)
        lab = torch.from_numpy(_nearest(a, c))
        cent = torch.from_numpy(c).to(device=value.device, dtype=value.dtype)
        return cent, lab.reshape(shape).to(labels_dtype(k)).to(value.device)
    v = native.double()
    n = v.shape[1]
    if init == "linear" and not zero:
        return linear_fit(value, k, t.rows, False)
    free = k - 1 if zero else k
    pruned = None
    if zero:
        cut = int(round(prune * n))
        order = v.abs().argsort(dim=1, stable=True)
        pruned = torch.zeros_like(v, dtype=torch.bool)
        pruned.scatter_(1, order[:, :cut], True)
    if init == "linear":
        cent, _ = linear_fit(torch.where(pruned, torch.nan, v), k, None, True) if nb == 1 else linear_fit(
            torch.where(pruned, torch.nan, v), k, 1, True
        )
        c = cent.reshape(nb, k)[:, 1:]
    elif init == "density":
        c = _density(v, w, free, pruned)
    elif init == "kmeans++":
        c = _kmeanspp(v, w, free, pruned)
    else:
        c = _optimal(v, w, free, pruned)
    # labels: nearest centroid (of the free ones); pruned weights read the zero centroid
    lab = torch.from_numpy(np.stack([_nearest(native[b].numpy(), c[b].numpy()) for b in range(nb)])) if nb <= 4 else _rows_nearest(v, c)
    if zero:
        lab = torch.where(pruned, 0, lab + 1)
        c = torch.cat((torch.zeros(nb, 1, dtype=c.dtype), c), 1)
    cent = c.to(value.dtype).to(value.device)
    if t.rows is None:
        cent = cent.reshape(k)
    return cent, lab.reshape(shape).to(labels_dtype(k)).to(value.device)


def _compensate(targets: list[_Target], results: list, block: int = 32, damp: float = 0.01) -> list:
    """Labels chosen column by column with error compensation, for Linear weights with a Gram matrix.

    With the input second moment ``H = E[x x^T]`` the output error of a weight error ``D`` is
    ``tr(D H D^T)``. As in GPTQ (Frantar et al. 2023), columns are assigned to their nearest
    centroid one at a time (largest ``H_jj`` first) and each assignment's error is pushed onto
    the columns not yet assigned through the Cholesky factor of ``H^-1``, so later labels
    compensate earlier rounding. The centroids stay those of the activation-weighted k-means;
    only the labels change. Layers of the same shape are processed together.
    """
    from ..kinds.codebook import labels_dtype

    out = list(results)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(targets):
        if t.gram is not None and t.value.dim() == 2 and not t.value.is_meta:
            groups.setdefault((t.value.shape[1], t.value.shape[0]), []).append(i)
    for (n, _), idx in groups.items():
        nl = len(idx)
        outs = [targets[i].value.shape[0] for i in idx]
        omax = max(outs)
        k = out[idx[0]][0].shape[-1]
        nb_max = max(1 if targets[i].rows is None else outs[j] // targets[i].rows for j, i in enumerate(idx))
        W = torch.zeros(nl, n, omax)
        H = torch.empty(nl, n, n, dtype=torch.float64)
        C = torch.zeros(nl, omax, k, dtype=torch.float64)  # each output row's codebook
        for j, i in enumerate(idx):
            t = targets[i]
            W[j, :, :outs[j]] = t.value.detach().float().cpu().T
            H[j] = t.gram
            cent = out[i][0].detach().double().cpu().reshape(-1, k)
            rows = outs[j] if t.rows is None else t.rows
            C[j, :outs[j]] = cent.repeat_interleave(rows, 0)
        diag = H.diagonal(dim1=1, dim2=2)
        dead = diag <= 0
        H = H + torch.diag_embed(dead.double())
        W[dead] = 0
        perm = torch.argsort(H.diagonal(dim1=1, dim2=2), dim=1, descending=True)
        W = W.gather(1, perm[:, :, None].expand(-1, -1, omax))
        H = H.gather(1, perm[:, :, None].expand(-1, -1, n)).gather(2, perm[:, None, :].expand(-1, n, -1))
        H = H + damp * H.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(n, dtype=H.dtype)
        try:
            # the upper Cholesky factor of H^-1 without forming H^-1: with P the reversal,
            # P H P = M M^T gives H^-1 = (P M^-1 P)^T (P M^-1 P), and P M^-1 P is upper triangular
            m_low = torch.linalg.cholesky(H.float().flip(-1, -2))
            eye = torch.eye(n, dtype=m_low.dtype).expand_as(m_low)
            U = torch.linalg.solve_triangular(m_low, eye, upper=False).flip(-1, -2)
        except RuntimeError:  # not positive definite even with damping: keep the nearest-centroid labels
            continue
        per_tensor = all(targets[i].rows is None for i in idx)
        Cf = C[:, 0].float() if per_tensor else C.float()  # (layers, k) or (layers, out, k)
        mids = ((Cf[..., 1:] + Cf[..., :-1]) / 2).contiguous()
        Q = torch.empty(nl, n, omax, dtype=torch.long)
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            W1 = W[:, i1:i2].clone()
            Err = torch.empty_like(W1)
            U1 = U[:, i1:i2, i1:i2]
            for i in range(i2 - i1):
                w = W1[:, i].contiguous()  # (layers, out)
                if per_tensor:
                    q = torch.searchsorted(mids, w)
                    near = Cf.gather(1, q)
                else:
                    q = torch.searchsorted(mids, w.unsqueeze(-1)).squeeze(-1)
                    near = Cf.gather(2, q.unsqueeze(-1)).squeeze(-1)
                Q[:, i1 + i] = q
                err = (w - near) / U1[:, i, i, None]
                if i + 1 < i2 - i1:
                    W1[:, i + 1:] -= U1[:, i, i + 1:, None] * err[:, None, :]
                Err[:, i] = err
            if i2 < n:
                W[:, i2:] -= U[:, i1:i2, i2:].transpose(1, 2) @ Err
        Q = Q.gather(1, torch.argsort(perm, dim=1)[:, :, None].expand(-1, -1, omax))
        for j, i in enumerate(idx):
            t = targets[i]
            lab = Q[j, :, :outs[j]].T.contiguous()
            out[i] = (out[i][0], lab.to(labels_dtype(k)).to(t.value.device))
    return out


def _rows_nearest(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest of the sorted centroids ``c`` (B, k) for every value of ``v`` (B, n); the lower one on a tie."""
    mids = ((c[:, 1:] + c[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids, v.contiguous(), right=False).clamp_(max=c.shape[1] - 1)


def _rows(v: torch.Tensor, w: torch.Tensor | None, pruned: torch.Tensor | None, b: int):
    """Row ``b``'s values and weights, pruned ones dropped (as float64 numpy)."""
    x = v[b]
    wb = None if w is None else w[b]
    if pruned is not None:
        keep = ~pruned[b]
        x = x[keep]
        wb = None if wb is None else wb[keep]
    return x.numpy(), (None if wb is None else wb.numpy())


def _optimal(v, w, k, pruned) -> torch.Tensor:
    """Exact optimal centroids per codebook row (float64, (B, k))."""
    from .kmeans import EXACT_POINTS

    out = []
    nb = v.shape[0]
    if nb > 1 and pruned is None:
        return _optimal_batched(v, w, k)
    for b in range(nb):
        x, wb = _rows(v, w, pruned, b)
        if x.size == 0:
            out.append(np.zeros(k))
            continue
        if wb is not None and not (wb > 0).any():
            wb = None
        out.append(_fit(x, wb, k, "optimal", EXACT_POINTS))
    return torch.from_numpy(np.stack(out))


def _optimal_batched(v: torch.Tensor, w: torch.Tensor | None, k: int) -> torch.Tensor:
    """Exact optimal centroids for many small rows at once: the programme batched over rows."""
    from .kmeans import _dc_batched

    nb, n = v.shape
    out = torch.empty(nb, k, dtype=torch.float64)
    if k >= n:
        s, _ = v.sort(1)
        out[:, :n] = s
        out[:, n:] = s[:, -1:]
        return out
    chunk = max(1, (1 << 22) // ((n + 1) * k))  # rows per batch: bounds the back-pointer memory
    for s0 in range(0, nb, chunk):
        vs, order = v[s0:s0 + chunk].sort(1)
        ws = None if w is None else w[s0:s0 + chunk].gather(1, order)
        if ws is not None:
            # rows without any weight fall back to plain k-means; zero weights get a tiny one
            dead = ~(ws > 0).any(1, keepdim=True)
            ws = torch.where(dead, torch.ones_like(ws), ws)
            ws = ws + 1e-12 * ws.mean(1, keepdim=True)
        out[s0:s0 + chunk] = torch.from_numpy(_dc_batched(vs.numpy(), None if ws is None else ws.numpy(), k))
    return out


def _density(v, w, k, pruned) -> torch.Tensor:
    """Centroids at the (weighted) quantiles (i + 1/2) / k of each row."""
    out = []
    for b in range(v.shape[0]):
        x, wb = _rows(v, w, pruned, b)
        if x.size == 0:
            out.append(np.zeros(k))
            continue
        order = np.argsort(x, kind="stable")
        xs = x[order]
        cw = np.cumsum(np.ones_like(xs) if wb is None else wb[order])
        q = (np.arange(k) + 0.5) / k * cw[-1]
        out.append(xs[np.minimum(np.searchsorted(cw, q), xs.size - 1)])
    return torch.from_numpy(np.sort(np.stack(out), 1))


def _kmeanspp(v, w, k, pruned) -> torch.Tensor:
    """k-means++ seeding (deterministic, seed 0) and Lloyd's iterations, per row."""
    from .kmeans import _lloyd_cuts

    gen = np.random.default_rng(0)
    out = []
    for b in range(v.shape[0]):
        x, wb = _rows(v, w, pruned, b)
        if x.size == 0:
            out.append(np.zeros(k))
            continue
        wt = np.ones_like(x) if wb is None else wb
        if not (wt > 0).any():
            wt = np.ones_like(x)
        seeds = [x[gen.choice(x.size, p=wt / wt.sum())]]
        d2 = (x - seeds[0]) ** 2
        for _ in range(1, k):
            p = wt * d2
            if p.sum() <= 0:
                break
            seeds.append(x[gen.choice(x.size, p=p / p.sum())])
            d2 = np.minimum(d2, (x - seeds[-1]) ** 2)
        order = np.argsort(x, kind="stable")
        xs, ws = x[order], wt[order]
        keep = ws > 0
        xs, ws = xs[keep], ws[keep]
        pre, cuts = _lloyd_cuts(xs, ws, k, init=np.sort(np.array(seeds)))
        c = pre.means(cuts)
        out.append(np.concatenate((c, np.full(k - c.size, c[-1]))))
    return torch.from_numpy(np.sort(np.stack(out), 1))


# ---- argument checks --------------------------------------------------------------------------
def _check_int(v, what: str) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _clusters(bits, clusters, prune) -> int:
    if (bits is None) == (clusters is None):
        raise SharingError(
            "give exactly one of bits (2**bits clusters, e.g. bits=4) or clusters (e.g. clusters=16)"
            + (f"; got bits={bits!r} and clusters={clusters!r}" if bits is not None else "")
        )
    if bits is not None:
        if not _check_int(bits, "bits") or not 1 <= bits <= _MAX_BITS:
            raise SharingError(f"bits must be an integer from 1 to {_MAX_BITS}, got {bits!r}")
        k = 1 << int(bits)
    else:
        if not _check_int(clusters, "clusters") or not 2 <= clusters <= 1 << _MAX_BITS:
            raise SharingError(f"clusters must be an integer from 2 to {1 << _MAX_BITS}, got {clusters!r}")
        k = int(clusters)
    return k


def _rows_per_codebook(granularity, t: _Target) -> int | None:
    shape = tuple(t.value.shape)
    if granularity == "tensor":
        return None
    if len(shape) < 1:
        raise SharingError(f"cannot cluster {t.name!r} per channel: it is a scalar; use granularity='tensor'")
    rows = 1 if granularity == "channel" else int(granularity)
    if shape[0] % rows:
        divisors = [d for d in range(1, shape[0] + 1) if shape[0] % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise SharingError(
            f"granularity {granularity} does not divide the {shape[0]} output channels of {t.name!r} {tuple(shape)}; "
            f"choose a group size among {shown}, 'channel' or 'tensor'"
        )
    return rows


# ---- public API -------------------------------------------------------------------------------
def cluster(
    model: nn.Module,
    bits: int | None = None,
    clusters: int | None = None,
    granularity: str | int = "tensor",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    min_numel: int = 1024,
    init: str = "optimal",
    data=None,
    prune: float = 0.0,
) -> nn.Module:
    """Make selected weights share a few values each: ``weight = centroids[labels]``.

    Every selected weight (by default the ``weight`` of each ``Linear``, ``Conv1d/2d/3d``
    and ``Embedding`` with at least ``min_numel`` elements) becomes the ``codebook`` kind:
    its centroids are a trainable ``nn.Parameter`` (each centroid's gradient is the sum of
    its members' gradients, so fine-tuning works with any optimizer), its labels a
    small-integer buffer. The module keeps its class and forward, and ``module.weight`` reads
    the reconstructed dense weight, as with ``torch.nn.utils.parametrize``. A weight tied to
    others (an alias) is clustered once and all its uses read the codebook. Clustering an
    already clustered weight re-clusters its current values with the new settings.

    Args:
        model: the model (changed in place).
        bits: ``2**bits`` clusters per codebook (1 to 16); or give ``clusters``.
        clusters: the number of clusters per codebook (2 to 65536); or give ``bits``.
        granularity: ``"tensor"`` (one codebook per weight), ``"channel"`` (one per output
            channel, i.e. per row of dim 0) or an int ``g`` (one per group of ``g`` output
            channels; it must divide their number).
        include: ``fnmatch`` pattern(s) on parameter or module names (``"encoder.*"``) that
            narrow the default selection; a pattern naming a parameter exactly selects it
            whatever its module.
        exclude: pattern(s) of weights to leave dense.
        min_numel: weights with fewer elements stay dense.
        init: ``"optimal"``: exact 1-D k-means (:func:`paramshare.kmeans1d`, minimum
            squared error); ``"kmeans++"``: k-means++ seeding (seed 0) then Lloyd's
            iterations; ``"linear"``: centroids evenly spaced between the minimum and
            maximum; ``"density"``: centroids at evenly spaced quantiles. The last two are
            TF-MOT's initialisations for fine-tuning: labels go to the nearest centroid and
            the centroids are not refitted.
        data: optional calibration batches (a tensor, a dict of inputs, or an iterable of
            tensors, tuples or dicts, each passed to ``model``). Each weight's squared error
            is then weighted by the mean square of the input it multiplies (per input
            feature of a ``Linear``, per input channel of a ``Conv``, per looked-up row of an
            ``Embedding``), which approximates the error of the layer's output rather than of
            its weights (activation-aware clustering; with one codebook per tensor the
            weighted k-means runs on 32768 equal-width bins of the value range, see
            ``paramshare.cluster.kmeans._fit_binned``). With ``init="optimal"`` and no
            ``prune``, the labels of each ``Linear`` weight used once are then chosen column by
            column with error compensation through the input covariance (as GPTQ does for
            uniform grids), so later columns make up for earlier rounding. Put the model in
            ``eval()`` mode first.
        prune: fraction of each codebook's weights, smallest magnitudes first, that read a
            centroid pinned at exactly zero (label 0, no gradient) while the others are
            clustered into the remaining ``k - 1`` centroids: Deep Compression's pruning and
            clustering in one step.

    Returns:
        ``model``.

    Raises:
        SharingError: both or neither of ``bits``/``clusters``, values out of range, an
            unknown ``init`` or ``granularity``, a group size that does not divide the output
            channels, a pattern that matches nothing, no weight selected, a weight computed
            by another parametrization or read transposed elsewhere, calibration data that
            never reaches the selected weights. The model is then unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> net = ps.cluster(net, bits=4, min_numel=100)
        >>> net[0].weight.unique().numel() <= 16, type(net[0]).__name__
        (True, 'ParametrizedLinear')
        >>> print(ps.report(net).rows[0].stats.detail)  # 4-bit labels + 16 float32 centroids
        16 clusters, 4.12 bits/weight, 2.1 KiB with the codebook
    """
    k = _clusters(bits, clusters, prune)
    if not isinstance(prune, (int, float)) or isinstance(prune, bool) or not 0 <= prune < 1 or math.isnan(prune):
        raise SharingError(f"prune must be a fraction in [0, 1), got {prune!r}")
    if prune > 0 and k < 2:
        raise SharingError("prune needs at least 2 clusters: one pinned at zero and one for the rest")
    if init not in INITS:
        raise SharingError(f"unknown init {init!r}; choose one of {', '.join(map(repr, INITS))}")
    if not (granularity in ("tensor", "channel") or (_check_int(granularity, "granularity") and granularity >= 1)):
        raise SharingError(f"granularity must be 'tensor', 'channel' or a positive number of channels, got {granularity!r}")
    if not _check_int(min_numel, "min_numel") or min_numel < 0:
        raise SharingError(f"min_numel must be a non-negative integer, got {min_numel!r}")
    if not isinstance(model, nn.Module):
        raise SharingError(f"expected an nn.Module, got {type(model).__name__}")
    index = ModelIndex(model)
    selected = select(index, include, exclude, int(min_numel))
    if not selected:
        raise SharingError(
            f"no weight to cluster: no Linear, Conv or Embedding weight with at least {min_numel} elements"
            + (" matches the include/exclude patterns" if include or exclude else "")
            + "; lower min_numel or name parameters with include=[...]"
        )
    targets = _targets(index, selected)
    for t in targets:
        t.rows = _rows_per_codebook(granularity, t)
    if data is not None:
        if any(t.value.is_meta for t in targets):
            raise SharingError("cannot use calibration data on a model on the meta device; materialise it first")
        _importance(model, targets, data, gram=init == "optimal" and not prune)
    results = _fit_all(targets, k, init, float(prune))
    if data is not None:
        results = _compensate(targets, results)
    _install(targets, results, k, float(prune) > 0)
    return model


def _fit_all(targets: list[_Target], k: int, init: str, prune: float) -> list:
    """Fit every target, the largest first, on as many threads as torch uses (numpy's sorts,
    prefix sums and gathers release the GIL)."""
    workers = max(1, min(torch.get_num_threads(), len(targets), 8))
    if workers == 1:
        return [_fit_target(t, k, init, prune) for t in targets]
    from concurrent.futures import ThreadPoolExecutor

    order = sorted(range(len(targets)), key=lambda i: -targets[i].value.numel())
    with ThreadPoolExecutor(workers) as pool:
        futures = {i: pool.submit(_fit_target, targets[i], k, init, prune) for i in order}
        return [futures[i].result() for i in range(len(targets))]


def _install(targets: list[_Target], results, k: int, zero: bool) -> None:
    from ..kinds.codebook import Codebook

    for t, (cent, labels) in zip(targets, results):
        cb = Codebook(labels, k, t.rows, zero)
        orig = nn.Parameter(cent, requires_grad=t.requires_grad)
        for u in t.uses:
            set_derived(u.module, u.attr, cb, orig)


def uncluster(model: nn.Module) -> nn.Module:
    """Turn every clustered weight back into a dense parameter with the same values.

    The uses of one codebook (a tied embedding and head clustered together) get one shared
    dense ``nn.Parameter`` (an alias, as before clustering). Models without clustered
    weights are returned unchanged.

    Args:
        model: the model (changed in place).

    Returns:
        ``model``.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> net = ps.cluster(nn.Sequential(nn.Linear(64, 64)), bits=2, min_numel=1)
        >>> before = net[0].weight.detach().clone()
        >>> net = ps.uncluster(net)
        >>> type(net[0]).__name__, torch.equal(net[0].weight, before)
        ('Linear', True)
    """
    if not isinstance(model, nn.Module):
        raise SharingError(f"expected an nn.Module, got {type(model).__name__}")
    from ..kinds.codebook import codebook_of

    index = ModelIndex(model)
    groups: dict[int, list[Use]] = {}
    for u in index.uses.values():
        if codebook_of(u) is not None:
            groups.setdefault(id(u.plist.original), []).append(u)
    with torch.no_grad():
        dense = [(uses, uses[0].value().detach().clone(), uses[0].plist.original.requires_grad) for uses in groups.values()]
    for uses, value, req in dense:
        p = nn.Parameter(value, requires_grad=req)
        for u in uses:
            remove_derived(u.module, u.attr)
            set_plain(u.module, u.attr, p)
    return model


def set_codebook(model: nn.Module, name: str, centroids: torch.Tensor, labels: torch.Tensor, zero: bool = False) -> nn.Module:
    """Make the parameter ``name`` read ``centroids[labels]`` (a ``codebook`` weight you computed).

    For code that chooses its own centroids and labels (quantizing to a prior's mixture
    means, a pruning mask plus clusters, ...). Every use of the same stored weight (an alias)
    reads the codebook; an already clustered weight gets the new codebook.

    Args:
        model: the model (changed in place).
        name: the used parameter's dotted name, e.g. ``"fc1.weight"``.
        centroids: ``(k,)`` for one codebook, or ``(codebooks, k)`` with one codebook per
            group of ``rows = weight.shape[0] // codebooks`` rows (output channels).
        labels: integers in ``0 .. k-1`` with the weight's shape.
        zero: pin centroid 0 of every codebook at exactly zero (it gets no gradient): the
            weights labelled 0 stay pruned during fine-tuning.

    Returns:
        ``model``.

    Raises:
        SharingError: an unknown name, a weight computed by another parametrization, shapes
            that do not fit, labels out of range, non-floating centroids. Model unchanged.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> from paramshare.cluster import set_codebook, get_codebook
        >>> net = nn.Sequential(nn.Linear(4, 3))
        >>> labels = (net[0].weight > 0).long()          # two clusters: negative, positive
        >>> net = set_codebook(net, "0.weight", torch.tensor([-0.2, 0.2]), labels)
        >>> sorted(net[0].weight.unique().tolist())
        [-0.20000000298023224, 0.20000000298023224]
        >>> c, lab = get_codebook(net, "0.weight")
        >>> c.shape, lab.dtype
        (torch.Size([2]), torch.int64)
    """
    from ..kinds.codebook import labels_dtype

    index = ModelIndex(model)
    use = index.use(name)
    targets = _targets(index, [use])
    t = targets[0]
    shape = tuple(t.value.shape)
    if not isinstance(centroids, torch.Tensor) or not centroids.dtype.is_floating_point or centroids.dim() not in (1, 2):
        raise SharingError(
            f"centroids must be a floating-point tensor of shape (k,) or (codebooks, k), got "
            f"{getattr(centroids, 'dtype', type(centroids).__name__)} {tuple(getattr(centroids, 'shape', ()))}"
        )
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise SharingError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != shape:
        raise SharingError(f"labels have shape {tuple(labels.shape)} but {name!r} has shape {shape}")
    k = centroids.shape[-1]
    if not 1 <= k <= 1 << _MAX_BITS:
        raise SharingError(f"a codebook holds 1 to {1 << _MAX_BITS} centroids, got {k}")
    rows = None
    if centroids.dim() == 2:
        nb = centroids.shape[0]
        if nb < 1 or not shape or shape[0] % nb:
            raise SharingError(
                f"{nb} codebooks do not divide the {shape[0] if shape else 0} rows of {name!r}; give (k,) centroids "
                "or a number of codebooks that divides the rows"
            )
        rows = shape[0] // nb
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise SharingError(f"labels must be in 0..{k - 1} for {k} centroids; got values from {int(labels.min())} to {int(labels.max())}")
    if not isinstance(zero, bool):
        raise SharingError(f"zero must be True or False, got {zero!r}")
    cent = centroids.detach().to(device=t.value.device, dtype=t.value.dtype).clone()
    if zero:
        cent[..., 0] = 0
    lab = labels.detach().to(device=t.value.device, dtype=labels_dtype(k))
    t.rows = rows
    _install([t], [(cent, lab)], k, zero)
    return model


def get_codebook(model: nn.Module, name: str) -> tuple[nn.Parameter, torch.Tensor]:
    """The centroids ``nn.Parameter`` and int64 labels of a clustered weight.

    Raises:
        SharingError: an unknown name or a weight that is not clustered.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> from paramshare.cluster import get_codebook
        >>> net = ps.cluster(nn.Sequential(nn.Linear(32, 32)), bits=3, min_numel=1)
        >>> c, labels = get_codebook(net, "0.weight")
        >>> tuple(c.shape), tuple(labels.shape), int(labels.max()) < 8
        ((8,), (32, 32), True)
    """
    from ..kinds.codebook import codebook_of

    index = ModelIndex(model)
    use = index.use(name)
    cb = codebook_of(use)
    if cb is None:
        raise SharingError(f"{name!r} is not clustered; cluster it with ps.cluster or set_codebook")
    return use.plist.original, cb.labels.long()
