"""Optimal 1-D k-means: exact against brute force and ckwrap, the coarse-to-fine path against
the full programme, Lloyd, weights, input types, bad input; bit packing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import paramshare as ps
from paramshare.cluster import bits_for, kmeans1d, pack_bits, packed_size, sse, unpack_bits
from paramshare.cluster import kmeans as K


def brute_force(x: np.ndarray, k: int, w: np.ndarray | None = None) -> float:
    """Minimum (weighted) SSE over every partition of the sorted distinct values into <= k runs."""
    w = np.ones_like(x) if w is None else w
    keep = w > 0
    x, w = x[keep], w[keep]
    u = np.unique(x)
    if u.size <= k:
        return 0.0
    best = np.inf
    for cuts in itertools.combinations(range(1, u.size), k - 1):
        edges = [u[0] - 1, *[(u[c - 1] + u[c]) / 2 for c in cuts], u[-1] + 1]
        lab = np.searchsorted(edges, x) - 1
        total = 0.0
        for j in range(k):
            sel = lab == j
            if sel.any():
                m = np.average(x[sel], weights=w[sel])
                total += float(np.sum(w[sel] * (x[sel] - m) ** 2))
        best = min(best, total)
    return best


small_values = st.lists(st.sampled_from([-3.0, -1.5, -1.0, -0.25, 0.0, 0.5, 0.75, 2.0, 2.5, 7.0]), min_size=1, max_size=11)


@settings(max_examples=150, deadline=None)
@given(small_values, st.integers(1, 5), st.booleans(), st.data())
def test_optimal_equals_brute_force(values, k, weighted, data):
    x = np.array(values)
    w = None
    if weighted:
        w = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=x.size, max_size=x.size)))
        if not (w > 0).any():
            w[0] = 1.0
    c, labels = kmeans1d(x, k, weights=w)
    got = sse(x, c, labels, w)
    want = brute_force(x, k, w)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    # sorted centroids, int64 labels of x's shape, each value's centroid is a nearest one
    assert c.shape == (k,) and np.all(np.diff(c) >= 0)
    assert labels.dtype == np.int64 and labels.shape == x.shape
    d = np.abs(x[:, None] - c[None, :])
    assert np.allclose(d[np.arange(x.size), labels], d.min(1))
    # negative: with k >= 2 clusters and more distinct values, one cluster is strictly worse
    if np.unique(x[(w if w is not None else np.ones_like(x)) > 0]).size > k >= 2:
        mean = np.average(x, weights=w)
        assert sse(x, np.array([mean]), np.zeros(x.size, dtype=np.int64), w) > got


def _gen(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    return {
        "t3": lambda: rng.standard_t(3, n),
        "cauchy": lambda: rng.standard_t(1, n),
        "uniform": lambda: rng.uniform(size=n),
        "mixture": lambda: np.concatenate([rng.normal(c, 0.05, n // 4) for c in range(4)]),
        "rounded": lambda: np.round(rng.normal(size=n), 2),
        "laplace": lambda: rng.laplace(size=n),
    }[name]().astype(np.float32)


@pytest.mark.parametrize("name", ["t3", "cauchy", "uniform", "mixture", "rounded", "laplace"])
def test_coarse_to_fine_equals_full_programme(name):
    """Forcing the coarse-to-fine path (exact_points=200) gives the full programme's optimum."""
    rng = np.random.default_rng(7)
    x = _gen(name, 6000, rng)
    for k in (2, 5, 16):
        c1, l1 = K._kmeans1d(x, k, None, "optimal", 200)
        c2, l2 = K._kmeans1d(x, k, None, "optimal", 10**9)
        s1, s2 = sse(x, c1, l1), sse(x, c2, l2)
        assert s1 == pytest.approx(s2, rel=1e-12, abs=1e-12), (name, k)
        lloyd = kmeans1d(x, k, method="lloyd")
        assert sse(x, *lloyd) >= s2 * (1 - 1e-12)  # negative: the heuristic is never better


def test_against_ckwrap():
    ckwrap = pytest.importorskip("ckwrap")
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, 20000) * 0.02).astype(np.float32)
    for k in (3, 16):
        r = ckwrap.ckmeans(x.astype(np.float64), k)
        lab = np.asarray(r.labels)
        cent = np.bincount(lab, weights=x.astype(np.float64), minlength=k) / np.bincount(lab, minlength=k)
        ref = sse(x, cent, lab)
        c, labels = kmeans1d(x, k)
        assert sse(x, c, labels) == pytest.approx(ref, rel=1e-9)
        assert sse(x, c, labels) <= ref * (1 + 1e-12)


def test_large_input_takes_the_fast_path_and_stays_exact():
    rng = np.random.default_rng(3)
    x = torch.from_numpy((rng.standard_t(3, 60000) * 0.02).astype(np.float32))
    c, labels = ps.kmeans1d(x, 8)
    c_full, l_full = K._kmeans1d(x, 8, None, "optimal", 10**9)
    assert sse(x, c, labels) == pytest.approx(sse(x, c_full, l_full), rel=1e-12)
    # centroids are the means of their clusters
    xd = x.double()
    for j in range(8):
        assert c[j].item() == pytest.approx(xd[labels == j].mean().item(), rel=1e-6)


def _weighted_sse(x, w, c):
    lab = K._nearest(x, c)
    return float((w * (x.astype(np.float64) - c[lab]) ** 2).sum())


def test_binned_weighted_fit_is_within_the_bin_resolution_of_the_optimum():
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, 400_000) * 0.02).astype(np.float32)  # heavy tails, like trained weights
    w = np.repeat(rng.gamma(2.0, 1.0, 400), 1000)  # per-column importances
    best = K._fit(x, w, 16, "optimal", K.EXACT_POINTS)
    binned = K._fit_binned(x, w, 16)
    assert np.all(np.diff(binned) >= 0) and binned.min() >= x.min() and binned.max() <= x.max()
    opt, got = _weighted_sse(x, w, best), _weighted_sse(x, w, binned)
    assert opt <= got * (1 + 1e-12)
    assert got <= opt * (1 + 1e-3)  # bins of 1/32768 of the range
    coarse = K._fit_binned(x, w, 16, bins=64)  # and the resolution is what limits it
    assert _weighted_sse(x, w, coarse) > got


def test_binned_weighted_fit_is_exact_on_small_and_degenerate_inputs():
    rng = np.random.default_rng(6)
    x = rng.normal(size=5000).astype(np.float32)
    w = rng.uniform(0.1, 2.0, 5000)
    np.testing.assert_array_equal(K._fit_binned(x, w, 8), K._fit(x, w, 8, "optimal", K.EXACT_POINTS))
    big = np.full(300_000, 0.25, dtype=np.float32)
    np.testing.assert_array_equal(K._fit_binned(big, np.ones(300_000), 4), np.full(4, 0.25))
    two = np.repeat(np.array([-1.0, 3.0], dtype=np.float32), 150_000)
    c = K._fit_binned(two, np.ones(300_000), 4)
    assert set(np.round(c, 6)) == {-1.0, 3.0}


def test_weights_equal_repetition_and_uniform_weights_change_nothing():
    rng = np.random.default_rng(1)
    x = rng.normal(size=300)
    reps = rng.integers(1, 4, size=300)
    c_w, _ = kmeans1d(x, 4, weights=reps.astype(float))
    c_r, _ = kmeans1d(np.repeat(x, reps), 4)
    np.testing.assert_allclose(c_w, c_r, rtol=1e-12)
    c_1, l_1 = kmeans1d(x, 4, weights=np.full(300, 2.5))
    c_0, l_0 = kmeans1d(x, 4)
    np.testing.assert_allclose(c_1, c_0, rtol=1e-12)
    assert np.array_equal(l_1, l_0)
    # negative: weighting one value heavily pulls a centroid onto it
    w = np.ones(300)
    w[0] = 1e6
    c_h, l_h = kmeans1d(x, 4, weights=w)
    assert abs(c_h[l_h[0]] - x[0]) < 1e-3 < np.abs(c_0 - x[0]).min()


def test_zero_weight_values_are_labelled_but_do_not_move_centroids():
    x = np.array([0.0, 0.1, 0.2, 10.0, 10.1, 100.0])
    w = np.array([1, 1, 1, 1, 1, 0.0])
    c, labels = kmeans1d(x, 2, weights=w)
    np.testing.assert_allclose(c, [0.1, 10.05])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_fewer_distinct_values_than_k():
    x = torch.tensor([[3.0, 1.0], [3.0, 1.0]])
    c, labels = ps.kmeans1d(x, 5)
    assert c.tolist() == [1.0, 3.0, 3.0, 3.0, 3.0]
    assert labels.tolist() == [[1, 0], [1, 0]]
    assert sse(x, c, labels) == 0.0


def test_types_devices_dtypes_and_determinism():
    x = torch.randn(40, 30, dtype=torch.float64)
    c, labels = ps.kmeans1d(x, 6)
    assert c.dtype == torch.float64 and labels.dtype == torch.int64 and labels.shape == x.shape
    c2, l2 = ps.kmeans1d(x, 6)
    assert torch.equal(c, c2) and torch.equal(labels, l2)
    ch, lh = ps.kmeans1d(x.half(), 6)
    assert ch.dtype == torch.float16
    ci, li = ps.kmeans1d(np.arange(20), 2)
    assert ci.dtype == np.float64 and ci.tolist() == [4.5, 14.5]
    cb, lb = ps.kmeans1d(x.float().numpy(), 6)
    assert isinstance(cb, np.ndarray) and cb.dtype == np.float32
    # float32 labels from the lookup-table path agree with a float64 nearest-centroid search
    x32 = torch.randn(100000).numpy() * 3
    cc, ll = kmeans1d(x32, 16)
    mid = (cc.astype(np.float64)[1:] + cc.astype(np.float64)[:-1]) / 2
    assert np.array_equal(ll, np.searchsorted(mid, x32.astype(np.float64), side="left"))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.array([]), 2), {}, "empty"),
        ((np.array([1.0, np.nan, 2.0]), 2), {}, "non-finite.*flat index 1"),
        ((torch.tensor([1.0, float("inf")]), 2), {}, "non-finite"),
        ((np.ones(4), 0), {}, "positive integer"),
        ((np.ones(4), True), {}, "positive integer"),
        ((np.ones(4), 2.0), {}, "positive integer"),
        ((np.ones(4), 2), {"weights": np.ones(3)}, "3 values but x has 4"),
        ((np.ones(4), 2), {"weights": np.array([1, -1, 1, 1.0])}, "non-negative"),
        ((np.ones(4), 2), {"weights": np.zeros(4)}, "all zero"),
        ((np.ones(4), 2), {"method": "fast"}, "unknown method"),
        ((["a", "b"], 2), {}, "real numbers"),
        ((torch.ones(3, dtype=torch.complex64), 2), {}, "real"),
    ],
)
def test_bad_input(args, kwargs, match):
    with pytest.raises(ps.SharingError, match=match):
        kmeans1d(*args, **kwargs)


# ---- bit packing -------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 1, 2, 3, 4, 5, 7, 8, 9, 12, 16])
def test_pack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    for n in (0, 1, 7, 8, 1001):
        v = torch.randint(0, 1 << bits, (n,), generator=g) if bits else torch.zeros(n, dtype=torch.long)
        p = pack_bits(v, bits)
        assert p.dtype == torch.uint8 and p.numel() == packed_size(n, bits) == -(-n * bits // 8)
        assert torch.equal(unpack_bits(p, bits, n), v)


def test_pack_layout_is_little_endian_and_checked():
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_bits(torch.tensor([5, 3]), 3).tolist() == [5 | 3 << 3]
    assert [bits_for(k) for k in (1, 2, 3, 4, 5, 16, 17, 65536)] == [0, 1, 2, 2, 3, 4, 5, 16]
    with pytest.raises(ps.SharingError, match="cannot pack 4 in 2 bits"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(ps.SharingError, match="integer tensor"):
        pack_bits(torch.tensor([1.0]), 2)
    with pytest.raises(ps.SharingError, match="need 2"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 4)
    with pytest.raises(ps.SharingError, match="1-D uint8"):
        unpack_bits(torch.zeros(2, dtype=torch.int16), 4, 4)
