"""Hard ties: tie, tie_modules, untie, find_ties, plan, apply_plan, check."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, snapshot
from torch import nn
from torch.nn.utils import parametrize

import paramshare as ps


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class TinyLM(nn.Module):
    def __init__(self, vocab=50, d=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        return self.head(torch.tanh(self.body(self.embed(tokens))))


class AE(nn.Module):
    def __init__(self, n=12, h=5):
        super().__init__()
        self.enc = nn.Linear(n, h)
        self.dec = nn.Linear(h, n)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


# ---- tie: alias ---------------------------------------------------------------------------
def test_tie_alias_is_the_same_parameter_and_keeps_source_value():
    m = TinyLM()
    src = m.embed.weight.detach().clone()
    assert not same_storage(m.embed.weight, m.head.weight)  # negative first
    out = ps.tie(m, "embed.weight", "head.weight")
    assert out is m
    assert m.head.weight is m.embed.weight
    assert torch.equal(m.embed.weight, src)
    assert len(list(m.parameters())) == 3  # embed, body.weight, body.bias
    assert [g.members for g in ps.find_ties(m)] == [("embed.weight", "head.weight")]


def test_gradient_of_alias_is_sum_of_uses_against_explicit_model():
    torch.manual_seed(0)
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    tokens = torch.randint(0, 50, (3, 7))
    m(tokens).logsumexp(-1).sum().backward()

    # the same math written by hand, with one tensor used twice
    w = m.embed.weight.detach().clone().requires_grad_()
    bw = m.body.weight.detach().clone().requires_grad_()
    bb = m.body.bias.detach().clone().requires_grad_()
    h = torch.tanh(F.linear(F.embedding(tokens, w), bw, bb))
    F.linear(h, w).logsumexp(-1).sum().backward()
    torch.testing.assert_close(m.embed.weight.grad, w.grad)
    torch.testing.assert_close(m.body.weight.grad, bw.grad)

    # and it differs from either use alone (the sum is not a single use's gradient)
    w2 = w.detach().clone().requires_grad_()
    F.linear(torch.tanh(F.linear(F.embedding(tokens, w.detach()), bw.detach(), bb.detach())), w2).logsumexp(-1).sum().backward()
    assert not torch.allclose(w2.grad, w.grad)


def test_one_optimizer_step_moves_every_use_together():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 3
    before = m.head.weight.detach().clone()
    m(torch.randint(0, 50, (2, 5))).sum().backward()
    opt.step()
    assert not torch.equal(m.head.weight, before)
    assert torch.equal(m.head.weight, m.embed.weight)
    assert len(opt.state) == 3  # one Adam state per stored tensor


# ---- tie: transpose -----------------------------------------------------------------------
def test_tie_transpose_reads_source_transposed_without_copy():
    m = AE()
    ps.tie(m, "enc.weight", "dec.weight", transpose=True)
    assert m.dec.weight.shape == (12, 5)
    assert torch.equal(m.dec.weight, m.enc.weight.T)
    assert same_storage(m.dec.weight, m.enc.weight)
    assert isinstance(m.dec, nn.Linear) and parametrize.is_parametrized(m.dec, "weight")
    assert [n for n, _ in m.named_parameters()] == ["enc.weight", "enc.bias", "dec.bias"]
    g = ps.find_ties(m)
    assert g == [ps.TieGroup("transpose", "enc.weight", ("dec.weight",), (5, 12))]


def test_transpose_gradient_matches_hand_written():
    torch.manual_seed(0)
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    x = torch.randn(4, 12)
    (m(x) - x).square().sum().backward()
    W = m.enc.weight.detach().clone().requires_grad_()
    b1, b2 = m.enc.bias.detach(), m.dec.bias.detach()
    (F.linear(torch.tanh(F.linear(x, W, b1)), W.t(), b2) - x).square().sum().backward()
    torch.testing.assert_close(m.enc.weight.grad, W.grad)


def test_transposed_assignment_writes_the_source():
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    new = torch.randn(12, 5)
    m.dec.weight = new
    assert torch.equal(m.enc.weight, new.T)
    assert torch.equal(m.dec.weight, new)


def test_tie_transposed_of_transposed_becomes_alias():
    m = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(4, 3), "c": nn.Linear(3, 4)})
    ps.tie(m, "a.weight", "b.weight", transpose=True)
    ps.tie(m, "b.weight", "c.weight", transpose=True)  # (a.T).T is a
    assert m["c"].weight is m["a"].weight
    kinds = sorted(g.kind for g in ps.find_ties(m))
    assert kinds == ["alias", "transpose"]


def test_retie_moves_target_and_leaves_others():
    m = nn.ModuleDict({k: nn.Linear(4, 4) for k in "abc"})
    ps.tie(m, "a.weight", "b.weight")
    ps.tie(m, "c.weight", "b.weight")  # re-tie b to c
    assert m["b"].weight is m["c"].weight
    assert m["a"].weight is not m["b"].weight
    ps.tie(m, "a.weight", "c.weight", transpose=True)
    ps.tie(m, "b.weight", "c.weight")  # a transposed target re-tied as an alias
    assert m["c"].weight is m["b"].weight
    assert not parametrize.is_parametrized(m["c"])
    assert type(m["c"]) is nn.Linear


def test_tie_several_targets_at_once():
    m = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
    ps.tie(m, "0.weight", "1.weight", "2.weight", "3.weight")
    assert len({id(layer.weight) for layer in m}) == 1
    assert ps.report(m).unique_params == 16 + 4 * 4


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("embed.weigth", "head.weight"), {}, "did you mean 'embed.weight'"),
        (("embed.weight", "head.wieght"), {}, "did you mean 'head.weight'"),
        (("embed.weight", "body.weight"), {}, "shapes differ"),
        (("embed.weight", "embed.weight"), {}, "to itself"),
        (("embed.weight",), {}, "at least one target"),
        (("embed.weight", "head.weight", "head.weight"), {}, "listed twice"),
        (("embed.weight", "head.weight"), {"transpose": True}, "drop transpose=True"),
        (("body.bias", "body.weight"), {"transpose": True}, "fewer than 2 dimensions"),
        (("embed.weight", "head.weight"), {"transpose": "yes"}, "True or False"),
    ],
)
def test_tie_bad_input_clear_error_and_model_unchanged(args, kwargs, message):
    m = TinyLM()
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match=message):
        ps.tie(m, *args, **kwargs)
    assert_unchanged(m, before)


def test_shape_error_names_both_shapes_and_suggests_transpose():
    m = AE()
    before = snapshot(m)
    with pytest.raises(ps.SharingError) as e:
        ps.tie(m, "enc.weight", "dec.weight")
    msg = str(e.value)
    assert "(12, 5)" in msg and "(5, 12)" in msg and "pass transpose=True" in msg
    assert isinstance(e.value, ValueError)
    assert_unchanged(m, before)


def test_dtype_and_device_mismatch():
    m = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4).double()})
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match=r"\(torch.float64\).*dtypes differ"):
        ps.tie(m, "a.weight", "b.weight")
    assert_unchanged(m, before)
    m2 = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4, device="meta")})
    with pytest.raises(ps.SharingError, match="devices differ"):
        ps.tie(m2, "a.weight", "b.weight")


def test_buffer_and_parametrization_internals_are_not_parameters():
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ps.SharingError, match="is a buffer"):
        ps.tie(m, "1.running_mean", "0.bias")
    ae = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    with pytest.raises(ps.SharingError, match="stored tensor of a parametrization"):
        ps.tie(ae, "dec.parametrizations.weight.original", "enc.weight")


def test_cannot_tie_a_source_to_its_own_transpose():
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match="point at itself"):
        ps.tie(m, "dec.weight", "enc.weight", transpose=False)
    assert_unchanged(m, before)


def test_foreign_parametrization_is_refused():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    m = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    parametrize.register_parametrization(m["b"], "weight", Double())
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match="Double"):
        ps.tie(m, "a.weight", "b.weight")
    with pytest.raises(ps.SharingError, match="Double"):
        ps.tie(m, "b.weight", "a.weight")
    assert_unchanged(m, before)


def test_not_a_module():
    with pytest.raises(ps.SharingError, match="nn.Module"):
        ps.tie({"a": 1}, "a", "b")


# ---- tie_modules --------------------------------------------------------------------------
def test_tie_modules_aliases_every_parameter_and_copies_inner_structure():
    net = nn.ModuleDict({k: nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 6)) for k in "abc"})
    ps.tie(net, "a.0.weight", "a.1.weight", transpose=True)  # a tied autoencoder inside 'a'
    assert net["b"][0].weight is not net["a"][0].weight
    ps.tie_modules(net, "a", "b", "c")
    for k in "bc":
        assert net[k][0].weight is net["a"][0].weight
        assert net[k][0].bias is net["a"][0].bias
        assert net[k][1].bias is net["a"][1].bias
        assert torch.equal(net[k][1].weight, net["a"][0].weight.T)
    r = ps.report(net)
    assert r.unique_params == 6 * 3 + 3 + 6
    assert r.total_params == 3 * (2 * 18 + 3 + 6)


def test_tie_modules_structure_mismatch_lists_differences():
    net = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 5), "c": nn.Linear(4, 4, bias=False)})
    before = snapshot(net)
    with pytest.raises(ps.SharingError, match=r"'weight' is \(4, 4\) in 'a' but \(5, 4\) in 'b'"):
        ps.tie_modules(net, "a", "b")
    with pytest.raises(ps.SharingError, match="has no parameter 'bias'"):
        ps.tie_modules(net, "a", "c")
    with pytest.raises(ps.SharingError, match="did you mean 'a'"):
        ps.tie_modules(net, "aa", "b")
    with pytest.raises(ps.SharingError, match="to itself"):
        ps.tie_modules(net, "a", "a")
    with pytest.raises(ps.SharingError, match="at least one target"):
        ps.tie_modules(net, "a")
    assert_unchanged(net, before)


def test_tie_modules_refuses_nested_modules():
    net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    with pytest.raises(ps.SharingError, match="contains"):
        ps.tie_modules(net, "0", "0.0")


# ---- untie --------------------------------------------------------------------------------
def test_untie_one_name_keeps_others_sharing_and_the_original_object():
    m = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    ps.tie(m, "0.weight", "1.weight", "2.weight")
    original = m[0].weight
    ps.untie(m, "1.weight")
    assert m[0].weight is original and m[2].weight is original
    assert m[1].weight is not original and torch.equal(m[1].weight, original)
    assert not same_storage(m[1].weight, original)


def test_untie_all_first_user_keeps_the_object_so_the_optimizer_still_steps_it():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    original = m.embed.weight
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    ps.untie(m)
    assert ps.find_ties(m) == []
    assert m.embed.weight is original
    assert m.head.weight is not original
    m(torch.randint(0, 50, (2, 3))).sum().backward()
    before = original.detach().clone()
    opt.step()
    assert not torch.equal(original, before)


def test_untie_transposed_becomes_plain_parameter():
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    ps.untie(m, "dec.weight")
    assert type(m.dec) is nn.Linear and not parametrize.is_parametrized(m.dec)
    assert isinstance(m.dec.weight, nn.Parameter)
    assert torch.equal(m.dec.weight, m.enc.weight.T) and m.dec.weight.is_contiguous()
    assert not same_storage(m.dec.weight, m.enc.weight)
    assert ps.find_ties(m) == []
    assert ps.report(m).unique_params == ps.report(AE()).unique_params


def test_untie_source_name_dissolves_pair_and_untied_name_is_noop():
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    ps.untie(m, "enc.weight")
    assert ps.find_ties(m) == []
    assert torch.equal(m.dec.weight, m.enc.weight.T)
    before = snapshot(m)
    ps.untie(m, "enc.bias")  # shares nothing: nothing to do
    assert_unchanged(m, before)


def test_untie_unknown_name():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    before = snapshot(m)
    with pytest.raises(ps.SharingError, match="did you mean 'head.weight'"):
        ps.untie(m, "head.weigh")
    assert_unchanged(m, before)


# ---- find_ties ----------------------------------------------------------------------------
def test_find_ties_storage_sharing_and_views():
    flat = torch.randn(32)
    m = nn.ModuleDict({"a": nn.Linear(4, 4, bias=False), "b": nn.Linear(4, 4, bias=False), "c": nn.Linear(4, 4, bias=False)})
    # two distinct Parameters over the same storage view: tied (same memory)
    m["a"].weight = nn.Parameter(flat[:16].view(4, 4))
    m["b"].weight = nn.Parameter(flat[:16].view(4, 4))
    # a non-overlapping view of the same storage: not tied
    m["c"].weight = nn.Parameter(flat[16:].view(4, 4))
    groups = ps.find_ties(m)
    assert [g.members for g in groups] == [("a.weight", "b.weight")]
    p = ps.plan(m)
    problems = ps.check(m, p)
    assert len(problems) == 1 and "different nn.Parameter" in problems[0]
    ps.apply_plan(m, p)
    assert m["a"].weight is m["b"].weight and ps.check(m, p) == []
    r = ps.report(m)
    assert r.unique_params == 32  # the whole flat storage, each byte once


def test_find_ties_sees_repeated_module_objects():
    block = nn.Linear(4, 4)
    stack = nn.ModuleList([block] * 3)
    groups = ps.find_ties(stack)
    assert [g.members for g in groups] == [("0.weight", "1.weight", "2.weight"), ("0.bias", "1.bias", "2.bias")]
    r = ps.report(stack)
    assert (r.total_params, r.unique_params) == (60, 20)


def test_find_ties_order_is_deterministic():
    def build():
        torch.manual_seed(0)
        m = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))
        ps.tie(m, "5.weight", "1.weight")
        ps.tie(m, "0.weight", "3.weight", transpose=True)
        ps.tie(m, "2.bias", "4.bias", "0.bias")
        return m

    a, b = ps.find_ties(build()), ps.find_ties(build())
    assert a == b
    assert [g.kind for g in a] == ["alias", "alias", "transpose"]
    assert a[0].members == ("0.bias", "2.bias", "4.bias")


# ---- plan / apply_plan / check ------------------------------------------------------------
def test_plan_json_is_readable_and_versioned():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    d = ps.plan(m).to_dict()
    assert d == {
        "format": "paramshare.plan",
        "version": 1,
        "groups": [{"kind": "alias", "source": "embed.weight", "members": ["embed.weight", "head.weight"], "shape": [50, 8]}],
    }


def test_apply_plan_from_json_string_and_dict():
    p = ps.plan(ps.tie(TinyLM(), "embed.weight", "head.weight"))
    for form in (p.to_json(), p.to_dict()):
        fresh = ps.apply_plan(TinyLM(), form)
        assert fresh.head.weight is fresh.embed.weight


def test_apply_plan_keeps_source_value():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    fresh = TinyLM()
    src = fresh.embed.weight.detach().clone()
    ps.apply_plan(fresh, ps.plan(m))
    assert torch.equal(fresh.head.weight, src)


def test_apply_plan_bad_plans_list_all_problems_and_leave_model_unchanged():
    m = ps.tie(TinyLM(), "embed.weight", "head.weight")
    good = ps.plan(m).to_dict()
    target = TinyLM()
    before = snapshot(target)

    bad_names = {**good, "groups": [{"kind": "alias", "source": "embed.weight", "members": ["embed.weight", "haed.weight", "x.y"]}]}
    with pytest.raises(ps.SharingError) as e:
        ps.apply_plan(target, bad_names)
    assert "'haed.weight' does not exist" in str(e.value) and "did you mean 'head.weight'" in str(e.value)
    assert "'x.y' does not exist" in str(e.value)

    bad_shape = {**good, "groups": [{"kind": "alias", "source": "embed.weight", "members": ["embed.weight", "body.weight"]}]}
    with pytest.raises(ps.SharingError, match=r"shape \(8, 8\)"):
        ps.apply_plan(target, bad_shape)

    plan_shape = {**good, "groups": [dict(good["groups"][0], shape=[51, 8])]}
    with pytest.raises(ps.SharingError, match=r"the plan says \(51, 8\)"):
        ps.apply_plan(target, plan_shape)

    twice = {**good, "groups": [good["groups"][0], {"kind": "transpose", "source": "body.weight", "members": ["head.weight"]}]}
    with pytest.raises(ps.SharingError):
        ps.apply_plan(target, twice)

    with pytest.raises(ps.SharingError, match="unknown sharing kind 'mystery'"):
        ps.apply_plan(target, {**good, "groups": [{"kind": "mystery", "source": "a", "members": ["a"]}]})
    with pytest.raises(ps.SharingError, match="not valid JSON"):
        ps.apply_plan(target, "{not json")
    with pytest.raises(ps.SharingError, match="newer"):
        ps.apply_plan(target, {**good, "version": 99})
    with pytest.raises(ps.SharingError, match="expected a SharingPlan"):
        ps.apply_plan(target, 42)
    assert_unchanged(target, before)


def test_check_reports_missing_shape_change_and_extra_ties():
    p = ps.plan(ps.tie(TinyLM(), "embed.weight", "head.weight"))
    other = TinyLM(vocab=60)
    problems = ps.check(other, p)
    assert any("(60, 8)" in s and "(50, 8)" in s for s in problems)
    assert any("no longer shares storage" in s for s in problems)

    class Smaller(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)

    assert "missing parameter 'head.weight'" in ps.check(Smaller(), p)
    extra = ps.tie(TinyLM(), "embed.weight", "head.weight")
    empty_plan = ps.plan(TinyLM())
    assert any("tie the plan does not" in s for s in ps.check(extra, empty_plan))
    assert ps.check(extra, p) == []


def test_ties_survive_torch_compile_forward_and_backward():
    torch.manual_seed(0)
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    ref = copy.deepcopy(m)
    x = torch.randn(8, 12)
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(out, ref(x))
    torch.testing.assert_close(m.enc.weight.grad, ref.enc.weight.grad)
    assert ps.check(m, ps.plan(ref)) == []


def test_pickled_transposed_model_repickles():
    m = ps.tie(AE(), "enc.weight", "dec.weight", transpose=True)
    twice = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(m))))
    assert ps.find_ties(twice) == ps.find_ties(m)
    assert isinstance(twice.dec, nn.Linear)
