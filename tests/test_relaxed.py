"""Relaxed sharing: ps.relax (per-use low-rank deltas) and ps.convert_to_shared."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.kinds.delta import Delta


def stack(n: int = 6, d: int = 12, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(d, d) for _ in range(n))


def originals(s) -> list[torch.Tensor]:
    return [layer.weight.detach().clone() for layer in s]


def x_in(d: int = 12) -> torch.Tensor:
    return torch.randn(5, d, generator=torch.Generator().manual_seed(3))


# ---- relax ------------------------------------------------------------------------------------------
def test_relax_adds_a_zero_delta_per_use_that_trains():
    s = ps.share_layers(stack(4), unique=1, strategy="all")
    x = x_in()
    before = [layer(x) for layer in s]
    ps.relax(s, rank=3)
    base = s[0].parametrizations.weight.original
    for layer, y in zip(s, before):
        d = layer.parametrizations.weight[0]
        assert isinstance(d, Delta) and d.rank == 3
        assert layer.parametrizations.weight.original is base
        assert torch.equal(d.B, torch.zeros_like(d.B)) and d.A.abs().sum() > 0  # LoRA start: exact, trainable
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0)
    sum(layer(x).square().sum() for layer in s).backward()
    assert base.grad.abs().sum() > 0
    assert all(layer.parametrizations.weight[0].B.grad.abs().sum() > 0 for layer in s)
    r = ps.report(s)
    assert r.unique_params == 144 + 12 + 4 * 3 * (12 + 12)  # base + shared bias + deltas
    assert [g.kind for g in ps.find_ties(s)] == ["alias", "delta"]  # the 1-D bias stays aliased


def test_relax_names_take_globs_and_leave_the_rest_aliased():
    s = ps.share_layers(stack(4), unique=1, strategy="all")
    ps.relax(s, rank=2, names=["[12].weight"])
    kinds = {g.kind: g for g in ps.find_ties(s)}
    assert kinds["delta"].members == ("1.weight", "2.weight")
    assert kinds["delta"].source == "0.weight"  # the base is still 0.weight and 3.weight's parameter
    assert s[0].weight is s[3].weight is s[1].parametrizations.weight.original


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: ps.share_layers(stack(2), unique=1, strategy="all"), {"rank": 13}, r"rank at most 12"),
        (lambda: ps.share_layers(stack(2), unique=1, strategy="all"), {"rank": 0}, "out of range"),
        (lambda: ps.share_layers(stack(2), unique=1, strategy="all"), {"rank": 2, "init": "pca"}, "init must be"),
        (lambda: ps.share_layers(stack(2), unique=1, strategy="all"), {"rank": 2, "names": "0.bias"}, "needs 2 or more dimensions"),
        (lambda: ps.share_layers(stack(2), unique=1, strategy="all"), {"rank": 2, "names": "7.weight"}, "matches no parameter"),
        (lambda: stack(2), {"rank": 2}, "no shared weights"),
        (lambda: stack(2), {"rank": 2, "names": "0.weight"}, "not shared with another use"),
    ],
)
def test_relax_bad_input_leaves_the_model_unchanged(make, kwargs, match, unchanged):
    m = make()
    with unchanged(m), pytest.raises(ps.SharingError, match=match):
        ps.relax(m, **kwargs)


# ---- convert_to_shared ------------------------------------------------------------------------------
def test_convert_mean_and_first_initialise_each_group_from_its_members():
    s = stack()
    w = originals(s)
    ps.convert_to_shared(s, unique=2, strategy="cycle", init="mean")
    assert s[0].weight is s[2].weight is s[4].weight and s[1].weight is s[3].weight
    assert s[0].weight is not s[1].weight
    torch.testing.assert_close(s[0].weight.detach(), (w[0] + w[2] + w[4]) / 3)
    torch.testing.assert_close(s[1].weight.detach(), (w[1] + w[3] + w[5]) / 3)
    f = stack()
    ps.convert_to_shared(f, unique=2, strategy="sequence", init="first")
    assert torch.equal(f[1].weight, w[0]) and torch.equal(f[4].weight, w[3])
    # the same grouping as share_layers
    assert ps.find_ties(f) == ps.find_ties(ps.share_layers(stack(), unique=2, strategy="sequence"))


def test_relax_after_convert_starts_from_the_truncated_svd_of_what_sharing_lost():
    w = originals(stack())
    full = ps.convert_to_shared(stack(), unique=1, strategy="all", relax_rank=12)
    for layer, wi in zip(full, w):  # full rank: every layer is its original again
        torch.testing.assert_close(layer.weight.detach(), wi, rtol=1e-5, atol=1e-5)
    low = ps.convert_to_shared(stack(), unique=1, strategy="all")
    mean = low[0].weight.detach().clone()
    ps.relax(low, rank=3)
    for layer, wi in zip(low, w):
        tail = torch.linalg.svdvals((wi - mean).double())[3:].square().sum()
        err = (layer.weight.detach() - wi).double().square().sum()
        torch.testing.assert_close(err, tail, rtol=1e-4, atol=1e-6)
    # negative: without the originals (init="zeros"), the deltas start at zero
    z = ps.convert_to_shared(stack(), unique=1, strategy="all")
    ps.relax(z, rank=3, init="zeros")
    assert all(torch.equal(layer.weight, z[0].parametrizations.weight.original) for layer in z)


def test_convert_svd_init_leaves_less_for_the_deltas_than_the_mean():
    torch.manual_seed(1)
    # layers = common part + a strong per-layer rank-1 part + noise: the mean absorbs the
    # rank-1 parts, the svd init leaves them to the deltas
    common = torch.randn(12, 12)
    s = stack()
    with torch.no_grad():
        for layer in s:
            layer.weight.copy_(common + 3 * torch.randn(12, 1) @ torch.randn(1, 12) + 0.01 * torch.randn(12, 12))
    w = originals(s)

    def err(init):
        m = stack()
        m.load_state_dict(s.state_dict())
        ps.convert_to_shared(m, unique=1, strategy="all", init=init, relax_rank=1)
        return sum((layer.weight.detach() - wi).square().sum() for layer, wi in zip(m, w))

    e_svd, e_mean = err("svd"), err("mean")
    assert e_svd < 0.5 * e_mean


def test_convert_then_relax_recovers_a_trained_stack_better_with_rank():
    w = originals(stack())
    errs = []
    for r in (0, 2, 6):
        m = ps.convert_to_shared(stack(), unique=2, strategy="cycle", relax_rank=r)
        errs.append(sum((layer.weight.detach() - wi).square().sum().item() for layer, wi in zip(m, w)))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"unique": 4}, "does not divide"),
        ({"unique": 2, "init": "median"}, "init must be"),
        ({"unique": 2, "init": "svd"}, "relax_rank >= 1"),
        ({"unique": 2, "relax_rank": 13}, "rank at most 12"),
        ({"unique": 2, "relax_rank": -1}, "out of range"),
    ],
)
def test_convert_bad_input_leaves_the_layers_unchanged(kwargs, match, unchanged):
    s = stack()
    with unchanged(s), pytest.raises(ps.SharingError, match=match):
        ps.convert_to_shared(s, **kwargs)


def test_convert_refuses_blocks_of_different_structure(unchanged):
    torch.manual_seed(0)
    s = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(4, 4)])
    with unchanged(s), pytest.raises(ps.SharingError, match="blocks differ"):
        ps.convert_to_shared(s, unique=2, relax_rank=2)


def test_relaxed_model_round_trips_plan_and_checkpoint(tmp_path):
    m = ps.convert_to_shared(stack(), unique=3, strategy="cycle_rev", relax_rank=2)
    p = ps.plan(m)
    fresh = stack(seed=5)
    ps.apply_plan(fresh, p)
    assert ps.check(fresh, p) == [] and ps.find_ties(fresh) == ps.find_ties(m)
    path = tmp_path / "relaxed.safetensors"
    ps.save(m, path)
    other = stack(seed=7)
    ps.load(other, path)
    x = x_in()
    for a, b in zip(other, m):
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
