"""OWL weights, the exact OWL prox, GrOWL, growl_tie and the rows kind, owl_regression."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.cluster.bits import unpack_bits
from paramshare.growl import _pav_clip

from conftest import assert_unchanged, snapshot

RNG = np.random.default_rng(1234)


# ---- owl_weights ----------------------------------------------------------------------------------
def test_owl_weights_families_match_their_closed_forms():
    assert ps.owl_weights(4, "oscar", 1.0, 0.5).tolist() == [2.5, 2.0, 1.5, 1.0]
    assert ps.owl_weights(5, "linear", 1.0, 2.0).tolist() == [3.0, 2.5, 2.0, 1.5, 1.0]
    assert ps.owl_weights(1, "linear", 1.0, 2.0).tolist() == [3.0]
    assert ps.owl_weights(3, "spike", 1.0, 2.0).tolist() == [3.0, 1.0, 1.0]
    assert ps.owl_weights(3, "oscar", 0.7, 0.0).tolist() == [0.7, 0.7, 0.7]  # lambda2 = 0: the Lasso
    w = ps.owl_weights(6, "oscar", 0.1, 0.2, dtype=torch.float32)
    assert w.dtype == torch.float32 and bool((w[:-1] >= w[1:]).all())


@pytest.mark.parametrize(
    "args, match",
    [
        ((3, "oscar", -1.0, 0.0), "lambda1"),
        ((3, "oscar", 1.0, -0.1), "lambda2"),
        ((3, "oscar", float("nan"), 0.0), "lambda1"),
        ((3, "cubic", 1.0, 0.0), "unknown OWL weight kind"),
        ((0, "oscar", 1.0, 0.0), "positive integer"),
        ((2.5, "oscar", 1.0, 0.0), "positive integer"),
    ],
)
def test_owl_weights_bad_input(args, match):
    with pytest.raises(ps.SharingError, match=match):
        ps.owl_weights(*args)


def test_owl_norm_is_the_sorted_weighted_sum():
    v = torch.tensor([[1.0, -3.0, 2.0], [0.0, 0.0, -1.0]])
    w = torch.tensor([3.0, 2.0, 1.0])
    assert ps.owl_norm(v, w).tolist() == [3 * 3 + 2 * 2 + 1 * 1, 3.0]
    assert ps.owl_norm(v, torch.ones(3)).tolist() == [6.0, 1.0]  # equal weights: the L1 norm
    with pytest.raises(ps.SharingError, match="non-increasing"):
        ps.owl_norm(v, torch.tensor([1.0, 2.0, 3.0]))


# ---- prox_owl: closed forms and brute force --------------------------------------------------------
def _objective(x, v, w):
    return 0.5 * np.sum((x - v) ** 2) + np.sum(np.sort(np.abs(x))[::-1] * w)


def _random_weights(n, rng):
    w = np.sort(rng.uniform(0, 1.5, size=n))[::-1].copy()
    if rng.random() < 0.3:
        w[rng.integers(1, n):] = w[-1]  # runs of equal weights
    return w


def test_prox_with_equal_weights_is_soft_thresholding():
    v = torch.randn(50, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    lam = 0.8
    want = torch.sign(v) * (v.abs() - lam).clamp_min(0)
    got = ps.prox_owl(v, torch.full((9,), lam, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # negative: OSCAR weights do not soft-threshold
    assert not torch.allclose(ps.prox_owl(v, ps.owl_weights(9, "oscar", lam, 0.3)), want)


def _project_l1_ball(v, radius):
    """Euclidean projection onto {x : ||x||_1 <= radius} (Duchi et al. 2008)."""
    if np.abs(v).sum() <= radius:
        return v.copy()
    u = np.sort(np.abs(v))[::-1]
    css = np.cumsum(u)
    k = np.nonzero(u * np.arange(1, len(u) + 1) > (css - radius))[0][-1]
    theta = (css[k] - radius) / (k + 1.0)
    return np.sign(v) * np.maximum(np.abs(v) - theta, 0)


def test_prox_with_a_single_weight_is_the_linf_prox():
    # w = (lam, 0, ..., 0): OWL is lam * ||x||_inf, whose prox is v - P_{||.||_1 <= lam}(v) (Moreau)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        v = rng.normal(size=7) * 2
        lam = rng.uniform(0.1, 6.0)
        w = np.zeros(7)
        w[0] = lam
        want = v - _project_l1_ball(v, lam)
        np.testing.assert_allclose(ps.prox_owl(torch.tensor(v), torch.tensor(w)).numpy(), want, atol=1e-12)


def test_prox_matches_a_fine_grid_in_two_dimensions():
    grid = np.arange(-3.0, 3.0 + 1e-9, 0.004)
    X1, X2 = np.meshgrid(grid, grid, indexing="ij")
    a, b = np.abs(X1), np.abs(X2)
    hi, lo = np.maximum(a, b), np.minimum(a, b)
    for v, w in [((2.0, 1.9), (1.2, 0.4)), ((2.5, -0.3), (0.5, 0.5)), ((-1.0, 1.4), (2.0, 0.1)), ((0.4, 0.2), (1.0, 0.9))]:
        obj = 0.5 * ((X1 - v[0]) ** 2 + (X2 - v[1]) ** 2) + w[0] * hi + w[1] * lo
        i, j = np.unravel_index(np.argmin(obj), obj.shape)
        got = ps.prox_owl(torch.tensor(v, dtype=torch.float64), torch.tensor(w, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, [grid[i], grid[j]], atol=0.004)
        # and the prox is at least as good as the best grid point
        assert _objective(got, np.array(v), np.array(w)) <= obj[i, j] + 1e-12


def test_prox_matches_scipy_on_small_vectors():
    from scipy.optimize import minimize

    # epigraph form: min 0.5||x - v||^2 + t  s.t.  t >= sum_i w_i a_sigma(i) for every permutation,
    # a >= x, a >= -x (the OWL norm is the max over permutations of sum w_i |x_sigma(i)|)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        n = 3 if seed % 2 else 4
        v = rng.normal(size=n) * 2
        if seed % 3 == 0:
            v[1] = -v[0] * 0.97  # nearly equal magnitudes: OSCAR ties them
        w = _random_weights(n, rng)
        perms = list(itertools.permutations(range(n)))
        cons = [{"type": "ineq", "fun": lambda z, s=s: z[-1] - sum(w[i] * z[n + s[i]] for i in range(n))} for s in perms]
        cons.append({"type": "ineq", "fun": lambda z: z[n:2 * n] - z[:n]})
        cons.append({"type": "ineq", "fun": lambda z: z[n:2 * n] + z[:n]})
        z0 = np.concatenate([v, np.abs(v), [np.sum(w * np.sort(np.abs(v))[::-1])]])
        res = minimize(
            lambda z: 0.5 * np.sum((z[:n] - v) ** 2) + z[-1], z0, constraints=cons, method="SLSQP",
            options={"ftol": 1e-14, "maxiter": 1000},
        )
        assert res.success, res.message
        got = ps.prox_owl(torch.tensor(v), torch.tensor(w)).numpy()
        np.testing.assert_allclose(got, res.x[:n], atol=2e-5)
        assert _objective(got, v, w) <= _objective(res.x[:n], v, w) + 1e-10


def test_pav_pools_violators_and_clips():
    assert _pav_clip([3.0, 2.0, 1.0]) == [3.0, 2.0, 1.0]  # already non-increasing
    assert _pav_clip([1.0, 3.0]) == [2.0, 2.0]
    assert _pav_clip([1.0, 2.0, 3.0, 4.0]) == [2.5] * 4  # every block pooled
    assert _pav_clip([-1.0, -3.0]) == [0.0, 0.0]
    assert _pav_clip([5.0, -1.0, 0.5]) == [5.0, 0.0, 0.0]  # pooled to -0.25, then clipped


# ---- prox_owl: properties --------------------------------------------------------------------------
def _vw(seed, n=12, batch=()):
    rng = np.random.default_rng(seed)
    v = torch.tensor(rng.normal(size=(*batch, n)) * 2)
    w = torch.tensor(_random_weights(n, rng))
    return v, w


def test_prox_is_sign_and_permutation_equivariant():
    for seed in range(10):
        v, w = _vw(seed)
        x = ps.prox_owl(v, w)
        signs = torch.tensor(np.random.default_rng(seed).choice([-1.0, 1.0], size=v.shape[-1]))
        torch.testing.assert_close(ps.prox_owl(v * signs, w), x * signs, rtol=0, atol=1e-12)
        perm = torch.randperm(v.shape[-1], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(ps.prox_owl(v[perm], w), x[perm], rtol=0, atol=1e-12)
        assert not torch.allclose(ps.prox_owl(v[perm], w), x)  # negative: the output moves with the input


def test_prox_is_non_expansive():
    for seed in range(30):
        a, w = _vw(seed)
        b = a + torch.tensor(np.random.default_rng(seed + 99).normal(size=a.shape)) * (0.01 if seed % 2 else 2.0)
        d_out = torch.linalg.vector_norm(ps.prox_owl(a, w) - ps.prox_owl(b, w))
        assert d_out <= torch.linalg.vector_norm(a - b) + 1e-12


def test_prox_fixed_points_and_the_idempotent_residual():
    v, w = _vw(3)
    zero = torch.zeros_like(v)
    assert torch.equal(ps.prox_owl(zero, w), zero)  # 0 is the fixed point of a norm's prox
    x = ps.prox_owl(v, w)
    assert not torch.allclose(ps.prox_owl(x, w), x)  # no other point is fixed: prox shrinks again
    assert torch.equal(ps.prox_owl(v, torch.zeros_like(w)), v)  # zero weights: every point is fixed
    # the residual v - prox(v) is the projection onto the dual ball, so it is idempotent:
    # its prox is 0 and it is its own residual
    r = v - x
    torch.testing.assert_close(ps.prox_owl(r, w), zero, rtol=0, atol=1e-12)
    torch.testing.assert_close(r - ps.prox_owl(r, w), r, rtol=0, atol=1e-12)
    assert not torch.equal(ps.prox_owl(v, w), zero)  # negative: v itself is outside the dual ball


def test_prox_keeps_the_order_of_magnitudes_and_ties_equal_ones():
    v = torch.tensor([0.5, -2.0, 2.0, 1.0, -0.1], dtype=torch.float64)
    x = ps.prox_owl(v, ps.owl_weights(5, "oscar", 0.1, 0.2))
    assert x[1] == -x[2]  # equal magnitudes stay equal
    order_v = np.argsort(-np.abs(v.numpy()), kind="stable")
    assert bool((np.diff(np.abs(x.numpy())[order_v]) <= 1e-15).all())


def test_prox_is_batched_over_leading_dimensions():
    v, w = _vw(7, n=10, batch=(3, 4))
    got = ps.prox_owl(v, w)
    assert got.shape == v.shape
    for i, j in itertools.product(range(3), range(4)):
        torch.testing.assert_close(got[i, j], ps.prox_owl(v[i, j], w), rtol=0, atol=0)
    # per-vector weights
    W = torch.stack([w, w * 0.5, w * 2])
    per = ps.prox_owl(v[:, 0], W)
    for i in range(3):
        torch.testing.assert_close(per[i], ps.prox_owl(v[i, 0], W[i]), rtol=0, atol=0)


def test_prox_keeps_dtype_and_takes_arrays():
    v32 = torch.tensor([3.0, -2.9, 0.1])
    out = ps.prox_owl(v32, ps.owl_weights(3, "oscar", 0.1, 0.5))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([2.1, -2.1, 0.0]))
    arr = ps.prox_owl(np.array([3.0, -2.9, 0.1]), [0.6, 0.6, 0.6])
    assert isinstance(arr, torch.Tensor) and arr.dtype == torch.float64
    assert ps.prox_owl(torch.empty(0, 3), torch.ones(3)).shape == (0, 3)


def test_prox_on_a_long_vector_with_many_violations():
    # an increasing z makes pool-adjacent-violators merge everything: the answer is the mean
    n = 20000
    v = torch.linspace(1.0, 2.0, n, dtype=torch.float64)
    w = torch.linspace(2.5, 0.0, n, dtype=torch.float64)  # |v| sorted minus w is increasing
    x = ps.prox_owl(v, w)
    want = float((v.flip(0) - w).mean())
    assert want > 0
    torch.testing.assert_close(x, torch.full_like(v, want), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.tensor([1.0, -0.5, -1.0]), "non-negative"),
        (torch.tensor([1.0, 2.0, 0.5]), r"non-increasing .*w\[0\] < w\[1\]"),
        (torch.tensor([1.0, 1.0]), "3 entries"),
        (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
    ],
)
def test_prox_bad_weights(w, match):
    with pytest.raises(ps.SharingError, match=match):
        ps.prox_owl(torch.tensor([1.0, 2.0, 3.0]), w)


def test_prox_bad_vectors():
    with pytest.raises(ps.SharingError, match="finite"):
        ps.prox_owl(torch.tensor([1.0, float("inf")]), torch.ones(2))
    with pytest.raises(ps.SharingError, match="scalar"):
        ps.prox_owl(torch.tensor(1.0), torch.ones(1))
    with pytest.raises(ps.SharingError, match="broadcast"):
        ps.prox_owl(torch.ones(4, 3), torch.ones(2, 3))


# ---- owl_regression --------------------------------------------------------------------------------
def _centred(X, y):
    return X - X.mean(0), y - y.mean()


def test_regression_with_lambda2_zero_is_sklearn_lasso():
    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(0)
    X, y = _centred(rng.normal(size=(60, 12)), rng.normal(size=60))
    y = y + X[:, :3] @ np.array([2.0, -1.0, 0.5])
    for alpha in (0.02, 0.1, 0.4):
        ref = Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=200000).fit(X, y).coef_
        got = ps.owl_regression(X, y, lambda1=alpha * len(y), lambda2=0.0, tol=1e-13)
        np.testing.assert_allclose(got, ref, atol=1e-6)
    # negative: OSCAR with lambda2 > 0 is a different estimator
    assert not np.allclose(ps.owl_regression(X, y, 0.1 * 60, 2.0), ref, atol=1e-3)


def test_regression_solution_is_a_fixed_point_of_the_prox_step():
    rng = np.random.default_rng(5)
    z = rng.normal(size=(80, 2))
    X = np.hstack([z[:, [0]] + 0.1 * rng.normal(size=(80, 4)), z[:, [1]] + 0.1 * rng.normal(size=(80, 3)), rng.normal(size=(80, 5))])
    X, y = _centred(X, X[:, :4].sum(1) - 0.5 * X[:, 4:7].sum(1) + 0.3 * rng.normal(size=80))
    for kind in ("oscar", "linear", "spike"):
        b = ps.owl_regression(torch.tensor(X), torch.tensor(y), 2.0, 0.4, kind, tol=1e-13)
        assert isinstance(b, torch.Tensor)
        w = ps.owl_weights(12, kind, 2.0, 0.4)
        L = float(np.linalg.eigvalsh(X.T @ X)[-1])
        step = b - torch.tensor(X.T @ (X @ b.numpy() - y)) / L
        torch.testing.assert_close(ps.prox_owl(step, w / L), b, rtol=0, atol=1e-7)


def test_oscar_ties_a_correlated_group_that_the_lasso_splits():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(100, 1))
    X = np.hstack([z + 0.1 * rng.normal(size=(100, 5)), rng.normal(size=(100, 5))])
    X, y = _centred(X, X[:, :5].sum(1) + 0.5 * rng.normal(size=100))
    oscar = ps.owl_regression(X, y, lambda1=4.0, lambda2=1.5)
    assert np.ptp(oscar[:5]) < 1e-6 and oscar[0] > 0.5  # one value for the group
    assert np.all(np.abs(oscar[5:]) < 1e-9)
    lasso = ps.owl_regression(X, y, lambda1=4.0, lambda2=0.0)
    assert np.ptp(lasso[:5]) > 0.1  # the Lasso spreads the group unevenly


def test_regression_bad_input():
    X, y = np.ones((5, 3)), np.ones(5)
    with pytest.raises(ps.SharingError, match="one value per row"):
        ps.owl_regression(X, np.ones(4), 1.0, 0.0)
    with pytest.raises(ps.SharingError, match="lambda2"):
        ps.owl_regression(X, y, 1.0, -1.0)
    with pytest.raises(ps.SharingError, match="matrix"):
        ps.owl_regression(np.ones(5), y, 1.0, 0.0)
    with pytest.raises(ps.SharingError, match="finite"):
        ps.owl_regression(np.full((5, 3), np.nan), y, 1.0, 0.0)
    with pytest.raises(ps.SharingError, match="unknown OWL weight kind"):
        ps.owl_regression(X, y, 1.0, 0.0, kind="ridge")


# ---- GrOWL ----------------------------------------------------------------------------------------
def test_growl_step_is_the_exact_group_prox():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(5, 8, dtype=torch.float64))
    before = W.detach().clone()
    reg = ps.GrOWL([W], lambda1=0.3, lambda2=0.1)
    reg.step(lr=0.5)
    norms = before.norm(dim=0)
    new = ps.prox_owl(norms, ps.owl_weights(8, "oscar", 0.3 * 0.5, 0.1 * 0.5))
    torch.testing.assert_close(W.detach(), before * (new / norms), rtol=0, atol=1e-12)
    assert reg.zero_slices() == [int((new == 0).sum())]
    # rows mode (dim=0) takes the norms of W[i, :] instead
    V = nn.Parameter(before.clone())
    ps.GrOWL([V], 0.3, 0.1, dim=0).step(lr=0.5)
    rnorms = before.norm(dim=1)
    rnew = ps.prox_owl(rnorms, ps.owl_weights(5, "oscar", 0.15, 0.05))
    torch.testing.assert_close(V.detach(), before * (rnew / rnorms).unsqueeze(1), rtol=0, atol=1e-12)


def test_growl_on_single_entry_slices_is_prox_owl():
    v = torch.tensor([[3.0, -2.9, 0.1, -1.0]], dtype=torch.float64)
    W = nn.Parameter(v.clone())
    ps.GrOWL([W], 0.2, 0.1, kind="linear").step(lr=1.0)
    torch.testing.assert_close(W.detach()[0], ps.prox_owl(v[0], ps.owl_weights(4, "linear", 0.2, 0.1)), rtol=0, atol=1e-12)


def test_growl_penalty_and_param_groups():
    a = nn.Parameter(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))  # column norms 5, 1
    b = nn.Parameter(torch.tensor([[1.0, 1.0, 1.0]]))  # column norms 1, 1, 1
    reg = ps.GrOWL([{"params": [a]}, {"params": [b], "lambda1": 2.0, "lambda2": 0.0}], lambda1=1.0, lambda2=1.0)
    assert reg.penalty() == pytest.approx((2 * 5 + 1 * 1) + 2.0 * 3)
    assert "lambda1=2" in repr(reg)


def _correlated_data(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g)
    x = torch.cat([z + 0.05 * torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)], 1)
    y = torch.cat([x[:, :3].sum(1, keepdim=True), -x[:, :3].sum(1, keepdim=True)], 1)
    return x, y


def _fit(lambda2, steps=400):
    x, y = _correlated_data()
    torch.manual_seed(1)
    lin = nn.Linear(6, 2, bias=False)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    reg = ps.GrOWL([lin.weight], lambda1=0.05, lambda2=lambda2)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lin(x) - y).square().sum(1).mean()).backward()
        opt.step()
        reg.step(lr=0.05)
    return lin, x, y


def test_growl_training_prunes_noise_inputs_and_equalises_correlated_ones():
    lin, x, y = _fit(lambda2=0.05)
    W = lin.weight.detach()
    assert bool((W[:, 3:] == 0).all())  # the noise inputs are pruned exactly
    norms = W[:, :3].norm(dim=0)
    assert float(norms.max() - norms.min()) < 1e-6  # OSCAR ties the correlated inputs' norms
    # growl_tie turns that into shared storage without changing the function much
    out = lin(x).detach()
    groups = ps.growl_tie(lin, threshold=0.99)
    assert [g.options["labels"] for g in groups] == [[0, 0, 0, -1, -1, -1]]
    assert ps.report(lin).unique_params == 2  # one shared column of 2 entries
    assert float((lin(x).detach() - out).abs().max()) < 0.05
    # negative: group Lasso (lambda2 = 0) also prunes the noise, but leaves the correlated norms apart
    glasso, _, _ = _fit(lambda2=0.0)
    gnorms = glasso.weight.detach()[:, :3].norm(dim=0)
    assert bool((glasso.weight.detach()[:, 3:] == 0).all())
    assert float(gnorms.max() - gnorms.min()) > 1e-3


def test_growl_works_after_adam():
    lin = nn.Linear(6, 2)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    reg = ps.GrOWL([lin.weight], lambda1=5.0, lambda2=0.5)
    x, y = _correlated_data(64)
    for _ in range(20):
        opt.zero_grad()
        (lin(x) - y).square().mean().backward()
        opt.step()
        reg.step(lr=1e-2)
    assert sum(reg.zero_slices()) > 0


def test_growl_bad_input():
    lin = nn.Linear(3, 2)
    with pytest.raises(ps.SharingError, match="matrices.*shape \\(2,\\)"):
        ps.GrOWL([lin.bias], 0.1, 0.1)
    with pytest.raises(ps.SharingError, match="lambda1"):
        ps.GrOWL([lin.weight], -0.1, 0.1)
    with pytest.raises(ps.SharingError, match="lambda2"):
        ps.GrOWL([{"params": [lin.weight], "lambda2": -1.0}], 0.1, 0.1)
    with pytest.raises(ps.SharingError, match="dim"):
        ps.GrOWL([lin.weight], 0.1, 0.1, dim=2)
    with pytest.raises(ps.SharingError, match="not a module"):
        ps.GrOWL(lin, 0.1, 0.1)
    with pytest.raises(ps.SharingError, match="no parameters"):
        ps.GrOWL([], 0.1, 0.1)
    with pytest.raises(ps.SharingError, match="twice"):
        ps.GrOWL([lin.weight, lin.weight], 0.1, 0.1)
    with pytest.raises(ps.SharingError, match="unknown keys"):
        ps.GrOWL([{"params": [lin.weight], "lr": 1.0}], 0.1, 0.1)
    reg = ps.GrOWL([lin.weight], 0.1, 0.1)
    before = lin.weight.detach().clone()
    for lr in (0, -1.0, float("nan")):
        with pytest.raises(ps.SharingError, match="lr"):
            reg.step(lr)
    assert torch.equal(lin.weight, before)


# ---- tie_rows, growl_tie and the rows kind ----------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))


def _trained_like(model):
    """Give the first layer what GrOWL training leaves: equal columns and zero columns."""
    with torch.no_grad():
        W = model[0].weight
        W[:, 1] = W[:, 0]
        W[:, 4] = W[:, 0] * 1.001
        W[:, 2] = 0
        W[:, 5] = W[:, 3] * 3.0  # same direction, three times the norm
    return model


def test_growl_tie_makes_real_ties_that_find_ties_and_report_see():
    m = _trained_like(_mlp())
    x = torch.randn(5, 6)
    before = m(x).detach()
    groups = ps.growl_tie(m, names=["0.weight"], threshold=0.99)
    assert len(groups) == 1
    g = groups[0]
    assert g.kind == "rows" and g.members == ("0.weight",) and g.source == "0.parametrizations.weight.original"
    assert g.options == {"dim": 1, "labels": [0, 0, -1, 1, 0, 1]} and g.shape == (2, 4)
    assert ps.find_ties(m) == groups
    # each tied column is the mean of its cluster: columns 3 and 5 (= 3 x column 3) both become 2 x column 3
    W0 = _trained_like(_mlp())[0].weight.detach()
    want = W0.clone()
    want[:, [0, 1, 4]] = W0[:, [0, 1, 4]].mean(1, keepdim=True)
    want[:, [3, 5]] = W0[:, [3, 5]].mean(1, keepdim=True)
    torch.testing.assert_close(m[0].weight, want, rtol=0, atol=1e-6)
    assert not torch.allclose(m(x), before)  # so the function changed where cosine tied unequal norms
    r = ps.report(m)
    assert r.unique_params == 2 * 4 + 4 + 3 * 4 + 3  # two shared columns of 4, the biases, layer 2
    assert r.total_params == ps.report(_mlp()).total_params
    row = r.rows[0]
    assert row.stats.used_numel == 24 and row.stats.stored_numel == 8
    assert row.stats.saved_bytes == 24 * 4 - 8 * 4 - 2  # six labels in 0..2 packed at 2 bits: 2 bytes
    assert "1 pruned" in row.stats.detail and "rows" in str(r)
    # the tied columns are one tensor's rows: exactly equal, pruned column exactly zero
    W = m[0].weight
    assert torch.equal(W[:, 0], W[:, 1]) and torch.equal(W[:, 0], W[:, 4]) and torch.equal(W[:, 2], torch.zeros(4))
    # negative: untouched weights are not tied
    assert not any("2.weight" in g.members for g in ps.find_ties(m))


def test_cosine_ties_parallel_slices_that_euclidean_keeps_apart():
    m = _trained_like(_mlp())
    cos = ps.growl_tie(m, ["0.weight"], threshold=0.99)[0].options["labels"]
    m2 = _trained_like(_mlp())
    euc = ps.growl_tie(m2, ["0.weight"], threshold=0.99, method="euclidean")[0].options["labels"]
    assert cos[3] == cos[5]  # W[:, 5] = 3 W[:, 3]: same direction
    assert euc[3] != euc[5]  # but three times the norm
    assert euc[0] == euc[1] == euc[4]


def test_growl_tie_leaves_alone_what_it_cannot_compress():
    m = _mlp()  # random weights: nothing zero, nothing similar at 0.999
    before = snapshot(m)
    assert ps.growl_tie(m, threshold=0.999) == []
    assert_unchanged(m, before)
    # names=None takes every plain matrix; biases are skipped
    m = _trained_like(_mlp())
    with torch.no_grad():
        m[2].weight[:, 0] = 0
    groups = ps.growl_tie(m)
    assert [g.members for g in groups] == [("0.weight",), ("2.weight",)]


def test_fine_tuning_moves_tied_slices_together_and_keeps_pruned_ones_zero():
    m = _trained_like(_mlp())
    ps.growl_tie(m, ["0.weight"], threshold=0.99)
    p = ps.plan(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    stored = {n for n, _ in m.named_parameters()}
    assert "0.parametrizations.weight.original" in stored and "0.weight" not in stored
    for _ in range(3):
        opt.zero_grad()
        m(torch.randn(8, 6)).square().sum().backward()
        opt.step()
    W = m[0].weight
    assert torch.equal(W[:, 0], W[:, 1]) and torch.equal(W[:, 2], torch.zeros(4))
    assert ps.check(m, p) == []


def test_rows_mode_dim0_and_explicit_labels():
    m = _mlp()
    g = ps.tie_rows(m, "0.weight", [0, 1, 1, -1], dim=0)
    W = m[0].weight
    assert torch.equal(W[1], W[2]) and torch.equal(W[3], torch.zeros(6))
    assert g.shape == (2, 6) and g.options["dim"] == 0
    assert ps.report(m).unique_params == 2 * 6 + 4 + 15


def test_apply_plan_check_and_untie():
    m = _trained_like(_mlp())
    ps.growl_tie(m, ["0.weight"], threshold=0.99)
    p = ps.plan(m)
    assert ps.SharingPlan.from_json(p.to_json()) == p
    fresh = _mlp()
    assert ps.check(fresh, p) != []
    ps.apply_plan(fresh, p)
    assert ps.check(fresh, p) == []
    # a plan with other labels does not match, and says so
    d = p.to_dict()
    d["groups"][0]["options"]["labels"] = [0, 1, -1, 1, 0, 1]
    problems = ps.check(m, ps.SharingPlan.from_dict(d))
    assert len(problems) == 1 and "1 of 6 labels differ" in problems[0]
    # untie: plain parameters with the same values
    value = m[0].weight.detach().clone()
    ps.untie(m, "0.weight")
    assert ps.find_ties(m) == [] and isinstance(m[0].weight, nn.Parameter)
    assert torch.equal(m[0].weight, value)


def test_rows_assignment_projects_onto_the_tie():
    m = _mlp()
    ps.tie_rows(m, "0.weight", [0, 0, 1, 1, -1, -1])
    value = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    m[0].weight = value  # assigning a weight sets each shared vector to the mean of its slices
    W = m[0].weight
    torch.testing.assert_close(W[:, 0], (value[:, 0] + value[:, 1]) / 2)
    assert torch.equal(W[:, 4], torch.zeros(4))


def test_checkpoint_round_trip_restores_the_row_ties(tmp_path):
    m = _trained_like(_mlp())
    ps.growl_tie(m, ["0.weight"], threshold=0.99)
    path = tmp_path / "tied.safetensors"
    ps.save(m, path)
    ck = ps.read(path)
    packed = ck.tensors["0.parametrizations.weight.original.labels"]
    assert packed.dtype == torch.uint8 and packed.numel() == 2  # labels + 1 at 2 bits each
    assert (unpack_bits(packed, 2, 6) - 1).tolist() == [0, 0, -1, 1, 0, 1]
    fresh = _mlp()
    assert ps.find_ties(fresh) == []
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    assert ps.find_ties(fresh) == ps.find_ties(m)
    x = torch.randn(4, 6)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    dense = tmp_path / "dense.safetensors"
    ps.save(_mlp(), dense)
    data = path.stat().st_size - ck.header_bytes
    assert data == (2 * 4 + 4 + 12 + 3) * 4 + 2  # vectors, biases, layer 2, the packed labels
    assert data < dense.stat().st_size - ps.read(dense).header_bytes
    # negative: a model whose first layer has another shape cannot take the file, and is unchanged
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    before = snapshot(other)
    with pytest.raises(ps.CheckpointError):
        ps.load(other, path)
    assert_unchanged(other, before)


def test_a_fully_pruned_weight_stores_nothing_and_round_trips(tmp_path):
    m = _mlp()
    ps.tie_rows(m, "0.weight", [-1] * 6)
    assert torch.equal(m[0].weight, torch.zeros(4, 6))
    assert ps.report(m).unique_params == 4 + 15  # only the biases and layer 2
    path = tmp_path / "pruned.safetensors"
    ps.save(m, path, compress=True)
    fresh = _mlp()
    ps.load(fresh, path)
    assert ps.find_ties(fresh) == ps.find_ties(m) and torch.equal(fresh[0].weight, torch.zeros(4, 6))


def test_checkpoint_with_other_labels_is_refused(tmp_path):
    m = _trained_like(_mlp())
    ps.growl_tie(m, ["0.weight"], threshold=0.99)
    path = tmp_path / "tied.safetensors"
    ps.save(m, path)
    target = _mlp()
    ps.tie_rows(target, "0.weight", [1, 0, -1, 1, 0, 1])  # tied otherwise
    index = ps._index.ModelIndex(target)
    group = ps.plan(m).groups[0]
    kind = ps.get_kind("rows")
    tensors = ps.read(path).tensors
    problems = kind.restore(index, group, tensors, False)
    assert len(problems) == 1 and "does not match how '0.weight' ties its slices" in problems[0]
    # positive: the model the file came from accepts it
    assert kind.restore(ps._index.ModelIndex(m), group, tensors, False) == []
    # and ps.load imposes the file's plan, so the otherwise-tied model ends up like the saved one
    ps.load(target, path)
    assert ps.find_ties(target) == ps.find_ties(m)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
        ({"threshold": 1.5}, r"threshold must be in \(0, 1\]"),
        ({"method": "manhattan"}, "unknown method"),
        ({"names": ["0.bias"]}, "needs a matrix"),
        ({"names": ["0.wieght"]}, "did you mean '0.weight'"),
        ({"dim": 2}, "dim must be 0"),
        ({"prune_tol": -1.0}, "prune_tol"),
    ],
)
def test_growl_tie_bad_input_leaves_the_model_unchanged(kwargs, match):
    m = _trained_like(_mlp())
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match=match):
        ps.growl_tie(m, **kwargs)
    assert_unchanged(m, before)


def test_growl_tie_refuses_tied_weights():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ps.tie(m, "0.weight", "1.weight")
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match="is tied to '1.weight'; untie it first"):
        ps.growl_tie(m, ["0.weight"])
    assert_unchanged(m, before)


@pytest.mark.parametrize(
    "labels, match",
    [
        ([0, 0, 1], "3 labels but the weight"),
        ([0, 0, 1, -2, 1, 1], "outside -1..1"),
        ([0, 0, 2, 2, -1, -1], r"never uses vectors \[1\]"),
        (["a"] * 6, "list of integers"),
    ],
)
def test_tie_rows_bad_labels_leave_the_model_unchanged(labels, match):
    m = _mlp()
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match=match):
        ps.tie_rows(m, "0.weight", labels)
    assert_unchanged(m, before)


def test_apply_plan_rejects_a_rows_group_with_the_wrong_source():
    m = _mlp()
    bad = ps.SharingPlan((ps.TieGroup("rows", "0.weight", ("0.weight",), (1, 4), {"dim": 1, "labels": [0] * 6}),))
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match="stored as '0.parametrizations.weight.original'"):
        ps.apply_plan(m, bad)
    assert_unchanged(m, before)
