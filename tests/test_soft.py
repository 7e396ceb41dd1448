"""Soft tying: soft_tie, anchor, group_tie, harden and the SoftTie penalty module."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import paramshare as ps
from paramshare.soft import NORMS


def mlp(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def dist(norm: str, a: torch.Tensor, b: torch.Tensor, delta: float = 1.0) -> torch.Tensor:
    """The hand-written formula for one tensor pair."""
    a, b = a.detach().double(), b.detach().double()
    d = a - b
    if norm == "l2":
        return (d**2).sum()
    if norm == "l1":
        return d.abs().sum()
    if norm == "huber":
        ad = d.abs()
        return torch.where(ad <= delta, 0.5 * d**2, delta * (ad - 0.5 * delta)).sum()
    a, b = a.flatten(), b.flatten()
    return 1 - (a @ b) / (a.norm() * b.norm())


def params(m: nn.Module) -> dict[str, torch.Tensor]:
    return dict(m.named_parameters())


# ---- penalty values against the formula ----------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_pair_penalty_matches_formula(norm):
    a, b = mlp(0), mlp(1)
    soft = ps.soft_tie(a, b, norm=norm, strength=0.3, delta=0.2)
    want = sum(0.3 * dist(norm, params(a)[n], params(b)[n], 0.2) for n in params(a))
    assert soft().item() == pytest.approx(want.item(), rel=1e-5)
    per = soft.distances()
    assert list(per) == list(params(a))
    for n in params(a):
        assert per[n] == pytest.approx(dist(norm, params(a)[n], params(b)[n], 0.2).item(), rel=1e-5, abs=1e-7)
    # negative: a different strength gives a different value, identical models give zero
    assert ps.soft_tie(a, b, norm=norm, strength=0.6, delta=0.2)().item() == pytest.approx(2 * want.item(), rel=1e-5)
    assert ps.soft_tie(a, copy.deepcopy(a), norm=norm)().item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_anchor_and_group_penalties_match_formula(norm):
    a, ref = mlp(0), mlp(1)
    soft = ps.anchor(a, ref, norm=norm, strength=2.0)
    want = sum(2.0 * dist(norm, params(a)[n], params(ref)[n]) for n in params(a))
    assert soft().item() == pytest.approx(want.item(), rel=1e-5)
    torch.manual_seed(3)
    stack = nn.Sequential(*[nn.Linear(3, 3) for _ in range(3)])
    g = ps.group_tie(stack, {"w": ["0.weight", "1.weight", "2.weight"], "b": "*.bias"}, norm=norm, strength={"w": 1.0, "b": 0.5})
    ws = [stack[i].weight for i in range(3)]
    bs = [stack[i].bias for i in range(3)]
    mw, mb = sum(w.detach() for w in ws) / 3, sum(x.detach() for x in bs) / 3
    want = sum(dist(norm, w, mw) for w in ws) + 0.5 * sum(dist(norm, x, mb) for x in bs)
    assert g().item() == pytest.approx(want.item(), rel=1e-5)
    assert g.names == ["w", "b"]
    assert g.distances()["b"] == pytest.approx(sum(dist(norm, x, mb) for x in bs).item(), rel=1e-5)


def test_group_l2_equals_pairwise_form():
    # sum_i ||w_i - mean||^2 == (1/k) sum_{i<j} ||w_i - w_j||^2
    torch.manual_seed(0)
    ws = nn.ParameterList([nn.Parameter(torch.randn(4, 4)) for _ in range(4)])
    g = ps.group_tie(ws, [["0", "1", "2", "3"]], strength=1.0)
    pairwise = sum(((ws[i] - ws[j]) ** 2).sum() for i in range(4) for j in range(i + 1, 4)) / 4
    assert g().item() == pytest.approx(pairwise.item(), rel=1e-5)
    assert g.names == ["0,1,2,3"]


# ---- gradients -------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm):
    a, b = mlp(0, torch.float64), mlp(1, torch.float64)
    with torch.no_grad():  # keep huber's kinks away from the finite differences
        for p in b.parameters():
            p.add_(0.05 * torch.sign(p))
    for soft, inputs in [
        (ps.soft_tie(a, b, norm=norm, strength=0.7, delta=0.3), list(a.parameters()) + list(b.parameters())),
        (ps.anchor(a, b, norm=norm, strength=0.7, delta=0.3), list(a.parameters())),
        (ps.group_tie(nn.ModuleDict({"a": a, "b": b}), ["*.0.weight", "*.2.bias"], norm=norm, delta=0.3),
         [a[0].weight, b[0].weight, a[2].bias, b[2].bias]),
    ]:
        assert torch.autograd.gradcheck(lambda *_: soft(), tuple(inputs), eps=1e-6, atol=1e-5)


def test_gradients_reach_both_sides_and_not_a_frozen_one():
    a, b = mlp(0), mlp(1)
    ps.soft_tie(a, b, strength=1.0)().backward()
    for n, p in a.named_parameters():
        q = params(b)[n]
        assert torch.allclose(p.grad, 2 * (p - q).detach()) and torch.allclose(q.grad, -p.grad)
    a2, frozen = mlp(0), mlp(1).requires_grad_(False)
    ps.soft_tie(a2, frozen, strength=1.0)().backward()
    assert all(p.grad is not None for p in a2.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_aliased_parameters_are_one_input_with_summed_gradients():
    torch.manual_seed(0)
    a = ps.tie(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "0.weight", "1.weight")
    b = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    soft = ps.soft_tie(a, b, strength=1.0)
    soft().backward()
    w = a[0].weight.detach()
    want = 2 * (w - b[0].weight.detach()) + 2 * (w - b[1].weight.detach())
    assert torch.allclose(a[0].weight.grad, want)
    assert not torch.allclose(a[0].weight.grad, 2 * (w - b[0].weight.detach()))


@pytest.mark.parametrize("norm", NORMS)
def test_backward_twice_through_one_graph(norm):
    # the first backward reuses the saved differences in place; a second one must recompute them
    a, b = mlp(0), mlp(1)
    for strength in (0.5, {"*.weight": 0.5, "*.bias": 2.0}):
        a.zero_grad()
        b.zero_grad()
        v = ps.soft_tie(a, b, norm=norm, strength=strength)()
        v.backward(retain_graph=True)
        once = [p.grad.clone() for p in list(a.parameters()) + list(b.parameters())]
        v.backward()
        assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(list(a.parameters()) + list(b.parameters()), once))
        assert any(g.abs().sum() > 0 for g in once)


def test_penalty_follows_new_parameter_objects():
    a, b = mlp(0), mlp(1)
    soft = ps.soft_tie(a, b)
    before = soft().item()
    a.load_state_dict(b.state_dict(), assign=True)  # new parameter objects, equal to b
    assert soft().item() == pytest.approx(0.0, abs=1e-9) and before > 0


# ---- schedules and strengths --------------------------------------------------------------------
def test_schedule_and_step():
    a, b = mlp(0), mlp(1)
    soft = ps.soft_tie(a, b, strength=lambda step: 0.1 * (step + 1))
    base = ps.soft_tie(a, b, strength=1.0)().item()
    assert soft().item() == pytest.approx(0.1 * base, rel=1e-5)
    soft.step()
    soft.step()
    assert soft.step_count == 2 and soft().item() == pytest.approx(0.3 * base, rel=1e-5)
    assert list(soft.strengths().values()) == pytest.approx([0.3] * 4)


def test_per_name_strength_dict_with_patterns_and_schedules():
    a, b = mlp(0), mlp(1)
    soft = ps.soft_tie(a, b, strength={"0.weight": 2.0, "*.weight": 1.0, "*": lambda s: 0.0 if s == 0 else 5.0})
    d = soft.distances()
    assert soft.strengths() == {"0.weight": 2.0, "0.bias": 0.0, "2.weight": 1.0, "2.bias": 0.0}
    assert soft().item() == pytest.approx(2 * d["0.weight"] + d["2.weight"], rel=1e-5)
    soft.step()
    assert soft().item() == pytest.approx(2 * d["0.weight"] + d["2.weight"] + 5 * (d["0.bias"] + d["2.bias"]), rel=1e-5)


def test_bad_strengths():
    a, b = mlp(0), mlp(1)
    for bad, msg in [
        (-1.0, "non-negative"),
        (float("nan"), "non-negative"),
        (True, "non-negative number"),
        ("0.1", "non-negative number"),
        ({"0.weight": 1.0}, "no strength for '0.bias'"),
        ({"*": 1.0, "0.wieght": 2.0}, "matches no tied parameter"),
        ({"*": -0.5}, "non-negative"),
        (lambda s: -1.0, "at step 0"),
    ]:
        with pytest.raises(ps.SharingError, match=msg):
            ps.soft_tie(a, b, strength=bad)
    soft = ps.soft_tie(a, b, strength=lambda s: 1.0 - s)  # negative from step 2 on
    soft.step()
    with pytest.raises(ps.SharingError, match="at step 2"):
        soft.step()
    assert soft.step_count == 1 and soft.strengths()["0.weight"] == 0.0


# ---- names and bad input ------------------------------------------------------------------------
def test_names_and_globs():
    a, b = mlp(0), mlp(1)
    assert ps.soft_tie(a, b, names="2.*").names == ["2.weight", "2.bias"]
    assert ps.soft_tie(a, b, names=["0.bias", "*.weight"]).names == ["0.bias", "0.weight", "2.weight"]
    assert ps.soft_tie(a, b).names == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_default_names_report_mismatches():
    a = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    b = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 7), nn.Linear(7, 2))
    with pytest.warns(ps.SoftTieWarning, match="left out 4 parameters"):
        soft = ps.soft_tie(a, b)
    assert soft.names == ["0.weight", "0.bias"]
    assert soft.skipped["2.weight"] == "shape (3, 4) in a but (7, 4) in b"
    assert soft.skipped["3.bias"] == "only in the second model (b)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ps.soft_tie(mlp(0), mlp(1)).skipped == {}  # nothing to report: no warning


def test_bad_input_is_a_clear_error_and_changes_nothing():
    a, b = mlp(0), mlp(1)
    wide = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    sa, sb, sw = snapshot(a), snapshot(b), snapshot(wide)
    cases = [
        (lambda: ps.soft_tie(a, b, names=["0.weight", "9.weight"]), r"'9.weight' is missing in the first model \(a\)"),
        (lambda: ps.soft_tie(a, nn.Sequential(nn.Linear(5, 4)), names="2.bias"), "'2.bias' is missing in the second model"),
        (lambda: ps.soft_tie(a, wide, names="0.weight"), r"'0.weight': shape \(4, 5\) in the first model \(a\) but \(6, 5\)"),
        (lambda: ps.soft_tie(a, b, norm="l3"), "unknown norm 'l3'; choose one of 'l2', 'l1', 'huber', 'cosine'"),
        (lambda: ps.soft_tie(a, b, strength=-1e-3), "non-negative"),
        (lambda: ps.soft_tie(a, b, names="*.running_mean"), "matches no parameter"),
        (lambda: ps.soft_tie(a, a), "two different modules"),
        (lambda: ps.soft_tie(a, mlp(1, torch.float64)), "float32 in the first model"),
        (lambda: ps.soft_tie(a, b, norm="huber", delta=0), "Huber delta"),
        (lambda: ps.soft_tie(a, wide), None),  # default names: fine, mismatches reported
        (lambda: ps.anchor(a, {"0.weight": torch.zeros(4, 6)}, names="0.weight"), r"'0.weight': shape \(4, 5\) in the model but \(4, 6\)"),
        (lambda: ps.anchor(a, {"0.weight": torch.zeros(4, 5)}, names="0.bias"), "no tensor for parameter '0.bias'"),
        (lambda: ps.anchor(a, [1, 2]), "reference must be None, an nn.Module or a state dict"),
        (lambda: ps.anchor(a, {"0.weight": 3}), "maps parameter names to tensors"),
        (lambda: ps.group_tie(wide, [["0.weight", "2.weight"]]), r"mixes shapes: '0.weight' is \(6, 5\) but '2.weight' is \(3, 6\)"),
        (lambda: ps.group_tie(a, [["0.weight"]]), "fewer than two distinct tensors"),
        (lambda: ps.group_tie(a, [["0.weight", "nope"]]), "'nope' of group"),
        (lambda: ps.group_tie(a, []), "non-empty"),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ps.SoftTieWarning)
        for call, msg in cases:
            if msg is None:
                call()
                continue
            with pytest.raises(ps.SharingError, match=msg):
                call()
    assert_unchanged(a, sa)
    assert_unchanged(b, sb)
    assert_unchanged(wide, sw)


# ---- anchor ----------------------------------------------------------------------------------------
def test_anchor_reference_is_frozen_and_not_a_model_parameter():
    net = mlp(0)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    l2sp = ps.anchor(net, strength=1.0)
    assert list(l2sp.parameters()) == []
    refs = dict(l2sp.named_buffers())
    assert len(refs) == 5 and all(not r.requires_grad for r in refs.values())  # 4 references + the weights
    model_ids = {id(p) for p in net.parameters()}
    assert all(id(r) not in model_ids for r in refs.values())
    assert all(r.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for r in refs.values() for p in net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (net(torch.randn(8, 5)).pow(2).mean() + l2sp()).backward()
        opt.step()
    assert all(torch.equal(refs[f"ref_{i}"], start[k]) for i, k in enumerate(start))  # reference did not move
    assert l2sp().item() > 0
    assert l2sp().item() == pytest.approx(sum(dist("l2", p, start[k]) for k, p in net.named_parameters()).item(), rel=1e-5)


def test_anchor_state_dict_reference_is_copied_and_converted():
    net = mlp(0)
    sd = net.state_dict()  # shares storage with the parameters
    soft = ps.anchor(net, {k: v.double() for k, v in sd.items()} | {"extra.buffer": torch.zeros(2)})
    with torch.no_grad():
        net[0].bias.add_(1.0)
    assert soft().item() == pytest.approx(1e-3 * 4, rel=1e-5)  # 4 biases moved by 1
    assert soft.ref_0.dtype == torch.float32
    assert ps.anchor(net, net.state_dict())().item() == 0.0  # a fresh snapshot: no distance yet
    ref_module = mlp(1)
    assert ps.anchor(net, ref_module, strength=1.0)().item() == pytest.approx(
        sum(dist("l2", p, params(ref_module)[k]) for k, p in net.named_parameters()).item(), rel=1e-5
    )
    assert set(ps.anchor(net, ref_module).state_dict()) == {"ref_0", "ref_1", "ref_2", "ref_3"}
    with pytest.warns(ps.SoftTieWarning, match="not in the reference"):
        part = ps.anchor(net, {"0.weight": torch.zeros(4, 5)})
    assert part.names == ["0.weight"] and set(part.skipped) == {"0.bias", "2.weight", "2.bias"}


# ---- harden --------------------------------------------------------------------------------------
def test_harden_across_two_models_makes_real_ties():
    a, b = mlp(0), mlp(1)
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            q.copy_(p)
        b[0].weight.add_(1e-3)  # converged, close
        b[2].weight.mul_(-1.0)  # not converged
    both = nn.ModuleDict({"a": a, "b": b})
    soft = ps.soft_tie(a, b, strength=1.0)
    expect_mean = (a[0].weight.detach() + b[0].weight.detach()) / 2
    before = ps.report(both)
    assert ps.find_ties(both) == []
    groups = ps.harden(both, soft, threshold=0.01)
    assert sorted(g.members for g in groups) == [("a.0.bias", "b.0.bias"), ("a.0.weight", "b.0.weight"), ("a.2.bias", "b.2.bias")]
    assert a[0].weight is b[0].weight and a[2].weight is not b[2].weight
    assert torch.allclose(a[0].weight, expect_mean)
    assert set(ps.find_ties(both)) == set(groups)
    after = ps.report(both)
    saved = (a[0].weight.numel() + a[0].bias.numel() + a[2].bias.numel()) * 4  # float32 bytes stored once less
    assert before.unique_bytes - after.unique_bytes == saved and after.total_bytes == before.total_bytes
    assert soft.names == ["2.weight"] and sorted(soft.hardened) == ["0.bias", "0.weight", "2.bias"]
    assert soft().item() == pytest.approx(dist("l2", a[2].weight, b[2].weight).item(), rel=1e-5)
    # the container trains as one model with the shared tensor stepped once
    opt = torch.optim.SGD(both.parameters(), lr=0.1)
    (a(torch.randn(2, 5)).sum() + b(torch.randn(2, 5)).sum() + soft()).backward()
    opt.step()
    assert a[0].weight is b[0].weight
    # negative: threshold 0 hardens nothing more
    assert ps.harden(both, soft, threshold=0.0) == [] and soft.names == ["2.weight"]


def test_harden_group_merges_overlapping_groups_and_every_use():
    torch.manual_seed(0)
    stack = nn.Sequential(*[nn.Linear(3, 3) for _ in range(4)])
    ps.tie(stack, "3.bias", "0.bias")  # 0.bias reads 3.bias's tensor already
    with torch.no_grad():
        for i in (1, 2):
            stack[i].weight.copy_(stack[0].weight + 1e-4 * i)
    soft = ps.group_tie(stack, {"a": ["0.weight", "1.weight"], "b": ["1.weight", "2.weight"], "c": ["1.bias", "2.bias"]})
    mean = (stack[0].weight + stack[1].weight + stack[2].weight).detach() / 3
    groups = ps.harden(stack, soft, threshold=1e-2)
    assert [g.members for g in groups] == [("0.weight", "1.weight", "2.weight")]  # a and b merged; c far apart
    assert torch.allclose(stack[2].weight, mean) and stack[3].weight is not stack[0].weight
    assert soft.names == ["c"]
    assert stack[0].bias is stack[3].bias  # the earlier tie is untouched


def test_harden_bad_input_changes_nothing():
    a, b = mlp(0), mlp(0)
    soft = ps.soft_tie(a, b)
    other = mlp(2)
    sa, so = snapshot(a), snapshot(other)
    with pytest.raises(ps.SharingError, match=r"'0.weight' \(second model, b\) of this soft tie is not in the model passed.*ModuleDict"):
        ps.harden(a, soft, threshold=1.0)
    with pytest.raises(ps.SharingError, match="not in the model passed"):
        ps.harden(other, soft, threshold=1.0)
    with pytest.raises(ps.SharingError, match="cannot harden an anchor"):
        ps.harden(a, ps.anchor(a), threshold=1.0)
    with pytest.raises(ps.SharingError, match="threshold must be a non-negative number"):
        ps.harden(nn.ModuleDict({"a": a, "b": b}), soft, threshold=-1)
    with pytest.raises(ps.SharingError, match="needs a SoftTie"):
        ps.harden(a, "soft", threshold=1.0)
    assert_unchanged(a, sa)
    assert_unchanged(other, so)
    assert soft.hardened == [] and len(soft.names) == 4


def test_relative_distances():
    a, b = mlp(0), mlp(0)
    with torch.no_grad():
        b[0].bias.mul_(1.5)
    rel = ps.soft_tie(a, b).relative_distances()
    assert rel["0.weight"] == 0.0
    assert rel["0.bias"] == pytest.approx((0.5 * a[0].bias.norm() / (1.5 * a[0].bias.norm())).item(), rel=1e-5)


# ---- torch.compile ---------------------------------------------------------------------------------
def test_works_under_torch_compile():
    torch._dynamo.reset()
    a = mlp(0)
    b = mlp(1)
    both = nn.ModuleDict({"a": a, "b": b})
    every = list(both.parameters())
    for soft in (
        ps.soft_tie(a, b, norm="cosine", strength=0.5),
        ps.group_tie(both, ["*.0.weight", "*.2.bias"], norm="l2", strength={"*.0.weight": 1.0, "*.2.bias": 3.0}),
        ps.anchor(a, b, norm="huber", delta=0.1),
    ):
        compiled = torch.compile(soft, backend="aot_eager", fullgraph=True)
        both.zero_grad()
        v = compiled()
        v.backward()
        grads = [None if p.grad is None else p.grad.clone() for p in every]
        both.zero_grad()
        e = soft()
        e.backward()
        assert torch.allclose(v, e)
        assert all((g is None and p.grad is None) or torch.allclose(g, p.grad, atol=1e-7) for g, p in zip(grads, every))
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ---- the module ------------------------------------------------------------------------------------
def test_softtie_module_basics():
    a, b = mlp(0), mlp(1)
    soft = ps.soft_tie(a, b, norm="huber", delta=0.5)
    assert isinstance(soft, nn.Module) and list(soft.parameters()) == []
    assert "norm='huber'" in repr(soft) and "terms=4" in repr(soft)
    assert soft.state_dict() == {}  # nothing of the models' is saved with it
    anchored = ps.anchor(a).to(torch.float64)
    assert anchored.ref_0.dtype == torch.float64
    assert math.isfinite(ps.soft_tie(a, b)().item())
    pair = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    soft = ps.group_tie(pair, ["*.weight"])
    assert len(ps.harden(pair, soft, threshold=float("inf"))) == 1
    assert soft.names == [] and soft().item() == 0.0 and soft.distances() == {}


def test_benchmark_loop_peer_matches_formulas():
    """The benchmark's Python-loop peer computes the same penalties (so its ratios compare like with like)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("soft_bench", Path(__file__).parents[1] / "benchmarks" / "soft_tie.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a, b = mlp(0), mlp(1)
    for norm in NORMS:
        want = ps.soft_tie(a, b, norm=norm, strength=0.1)().item()
        assert bench.loop_penalty(norm, list(a.parameters()), list(b.parameters()), 0.1).item() == pytest.approx(want, rel=1e-5)
