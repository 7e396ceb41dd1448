"""One-dimensional k-means: the smallest within-cluster sum of squares.

In one dimension the clusters of an optimal solution are runs of the sorted values, so the
problem is a shortest path with ``k`` links over the sorted values: a dynamic programme whose
cost ``cost(a, b)`` (the weighted sum of squares of sorted values ``a..b-1``) comes from
prefix sums in O(1), and whose best split point is monotone (the cost is Monge), so each
layer is solved by divide and conquer.

How :func:`kmeans1d` gets there fast:

1. **One sort** (numpy's vectorised sort), then equal values are merged into one weighted
   point: an optimal solution never splits equal values.
2. **Exact dynamic programme** over the merged points when there are at most
   :data:`EXACT_POINTS` of them (provably optimal). Every layer runs the divide and conquer
   *level by level*: all sub-problems of one recursion level are evaluated in a few
   vectorised numpy passes, so a layer costs O(m log m) work but only O(log m) Python steps.
3. **Coarse to fine** above that, in three exact programmes over restricted domains:

   a. a coarse grid of runs, each with a sum of squares below a threshold set from an upper
      bound of the optimum (so heavy tails are resolved point by point) and at most
      ``m / COARSE_RUNS`` points; the programme over the runs;
   b. a finer grid (``BAND_RUNS`` runs per cluster) on which every boundary may move
      anywhere between the current positions of its neighbours on either side (a band of
      ``2 * BAND`` clusters); this settles how many clusters each region of the line gets;
   c. full resolution, each boundary within ``RADIUS`` runs of the finer grid or a
      ``SHARE`` of its neighbouring clusters, whichever is wider (the cost is very flat
      along some directions, so the rounding of the finer grid can pick a basin hundreds of
      points away).

   A boundary that ends on the edge of its window re-centres the windows and the stage is
   solved again, so the result is the exact optimum among all partitions whose boundaries
   lie within those windows of it. This is a large neighbourhood, not a proof of global
   optimality: on the benchmarks (1M and 4M heavy-tailed values, k = 16 and 256) it matches
   ckwrap's exact optimum, and the tests compare it with the full programme on varied
   inputs. The full programme on a million values would take about a minute in numpy.

``method="lloyd"`` is the fast heuristic: Lloyd's iterations on the sorted values, each
O(k log n) thanks to the same prefix sums, started from weighted quantiles.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import SharingError

__all__ = ["kmeans1d", "sse", "EXACT_POINTS"]

#: Above this many distinct values, the coarse-to-fine path is used (exact DP below it).
EXACT_POINTS = 8192
#: Equal-width bins of the value range for weighted fits of estimated importances (_fit_binned).
BINS = 32768
#: Runs of the coarse grid (count cuts and value cuts, each this many at most).
COARSE_RUNS = 2048
#: Runs per cluster (at least) of the grid on which boundaries move between their neighbours.
BAND_RUNS = 512
#: A boundary may move anywhere between the current positions of its BAND-th neighbours.
BAND = 2
#: At full resolution a boundary may also move by this fraction of its neighbouring clusters.
SHARE = 0.125
#: ... but by at most this many points.
SHARE_CAP = 8192
#: How many runs of that grid a boundary may move, each side, in the full-resolution refinement.
RADIUS = 4
_METHODS = ("optimal", "lloyd")


# ---- input handling --------------------------------------------------------------------------
def _as_numpy(x, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_meta:
            raise SharingError(f"{what} is on the meta device and holds no values; materialise it first")
        if x.is_complex():
            raise SharingError(f"{what} must be real, got a {x.dtype} tensor")
        t = x.detach()
        if t.dtype in (torch.bfloat16, torch.float16) or not t.dtype.is_floating_point:
            t = t.to(torch.float64)
        return t.cpu().reshape(-1).numpy()
    try:
        a = np.asarray(x)
    except Exception:
        raise SharingError(f"{what} must be a tensor or an array of numbers, got {type(x).__name__}") from None
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise SharingError(f"{what} must hold real numbers, got dtype {a.dtype}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    return a.reshape(-1)


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a))
        raise SharingError(
            f"{what} has {bad.size} non-finite value{'s' if bad.size != 1 else ''} (NaN or inf), the first at "
            f"flat index {int(bad[0])} ({a[bad[0]]}); k-means needs finite numbers: replace or drop them first"
        )


# ---- prefix sums and costs -------------------------------------------------------------------
class _Prefix:
    """Weighted prefix sums of centred values: cost(a, b) of points a..b-1 in O(1)."""

    def __init__(self, values: np.ndarray, weights: np.ndarray | None):
        m = values.size
        self.unit = weights is None
        if weights is None:  # every point has weight one
            self.shift = float(values.mean())
            self.p0 = np.arange(m + 1, dtype=np.float64)
            v = values - self.shift
            t = v
        else:
            w = weights.astype(np.float64, copy=False)
            self.shift = float(np.dot(values, w) / w.sum())
            self.p0 = np.empty(m + 1)
            self.p0[0] = 0.0
            np.cumsum(w, out=self.p0[1:])
            v = values - self.shift
            t = w * v
        self.p1 = np.empty(m + 1)
        self.p1[0] = 0.0
        np.cumsum(t, out=self.p1[1:])
        t = t * v
        self.p2 = np.empty(m + 1)
        self.p2[0] = 0.0
        np.cumsum(t, out=self.p2[1:])

    def cost(self, a, b):
        d0 = self.p0[b] - self.p0[a]
        d1 = self.p1[b] - self.p1[a]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = (self.p2[b] - self.p2[a]) - d1 * d1 / d0
        return c

    def means(self, cuts: np.ndarray) -> np.ndarray:
        a, b = cuts[:-1], cuts[1:]
        return (self.p1[b] - self.p1[a]) / (self.p0[b] - self.p0[a]) + self.shift


def _subset(pre: _Prefix, cuts: np.ndarray) -> _Prefix:
    """The prefix sums of runs ``cuts[i]..cuts[i+1]-1`` as points of a coarser problem."""
    sub = _Prefix.__new__(_Prefix)
    sub.shift = pre.shift
    sub.unit = False
    sub.p0, sub.p1, sub.p2 = pre.p0[cuts], pre.p1[cuts], pre.p2[cuts]
    return sub


# ---- the exact programme ---------------------------------------------------------------------
def _dc_layer(pre: _Prefix, fprev: np.ndarray, plo: int, phi: int, ilo: int, ihi: int):
    """One layer of the programme by level-synchronous divide and conquer.

    ``F(i) = min over l in [plo, min(phi, i-1)] of fprev[l - plo] + cost(l, i)`` for every
    ``i`` in ``[ilo, ihi]`` (requires ``plo < ilo``). The best ``l`` is non-decreasing in
    ``i`` (the cost is Monge), so solving the middle position of every open interval bounds
    the best ``l`` of both halves; all intervals of one recursion level are one batch of
    vectorised work, and a layer takes O(log n) batches. Returns ``(F, best l)`` indexed by
    ``i - ilo``.
    """
    n_out = ihi - ilo + 1
    f = np.empty(n_out)
    arg = np.empty(n_out, dtype=np.int64)
    lo = np.array([ilo])
    hi = np.array([ihi])
    ol = np.array([plo])
    oh = np.array([phi])
    n_prev = fprev.size
    tabs = (fprev - pre.p2[plo:plo + n_prev], pre.p1[plo:plo + n_prev], None if pre.unit else pre.p0[plo:plo + n_prev])
    while lo.size:
        mid = (lo + hi) >> 1
        mins, best = _row_minima(pre, tabs, plo, mid, ol, np.minimum(oh, mid - 1))
        f[mid - ilo] = mins
        arg[mid - ilo] = best
        left = lo < mid
        right = mid < hi
        lo, hi, ol, oh = (
            np.concatenate((lo[left], mid[right] + 1)),
            np.concatenate((mid[left] - 1, hi[right])),
            np.concatenate((ol[left], best[right])),
            np.concatenate((best[left], oh[right])),
        )
    return f, arg


def _row_minima(pre: _Prefix, tabs, plo: int, rows: np.ndarray, cl: np.ndarray, ch: np.ndarray):
    """For each position ``rows[r]``: min and first argmin of ``fprev[l - plo] + cost(l, rows[r])``, l in [cl, ch].

    ``fprev[l - plo] + cost(l, b) = (fprev[l - plo] - P2[l]) + P2[b] - (P1[b] - P1[l])**2 / (P0[b] - P0[l])``:
    ``tabs`` holds ``fprev - P2``, ``P1`` and ``P0`` (None when every weight is one, then
    ``P0[b] - P0[l] = b - l``) over the candidates, so each candidate costs two or three gathers.
    """
    p0, p1, p2 = pre.p0, pre.p1, pre.p2
    a, q1, q0 = tabs
    cnt = ch - cl + 1
    width = int(cnt.max())
    total = int(cnt.sum())
    if rows.size * width <= 4 * total + 64:
        idx = np.minimum((cl - plo)[:, None] + np.arange(width)[None, :], (ch - plo)[:, None])
        bs = rows[:, None]
        d1 = p1[bs] - q1[idx]
        d0 = (bs - plo - idx).astype(np.float64) if q0 is None else p0[bs] - q0[idx]
        val = a[idx] + p2[bs] - d1 * d1 / d0
        j = np.argmin(val, axis=1)  # padding repeats the last candidate: the first minimum wins
        r = np.arange(rows.size)
        return val[r, j], idx[r, j] + plo
    starts = np.cumsum(cnt) - cnt
    seg = np.repeat(np.arange(rows.size), cnt)
    idx = np.arange(total) + (cl - plo - starts)[seg]
    bs = rows[seg]
    d1 = p1[bs] - q1[idx]
    d0 = (bs - plo - idx).astype(np.float64) if q0 is None else p0[bs] - q0[idx]
    val = a[idx] + p2[bs] - d1 * d1 / d0
    mins = np.minimum.reduceat(val, starts)
    hit = np.flatnonzero(val <= mins[seg])
    hs = seg[hit]
    firsts = np.ones(hit.size, dtype=bool)
    firsts[1:] = hs[1:] != hs[:-1]
    return mins, idx[hit[firsts]] + plo


_DENSE_CELLS = 1 << 16  # a layer this small is one dense (candidates x positions) evaluation


def _dense_layer(pre: _Prefix, fprev: np.ndarray, plo: int, phi: int, ilo: int, ihi: int):
    """:func:`_dc_layer` for small windows: every (l, i) pair at once, l < i enforced."""
    ls = np.arange(plo, phi + 1)[:, None]
    bs = np.arange(ilo, ihi + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        val = fprev[:, None] + pre.cost(ls, bs)
    val[ls >= bs] = np.inf
    a = np.argmin(val, axis=0)
    return val[a, np.arange(bs.size)], a + plo


def _dp_exact(pre: _Prefix, m: int, k: int) -> np.ndarray:
    """Optimal cuts (length k+1, from 0 to m) of m weighted points into k non-empty runs."""
    return _dp_windows(pre, m, [(j, m - (k - j)) for j in range(1, k)])


def _dp_windows(pre: _Prefix, m: int, windows: list[tuple[int, int]]) -> np.ndarray:
    """Optimal cuts (0, c_1, ..., c_{k-1}, m) with each boundary ``c_j`` in ``windows[j-1]``.

    ``windows`` are inclusive index ranges ``(lo_j, hi_j)``, non-decreasing in ``j``, with
    ``0 < lo_1``, ``hi_{k-1} < m`` and ``lo_j < lo_{j+1}``, ``hi_j < hi_{j+1}`` (every
    position of a window then has a feasible predecessor and successor).
    """
    if not windows:
        return np.array([0, m], dtype=np.int64)
    lo1, hi1 = windows[0]
    f = pre.cost(0, np.arange(lo1, hi1 + 1))
    plo, phi = lo1, hi1
    backs = []
    for lo, hi in windows[1:]:
        if (phi - plo + 1) * (hi - lo + 1) <= _DENSE_CELLS:
            f, arg = _dense_layer(pre, f, plo, phi, lo, hi)
        else:
            f, arg = _dc_layer(pre, f, plo, phi, lo, hi)
        backs.append((lo, arg))
        plo, phi = lo, hi
    ls = np.arange(plo, phi + 1)
    val = f + pre.cost(ls, m)
    cuts = [m, int(ls[int(np.argmin(val))])]
    for lo, arg in reversed(backs):
        cuts.append(int(arg[cuts[-1] - lo]))
    cuts.append(0)
    return np.array(cuts[::-1], dtype=np.int64)


def _dc_batched(values: np.ndarray, weights: np.ndarray | None, k: int) -> np.ndarray:
    """Exact optimal centroids (B, k) for B independent sorted rows of n values each (n > k).

    The programme of :func:`_dp_exact`, run on all rows at once: indices are global
    (``row * (n + 1) + i``) so every divide-and-conquer level of every row is one batch.
    Rows may repeat values (an optimal solution never splits equal values).
    """
    nb, n = values.shape
    w = np.ones_like(values) if weights is None else weights.astype(np.float64)
    shift = (values * w).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    v = values - shift
    z = np.zeros((nb, 1))
    p0 = np.concatenate((z, np.cumsum(w, 1)), 1).reshape(-1)
    p1 = np.concatenate((z, np.cumsum(w * v, 1)), 1).reshape(-1)
    p2 = np.concatenate((z, np.cumsum(w * v * v, 1)), 1).reshape(-1)
    stride = n + 1
    base = np.arange(nb, dtype=np.int64) * stride

    def cost(a, b):
        d0 = p0[b] - p0[a]
        d1 = p1[b] - p1[a]
        with np.errstate(divide="ignore", invalid="ignore"):
            return (p2[b] - p2[a]) - d1 * d1 / d0

    idx = np.arange(nb * stride)
    f = cost((idx // stride) * stride, idx)
    backs = []
    for j in range(2, k):
        g = np.full(nb * stride, np.inf)
        arg = np.zeros(nb * stride, dtype=np.int64)
        lo, hi = base + j, base + n - (k - j)
        ol, oh = base + j - 1, hi - 1
        while lo.size:
            mid = (lo + hi) >> 1
            ch = np.minimum(oh, mid - 1)
            cnt = ch - ol + 1
            starts = np.cumsum(cnt) - cnt
            total = int(starts[-1] + cnt[-1])
            seg = np.repeat(np.arange(lo.size), cnt)
            ls = np.arange(total) + (ol - starts)[seg]
            val = f[ls] + cost(ls, mid[seg])
            mins = np.minimum.reduceat(val, starts)
            hit = np.flatnonzero(val <= mins[seg])
            hs = seg[hit]
            first = np.ones(hit.size, dtype=bool)
            first[1:] = hs[1:] != hs[:-1]
            best = ls[hit[first]]
            g[mid] = mins
            arg[mid] = best
            left = lo < mid
            right = mid < hi
            lo, hi, ol, oh = (
                np.concatenate((lo[left], mid[right] + 1)),
                np.concatenate((mid[left] - 1, hi[right])),
                np.concatenate((ol[left], best[right])),
                np.concatenate((best[left], oh[right])),
            )
        f = g
        backs.append(arg)
    ls = base[:, None] + np.arange(k - 1, n)[None, :]
    ends = (base + n)[:, None]
    val = f[ls] + cost(ls, ends) if k > 1 else None
    cuts = np.empty((nb, k + 1), dtype=np.int64)
    cuts[:, 0] = base
    cuts[:, k] = base + n
    if k > 1:
        cuts[:, k - 1] = ls[np.arange(nb), np.argmin(val, 1)]
        for j in range(k - 2, 0, -1):
            cuts[:, j] = backs[j - 1][cuts[:, j + 1]]
    a, b = cuts[:, :-1], cuts[:, 1:]
    return (p1[b] - p1[a]) / (p0[b] - p0[a]) + shift


def _feasible(lo: np.ndarray, hi: np.ndarray, m: int) -> list[tuple[int, int]]:
    """Clip windows so that lo and hi increase strictly and stay within (0, m)."""
    k1 = lo.size
    j = np.arange(1, k1 + 1)
    lo = np.maximum.accumulate(np.maximum(lo, 1) - j) + j  # strictly increasing
    hi = (np.minimum.accumulate((np.minimum(hi, m - 1) - j)[::-1])[::-1]) + j
    lo = np.minimum(lo, hi)
    return list(zip(lo.tolist(), hi.tolist()))


def _refine(pre: _Prefix, m: int, k: int, coarse_cuts: np.ndarray, ci: np.ndarray, radius: int) -> np.ndarray:
    """Boundaries re-optimised at full resolution, each within ``radius`` coarse runs of ``coarse_cuts[ci]``.

    When a boundary ends on the edge of its window, the windows are re-centred on the new
    boundaries and the programme is solved again, until every boundary is inside its window
    (or at a hard limit).
    """
    r = coarse_cuts.size - 1
    j = np.arange(1, k)
    for _ in range(1000):
        lo = coarse_cuts[np.maximum(ci - radius, 0)]
        hi = coarse_cuts[np.minimum(ci + radius, r)]
        if SHARE:  # also a fraction of each neighbouring cluster: flat directions of the cost are wide
            b = np.concatenate(([0], coarse_cuts[np.minimum(ci, r)], [m]))
            lo = np.minimum(lo, b[1:-1] - np.minimum((b[1:-1] - b[:-2]) * SHARE, SHARE_CAP).astype(np.int64))
            hi = np.maximum(hi, b[1:-1] + np.minimum((b[2:] - b[1:-1]) * SHARE, SHARE_CAP).astype(np.int64))
        windows = _feasible(lo, hi, m)
        cuts = _dp_windows(pre, m, windows)[1:-1]
        lo = np.array([w[0] for w in windows])
        hi = np.array([w[1] for w in windows])
        at_edge = ((cuts == lo) & (lo > j)) | ((cuts == hi) & (hi < m - (k - j)))
        new_ci = np.searchsorted(coarse_cuts, cuts)
        if not at_edge.any() or np.array_equal(new_ci, ci):
            return cuts
        ci = new_ci
    return cuts  # pragma: no cover - the windows move monotonically toward a fixed point


def _split_runs(pre: _Prefix, cuts: np.ndarray, tau: float, gmax: int) -> np.ndarray:
    """Halve (by index) every run whose sum of squares exceeds ``tau`` or that has more than ``gmax`` points."""
    while True:
        a, b = cuts[:-1], cuts[1:]
        cnt = b - a
        bad = (cnt > 1) & ((cnt > gmax) | (pre.cost(a, b) > tau))
        if not bad.any():
            return cuts
        cuts = np.sort(np.concatenate((cuts, (a[bad] + b[bad]) >> 1)))


def _band(pre: _Prefix, m: int, k: int, cuts: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Boundaries (indices into ``cuts``) re-optimised over the runs of ``cuts``, each anywhere
    strictly between its neighbours' current positions; repeated while a boundary ends on the
    edge of its window (so boundaries can move by whole clusters)."""
    r = cuts.size - 1
    sub = pre if r == m else _subset(pre, cuts)
    j = np.arange(1, k)
    for _ in range(1000):
        full = np.concatenate(([0] * BAND, pos, [r] * BAND))
        lo, hi = full[:k - 1] + 1, full[2 * BAND:] - 1
        windows = _feasible(lo, hi, r)
        new = _dp_windows(sub, r, windows)[1:-1]
        lo = np.array([w[0] for w in windows])
        hi = np.array([w[1] for w in windows])
        at_edge = ((new == lo) & (lo > j)) | ((new == hi) & (hi < r - (k - j)))
        if not at_edge.any() or np.array_equal(new, pos):
            return new
        pos = new
    return pos  # pragma: no cover


def _optimal_cuts(values: np.ndarray, weights, k: int, exact_points: int, radius: int = 0) -> tuple[_Prefix, np.ndarray]:
    """Cuts (indices into the merged sorted points, 0 and m included) of the optimal k-partition.

    Above ``exact_points`` points, three stages:

    1. a coarse grid of runs, each with a sum of squares below a threshold set from an upper
       bound of the optimum (heavy tails are resolved point by point) and at most
       ``m / COARSE_RUNS`` points; the exact programme over the runs;
    2. a finer grid (runs of at most ``m / (k * BAND_RUNS)`` points) on which every boundary
       may move anywhere between its neighbours (a band of two clusters), repeated until no
       boundary is on the edge of its band: this settles how many clusters each region gets;
    3. full resolution, each boundary within ``radius`` runs of the finer grid.
    """
    m = values.size
    pre = _Prefix(values, weights)
    if m <= exact_points:
        return pre, _dp_exact(pre, m, k)
    radius = radius or RADIUS
    gmax = max(1, math.ceil(m / COARSE_RUNS))
    # an upper bound of the optimum (Lloyd's iterations) sets the runs' sum-of-squares threshold
    _, lloyd = _lloyd_cuts(values, weights, k, pre=pre, max_iter=50)
    upper = float(pre.cost(lloyd[:-1], lloyd[1:]).sum())
    for _ in range(6):
        tau = upper / (k * COARSE_RUNS / 8)
        cuts = _split_runs(pre, np.array([0, m]), tau, gmax)
        coarse = cuts[_dp_exact(_subset(pre, cuts), cuts.size - 1, k)]
        cost = float(pre.cost(coarse[:-1], coarse[1:]).sum())
        if cost >= upper / 2:  # the threshold was set from a bound within 2x of this solution
            break
        upper = cost
    g1 = max(1, m // (k * BAND_RUNS))
    if g1 < gmax:
        cuts = _split_runs(pre, cuts, tau / 64, g1)
    bound = _band(pre, m, k, cuts, np.searchsorted(cuts, coarse[1:-1]))
    ci = bound if cuts.size - 1 == m else None
    if ci is None:
        bound = cuts[bound]
        return pre, np.concatenate(([0], _refine(pre, m, k, cuts, np.searchsorted(cuts, bound), radius), [m]))
    return pre, np.concatenate(([0], bound, [m]))


# ---- Lloyd on sorted values ------------------------------------------------------------------
def _lloyd_cuts(values: np.ndarray, weights, k: int, init: np.ndarray | None = None,
                max_iter: int = 300, pre: _Prefix | None = None) -> tuple[_Prefix, np.ndarray]:
    m = values.size
    pre = pre if pre is not None else _Prefix(values, weights)
    if init is None:
        q = (np.arange(k) + 0.5) / k * pre.p0[-1]
        pos = np.minimum(np.searchsorted(pre.p0[1:], q, side="left"), m - 1)
        c = np.unique(values[pos])
    else:
        c = np.unique(np.asarray(init, dtype=np.float64))
    cuts = None
    for _ in range(max_iter):
        mid = (c[1:] + c[:-1]) / 2
        inner = np.searchsorted(values, mid, side="right")
        new = np.concatenate(([0], inner, [m]))
        new = np.unique(new)  # drop empty clusters
        if cuts is not None and np.array_equal(new, cuts):
            break
        cuts = new
        c = pre.means(cuts)
    return pre, cuts


# ---- public API ------------------------------------------------------------------------------
def kmeans1d(x, k: int, weights=None, method: str = "optimal"):
    """One-dimensional k-means: sorted centroids and an int64 label per value.

    ``method="optimal"`` minimises the (optionally weighted) within-cluster sum of squares:
    exactly up to :data:`EXACT_POINTS` distinct values (a monotone dynamic programme over
    the sorted values, solved by vectorised divide and conquer); above that, coarse to fine:
    the exact optimum among all partitions whose boundaries lie within wide windows of the
    result (see :mod:`paramshare.cluster.kmeans`), which matched the exact optimum to 1e-6
    or better on every benchmark and test input. It is deterministic. ``method="lloyd"``
    runs Lloyd's iterations from weighted quantiles: faster, a local optimum only.

    Args:
        x: a tensor or array of real numbers, any shape (flattened for clustering).
        k: the number of clusters, >= 1. When ``x`` has fewer than ``k`` distinct values,
            each distinct value is its own cluster and the remaining centroids repeat the
            largest value (empty clusters; no label points at them).
        weights: optional non-negative weights, one per value (same number of elements):
            the objective becomes ``sum(w * (x - centroid)**2)``. A value of weight zero is
            labelled with its nearest centroid but does not move it.
        method: ``"optimal"`` or ``"lloyd"``.

    Returns:
        ``(centroids, labels)``: ``centroids`` of shape ``(k,)``, non-decreasing, each the
        (weighted) mean of its cluster, in ``x``'s floating dtype (float64 for integer
        input); ``labels`` int64 with ``x``'s shape, the index of each value's centroid
        (also its nearest one). Tensors for tensor input (on ``x``'s device), numpy arrays
        otherwise.

    Raises:
        SharingError: empty input, NaN or inf (the first offending index is named), ``k``
            not a positive integer, weights of another size, negative, non-finite or all
            zero, an unknown method.

    Example:
        >>> import torch, paramshare as ps
        >>> c, labels = ps.kmeans1d(torch.tensor([0.0, 0.5, 1.0, 8.0, 9.0]), 2)
        >>> c.tolist(), labels.tolist()
        ([0.5, 8.5], [0, 0, 0, 1, 1])
    """
    return _kmeans1d(x, k, weights, method, EXACT_POINTS)


def _kmeans1d(x, k, weights, method, exact_points, init=None):
    if method not in _METHODS:
        raise SharingError(f"unknown method {method!r}; choose 'optimal' (exact) or 'lloyd' (fast heuristic)")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SharingError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    is_tensor = isinstance(x, torch.Tensor)
    a = _as_numpy(x, "x")
    if a.size == 0:
        raise SharingError("cannot cluster an empty input: x has no values")
    _check_finite(a, "x")
    shape = tuple(x.shape) if is_tensor else np.shape(x)
    if weights is not None:
        w = _as_numpy(weights, "weights").astype(np.float64, copy=False)
        if w.size != a.size:
            raise SharingError(f"weights has {w.size} values but x has {a.size}; give one weight per value")
        _check_finite(w, "weights")
        if (w < 0).any():
            i = int(np.flatnonzero(w < 0)[0])
            raise SharingError(f"weights must be non-negative; weights at flat index {i} is {w[i]}")
        if not (w > 0).any():
            raise SharingError("weights are all zero; at least one value needs a positive weight")
    else:
        w = None
    centroids = _fit(a, w, k, method, exact_points, init)
    labels = _nearest(a, centroids)
    if is_tensor:
        dtype = x.dtype if x.dtype.is_floating_point else torch.float64
        return (
            torch.from_numpy(centroids).to(device=x.device, dtype=dtype),
            torch.from_numpy(labels).reshape(shape).to(x.device),
        )
    dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float64
    return centroids.astype(dtype), labels.reshape(shape)


def _fit(a: np.ndarray, w: np.ndarray | None, k: int, method: str, exact_points: int, init=None) -> np.ndarray:
    """Float64 centroids of shape (k,), sorted (padded with the largest value when needed)."""
    if w is None:
        s = np.sort(a)
        keep = np.empty(s.size, dtype=bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        if keep.all():
            values, weights = s.astype(np.float64), None
        else:
            starts = np.flatnonzero(keep)
            values = s[starts].astype(np.float64)
            weights = np.diff(np.append(starts, s.size)).astype(np.float64)
    else:
        pos = w > 0
        av, wv = a[pos], w[pos]
        order = _argsort(av)
        s, ws = av[order].astype(np.float64, copy=False), wv[order]
        keep = np.empty(s.size, dtype=bool)
        keep[0] = True
        np.not_equal(s[1:], s[:-1], out=keep[1:])
        starts = np.flatnonzero(keep)
        values = s[starts]
        weights = np.add.reduceat(ws, starts)
    m = values.size
    if m <= k:
        return np.concatenate((values, np.full(k - m, values[-1])))
    if method == "optimal":
        pre, cuts = _optimal_cuts(values, weights, k, exact_points)
    else:
        pre, cuts = _lloyd_cuts(values, weights, k, init)
    c = pre.means(cuts)
    if c.size < k:  # Lloyd may lose clusters
        c = np.concatenate((c, np.full(k - c.size, c[-1])))
    return c


def _fit_binned(a: np.ndarray, w: np.ndarray, k: int, bins: int = BINS) -> np.ndarray:
    """Weighted optimal centroids among partitions that do not split one of ``bins`` equal-width
    bins of the value range: the exact programme over the bins' weighted means.

    With each bin represented by its weighted mean the weighted sum of squares splits into the
    within-bin part, which no such partition changes, and the bins' part, which the programme
    minimises; a bin is 1/``bins`` of the range wide. For importances estimated from
    calibration data (``cluster(data=...)``), where the weights are themselves estimates, this
    costs a few milliseconds instead of a sort of every weight. Small inputs (at most four
    values per bin on average) are fitted exactly.
    """
    pos = w > 0
    if np.count_nonzero(pos) <= 4 * bins:
        return _fit(a, w, k, "optimal", EXACT_POINTS)
    av = a[pos].astype(np.float64)
    wv = w[pos].astype(np.float64, copy=False)
    lo, hi = float(av.min()), float(av.max())
    if not hi > lo:
        return np.full(k, lo)
    idx = ((av - lo) * (bins / (hi - lo))).astype(np.int64)
    np.minimum(idx, bins - 1, out=idx)
    sw = np.bincount(idx, wv, bins)
    sx = np.bincount(idx, wv * av, bins)
    nz = sw > 0
    means = np.clip(sx[nz] / sw[nz], lo, hi)  # rounding must not leave the range
    return _fit(means, sw[nz], k, "optimal", EXACT_POINTS)


def _argsort(a: np.ndarray) -> np.ndarray:
    """A stable argsort; for float32 one sort of 64-bit keys (order-preserving value bits, then
    the index), which numpy's vectorised integer sort does several times faster than argsort."""
    if a.dtype == np.float32 and a.size < 2**32:
        keys = _keys32(a).astype(np.uint64) << np.uint64(32)
        keys |= np.arange(a.size, dtype=np.uint64)
        keys.sort()
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return np.argsort(a, kind="stable")


def _nearest(a: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted centroids (the lower one on an exact tie).

    A value ``x`` belongs above the midpoint ``mid`` between two distinct centroids when
    ``x > mid``. For float32 input the midpoints become float32 thresholds ``t`` (the
    smallest float32 above ``mid``, so ``x >= t`` exactly when ``x > mid``) and the search
    runs on order-preserving integer keys through a 65536-entry lookup table of their top
    16 bits; only values whose table bucket holds a threshold are searched one by one.
    """
    firsts = np.concatenate(([0], np.flatnonzero(np.diff(centroids) > 0) + 1))
    c = centroids[firsts]
    if c.size == 1:
        return np.zeros(a.size, dtype=np.int64)
    mid = (c[1:] + c[:-1]) / 2
    if a.dtype != np.float32:
        idx = np.searchsorted(mid, a.astype(np.float64, copy=False), side="right")
        return firsts[idx].astype(np.int64)
    t = mid.astype(np.float32)
    low = t.astype(np.float64) <= mid
    t[low] = np.nextafter(t[low], np.float32(np.inf))
    t[t == 0] = np.float32(-0.0)  # -0.0 and 0.0 are equal: take the lower key
    tk = _keys32(t)
    lut_lo = np.searchsorted(tk, np.arange(65536, dtype=np.uint64) << np.uint64(16), side="right")
    lut_hi = np.searchsorted(tk, (np.arange(65536, dtype=np.uint64) << np.uint64(16)) | np.uint64(0xFFFF), side="right")
    table = np.full(65536, -1, dtype=np.int64)
    same = lut_lo == lut_hi  # no threshold inside the bucket: one label for all of it
    table[same] = firsts[lut_lo[same]]
    keys = _keys32(a)
    out = table[keys >> np.uint32(16)]
    amb = np.flatnonzero(out < 0)
    if amb.size:
        out[amb] = firsts[np.searchsorted(tk, keys[amb], side="right")]
    return out


def _keys32(a: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (for finite values)."""
    u = np.ascontiguousarray(a).view(np.uint32)
    mask = np.right_shift(u.view(np.int32), 31).view(np.uint32)  # all ones for negatives
    mask |= np.uint32(0x80000000)
    mask ^= u
    return mask


def sse(x, centroids, labels, weights=None) -> float:
    """The (weighted) within-cluster sum of squares of a labelling, in float64.

    Args:
        x: the values (tensor or array).
        centroids: one value per cluster.
        labels: the cluster of each value (same number of elements as ``x``).
        weights: optional weight per value.

    Returns:
        ``sum(w * (x - centroids[labels])**2)`` as a Python float.

    Example:
        >>> import numpy as np
        >>> sse(np.array([0.0, 1.0, 5.0]), np.array([0.5, 5.0]), np.array([0, 0, 1]))
        0.5
    """
    a = _as_numpy(x, "x").astype(np.float64)
    c = _as_numpy(centroids, "centroids").astype(np.float64)
    lab = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    d = a - c[lab.reshape(-1)]
    if weights is None:
        return float(np.dot(d, d))
    w = _as_numpy(weights, "weights").astype(np.float64)
    return float(np.dot(w * d, d))
