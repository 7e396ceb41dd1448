"""HashedNets: the hash, HashedLinear, ps.hash and the hash kind's own checks."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import paramshare as ps
from paramshare._index import ModelIndex
from paramshare.hashing import HashedWeight, _mix32_int, _seed_offset, hash_index, project_to_budget, signed_index
from paramshare.nn import HashedLinear


def _reference_signed_position(i: int, j: int, budget: int, seed: int) -> int:
    off = _seed_offset(seed)
    x = _mix32_int((i + off) & 0xFFFFFFFF) ^ _mix32_int((j + (off ^ 0x5BD1E995)) & 0xFFFFFFFF)
    y = (x * 0x7FEB352D) & 0xFFFFFFFF
    return (y * 2 * budget) >> 32


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


# ---- the hash -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 12345, -7, 2**40 + 3])
def test_hash_index_matches_pure_python_reference(seed):
    rows, cols, budget = 25, 40, 37
    idx, neg = hash_index((rows, cols), budget, seed)
    assert idx.dtype == torch.int64 and neg.dtype == torch.bool and idx.shape == neg.shape == (rows * cols,)
    for k in range(0, rows * cols, 7):
        pos = _reference_signed_position(k // cols, k % cols, budget, seed)
        assert idx[k].item() == pos % budget
        assert neg[k].item() == (pos >= budget)
    # higher dimensions hash as (first dimension, the rest flattened)
    assert torch.equal(hash_index((5, 2, 20), budget, seed)[0], hash_index((5, 40), budget, seed)[0])
    assert torch.equal(signed_index((rows, cols), budget, seed), torch.where(neg, idx + budget, idx))


def test_hash_index_is_deterministic_uniform_and_seed_dependent():
    shape, budget = (400, 500), 1000
    n = 400 * 500
    idx, neg = hash_index(shape, budget, 3)
    idx2, neg2 = hash_index(shape, budget, 3)
    assert torch.equal(idx, idx2) and torch.equal(neg, neg2)
    assert 0 <= idx.min() and idx.max() < budget
    counts = torch.bincount(idx, minlength=budget).double()
    assert counts.min() > 0
    assert counts.std() < 1.3 * math.sqrt(n / budget)  # binomial spread, no clustering
    assert abs(neg.double().mean().item() - 0.5) < 0.01
    other, _ = hash_index(shape, budget, 4)
    assert (other == idx).double().mean() < 0.01  # another seed: unrelated positions
    grid = idx.view(shape)
    # no row or column structure: two rows (or columns) agree about as often as chance
    assert (grid[0] == grid[1]).double().mean() < 0.02 and (grid[:, 0] == grid[:, 1]).double().mean() < 0.02
    rows_equal = (grid[:50, None, :] == grid[None, :50, :]).double().sum().item() - 50 * 500
    assert rows_equal < 2 * 50 * 49 * 500 / budget  # chance level: 1/budget per pair
    sign = (~neg).view(shape).double() * 2 - 1
    # signs are not an outer product of row and column signs (which a layer would absorb)
    assert torch.linalg.matrix_rank(sign[:20, :20]) > 10


# ---- HashedLinear ------------------------------------------------------------------------
def test_hashed_linear_memory_is_the_budget():
    layer = HashedLinear(300, 200, budget=937, seed=5)
    assert isinstance(layer, nn.Linear)
    assert sorted(p.numel() for p in layer.parameters()) == [200, 937]
    assert list(layer.buffers()) == []
    assert sorted(layer.state_dict()) == ["bias", "parametrizations.weight.original"]
    layer(torch.randn(3, 300)).sum().backward()
    assert list(layer.buffers()) == []  # nothing cached by a forward either
    assert layer.budget.grad is not None and layer.budget.grad.shape == (937,)
    r = ps.report(layer)
    assert r.unique_params == 937 + 200
    assert r.total_params == 300 * 200 + 200
    assert "bits/weight" in r.rows[0].stats.detail
    # the negative: a dense layer stores every weight
    assert sum(p.numel() for p in nn.Linear(300, 200).parameters()) == 300 * 200 + 200


def test_hashed_linear_weight_is_signed_budget_lookup_and_forward_is_linear():
    layer = HashedLinear(12, 7, budget=10, seed=2)
    idx, neg = hash_index((7, 12), 10, 2)
    b = layer.budget.detach()
    want = torch.where(neg, -b[idx], b[idx]).view(7, 12)
    assert torch.equal(layer.weight, want)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), F.linear(x, want, layer.bias))
    other = HashedLinear(12, 7, budget=10, seed=3)
    with torch.no_grad():
        other.budget.copy_(layer.budget)
    assert not torch.equal(other.weight, layer.weight)  # another seed, another weight


def test_hashed_linear_gradcheck():
    torch.manual_seed(0)
    layer = HashedLinear(6, 5, budget=7, seed=1).double()
    x = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
    budget = layer.budget.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()

    def f(x, budget, bias):
        return torch.func.functional_call(layer, {"parametrizations.weight.original": budget, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, budget, bias))


def test_budget_gradient_is_signed_sum_of_member_gradients():
    torch.manual_seed(0)
    layer = HashedLinear(16, 8, budget=11, seed=4)
    x = torch.randn(9, 16)
    w = layer.weight.detach().requires_grad_()
    (F.linear(x, w, layer.bias).tanh().sum()).backward()
    layer(x).tanh().sum().backward()
    idx, neg = hash_index((8, 16), 11, 4)
    g = w.grad.reshape(-1)
    want = torch.zeros(11).index_add_(0, idx, torch.where(neg, -g, g))
    torch.testing.assert_close(layer.budget.grad, want)


def test_hashed_linear_init_matches_nn_linear_and_options():
    torch.manual_seed(0)
    layer = HashedLinear(400, 100, budget=5000)
    bound = 1 / math.sqrt(400)
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.1 * bound
    nobias = HashedLinear(4, 3, budget=2, bias=False)
    assert nobias.bias is None and sorted(nobias.state_dict()) == ["parametrizations.weight.original"]
    meta = HashedLinear(4, 3, budget=2, device="meta")
    assert meta.budget.is_meta and meta.weight.shape == (3, 4)
    half = HashedLinear(4, 3, budget=5, dtype=torch.float64)
    assert half.weight.dtype == torch.float64
    assert "budget=5" in repr(half)


@pytest.mark.parametrize(
    "args, match",
    [
        ((0, 3, 2), "in_features"),
        ((4, 3, 0), "budget"),
        ((4, 3, 13), "larger than"),
        ((4, 3, 2.5), "budget"),
        ((2**16, 2**16, 2**30 + 1), "largest hash budget"),
        ((4, 3, True), "budget"),
    ],
)
def test_hashed_linear_bad_sizes(args, match):
    with pytest.raises(ps.SharingError, match=match):
        HashedLinear(*args)
    with pytest.raises(ps.SharingError, match="seed"):
        HashedLinear(4, 3, 2, seed="x")


def test_hashed_linear_survives_copies_and_trains():
    torch.manual_seed(0)
    net = nn.Sequential(HashedLinear(10, 32, budget=40), nn.ReLU(), HashedLinear(32, 2, budget=16, seed=1))
    p = ps.plan(net)
    for other in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert ps.check(other, p) == []
        x = torch.randn(4, 10)
        torch.testing.assert_close(other(x), net(x))
    x = torch.randn(64, 10)
    y = (x[:, 0] > 0).long()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = F.cross_entropy(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    assert F.cross_entropy(net(x), y).item() < 0.5 * first
    assert ps.check(net, p) == []


# ---- ps.hash ------------------------------------------------------------------------------
def test_hash_replaces_linears_in_place_with_least_squares_budgets():
    m = _mlp()
    dense = copy.deepcopy(m)
    ps.hash(m, 1 / 4, seed=7)
    for i in (0, 2, 4):
        assert isinstance(m[i], nn.Linear)
        w0 = dense[i].weight.detach()
        b = m[i].parametrizations.weight.original
        assert b.shape == (round(w0.numel() / 4),)
        idx, neg = hash_index(w0.shape, b.numel(), 7)
        signed = torch.where(neg, -w0.reshape(-1), w0.reshape(-1))
        mean = torch.zeros(b.numel()).index_add_(0, idx, signed) / torch.bincount(idx, minlength=b.numel()).clamp(min=1)
        torch.testing.assert_close(b.detach(), mean)
        assert torch.equal(m[i].bias, dense[i].bias)  # biases stay dense
    x = torch.randn(3, 20)
    want = x
    for i in (0, 2, 4):
        want = F.linear(want, m[i].weight, m[i].bias)
        if i < 4:
            want = want.relu()
    torch.testing.assert_close(m(x), want)
    assert [g.kind for g in ps.find_ties(m)] == ["hash"] * 3
    assert ps.report(m).unique_params == 80 + 64 + 16 + 16 + 16 + 4


def test_hash_fit_improves_with_the_budget():
    errs = []
    for ratio in (1 / 16, 1 / 4, 1.0):
        m = _mlp()
        w = m[0].weight.detach().clone()
        ps.hash(m, ratio)
        errs.append((m[0].weight - w).norm().item() / w.norm().item())
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.8  # collisions remain even at ratio 1, but the fit is far better


def test_hash_include_patterns():
    m = _mlp()
    ps.hash(m, 0.5, include=["0", "4.weight"])
    assert [g.members for g in ps.find_ties(m)] == [("0.weight",), ("4.weight",)]
    assert [g.members for g in ps.find_ties(ps.hash(_mlp(), 0.5, include="2*"))] == [("2.weight",)]


def test_hash_of_a_tied_weight_shares_one_budget():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    ps.tie(m, "0.weight", "2.weight")
    ps.hash(m, 0.25)
    groups = ps.find_ties(m)
    assert [(g.kind, g.members) for g in groups] == [("hash", ("0.weight", "2.weight"))]
    assert m[0].parametrizations.weight.original is m[2].parametrizations.weight.original
    assert torch.equal(m[0].weight, m[2].weight)
    p = ps.plan(m)
    assert ps.SharingPlan.from_json(p.to_json()) == p
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    ps.apply_plan(fresh, p)
    assert ps.check(fresh, p) == []
    assert fresh[0].parametrizations.weight.original is fresh[2].parametrizations.weight.original
    # assign=True gives each module its own budget: the shared budget is broken and restored
    fresh.load_state_dict(m.state_dict(), assign=True)
    problems = ps.check(fresh, p)
    assert any("reads a budget that is not" in s for s in problems)
    ps.apply_plan(fresh, p)
    assert ps.check(fresh, p) == []


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: ps.hash(m, 0), "ratio"),
        (lambda m: ps.hash(m, 1.5), "ratio"),
        (lambda m: ps.hash(m, float("nan")), "ratio"),
        (lambda m: ps.hash(m, True), "ratio"),
        (lambda m: ps.hash(m, 0.5, seed=1.5), "seed"),
        (lambda m: ps.hash(m, 0.5, include="fc9"), "matches no nn.Linear"),
        (lambda m: ps.hash(m, 0.5, include=3), "include"),
        (lambda m: ps.hash(m, 0.5, include="conv"), "not nn.Linear"),
        (lambda m: ps.hash(m, 0.5, include="head"), "tied to"),
    ],
)
def test_hash_bad_input_leaves_model_unchanged(call, match, unchanged):
    m = nn.ModuleDict({"conv": nn.Conv1d(2, 2, 3), "fc": nn.Linear(8, 8), "embed": nn.Embedding(10, 4),
                       "head": nn.Linear(4, 10)})
    ps.tie(m, "embed.weight", "head.weight")
    with unchanged(m), pytest.raises(ps.SharingError, match=match):
        call(m)


def test_hash_refuses_hashed_and_integer_weights(unchanged):
    m = ps.hash(_mlp(), 0.5, include="0")
    with unchanged(m), pytest.raises(ps.SharingError, match="already hashed"):
        ps.hash(m, 0.5)
    q = nn.Sequential(nn.Linear(4, 4))
    q[0].weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)
    with unchanged(q), pytest.raises(ps.SharingError, match="floating-point"):
        ps.hash(q, 0.5)
    with pytest.raises(ps.SharingError, match="no nn.Linear"):
        ps.hash(nn.Sequential(nn.Conv1d(1, 1, 3)), 0.5)


def test_untie_makes_hashed_weights_dense_with_the_same_values():
    m = ps.hash(_mlp(), 0.25)
    before = [m[i].weight.detach().clone() for i in (0, 2, 4)]
    ps.untie(m, "2.weight")
    assert [g.members for g in ps.find_ties(m)] == [("0.weight",), ("4.weight",)]
    assert isinstance(m[2].weight, nn.Parameter) and torch.equal(m[2].weight, before[1])
    ps.untie(m)
    assert ps.find_ties(m) == []
    for i, w in zip((0, 2, 4), before):
        assert torch.equal(m[i].weight, w)
    assert ps.report(m).saved_bytes == 0


# ---- the kind: plans and checkpoint hooks --------------------------------------------------
def test_check_and_apply_plan_report_mismatches(unchanged):
    m = ps.hash(_mlp(), 0.25, seed=3)
    p = ps.plan(m)
    g = p.groups[0]
    other = ps.hash(_mlp(), 0.25, seed=4)
    assert any("seed 4 but the plan says 3" in s for s in ps.check(other, p))
    ps.apply_plan(other, p)
    assert ps.check(other, p) == []
    assert ps.check(ps.hash(_mlp(), 0.5, seed=3), p)  # another budget size

    def with_group(**changes):
        d = p.to_dict()
        d["groups"][0].update(changes)
        return d

    bad = [
        (with_group(options={**g.options, "hash": "md5"}), "hash function"),
        (with_group(options={**g.options, "seeds": [1, 2]}), "seeds"),
        (with_group(options={**g.options, "shapes": [[3, 3]]}), "plan hashes it as"),
        (with_group(source="0.bias"), "not a budget"),
        (with_group(source="nowhere"), "source must be"),
        (with_group(members=["9.weight"], source="9.parametrizations.weight.original"), "does not exist"),
        (with_group(shape=[0]), "budget >= 1"),
    ]
    for plan, match in bad:
        fresh = _mlp()
        with unchanged(fresh), pytest.raises(ps.SharingError, match=match):
            ps.apply_plan(fresh, plan)


def test_checkpoint_hooks_store_only_the_budget():
    m = ps.hash(_mlp(), 0.25)
    kind = ps.get_kind("hash")
    index = ModelIndex(m)
    g = ps.find_ties(m)[0]
    stored = kind.stored(index, g)
    assert list(stored) == ["0.parametrizations.weight.original"]
    assert stored[g.source] is m[0].parametrizations.weight.original
    assert kind.owned(index, g) == [stored[g.source]]
    assert kind.extra_bytes(index, g) == 0
    target = ps.hash(_mlp(seed=1), 0.25)
    tindex = ModelIndex(target)
    file = {g.source: stored[g.source].detach().clone()}
    assert kind.restore(tindex, g, {}, apply=False)[0].startswith("the file has no tensor")
    assert "shape" in kind.restore(tindex, g, {g.source: torch.zeros(3)}, apply=False)[0]
    assert "floating" in kind.restore(tindex, g, {g.source: torch.zeros(80, dtype=torch.int64)}, apply=False)[0]
    assert kind.restore(tindex, g, file, apply=False) == []
    assert not torch.equal(target[0].weight, m[0].weight)  # apply=False changes nothing
    assert kind.restore(tindex, g, file, apply=True) == []
    assert torch.equal(target[0].weight, m[0].weight)


def test_project_to_budget_is_exact_without_collisions():
    w = torch.randn(3, 5)
    budget = 10_000  # sparse enough that these 15 weights almost surely do not collide
    idx, _ = hash_index((3, 5), budget, 0)
    assert idx.unique().numel() == 15
    b = project_to_budget([(w, 0)], budget)
    torch.testing.assert_close(HashedWeight((3, 5), budget)(b), w)
    with pytest.raises(ps.SharingError, match="reads a budget of"):
        HashedWeight((3, 5), budget)(torch.zeros(7))
