"""Template banks (ps.template_share), the bank kind's forms, and ps.materialize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.kinds.bank import Bank
from paramshare.kinds.delta import Delta


def stack(n: int = 4, d: int = 12, seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Linear(d, d) for _ in range(n))


def blocks(n: int = 4, d: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(d, 2 * d), nn.Tanh(), nn.Linear(2 * d, d)) for _ in range(n)])


def x_in(d: int = 12, n: int = 5) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(3))


def weights(layers) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([layer.weight.detach().clone() for layer in layers])


# ---- template_share -------------------------------------------------------------------------------
def test_templates_equal_to_layers_reproduce_every_layer_exactly():
    s = stack()
    x = x_in()
    before = [layer(x) for layer in s]
    ps.template_share(s, templates=4)
    for layer, y in zip(s, before):
        assert isinstance(layer.parametrizations.weight[0], Bank)
        assert torch.equal(layer(x), y)
    r = ps.report(s)
    assert r.unique_params == 4 * 144 + 4 * 4 + 4 * 12  # templates, coefficients, biases
    # negative: fewer templates than layers cannot reproduce random layers
    t = stack()
    ps.template_share(t, templates=3)
    assert not all(torch.allclose(layer(x), y, atol=1e-4) for layer, y in zip(t, before))


def test_one_template_is_full_sharing_up_to_a_scale():
    s = stack()
    w0 = weights(s)
    flat = w0.reshape(4, -1)
    ratio = flat[1] / flat[0]
    assert not torch.allclose(ratio, ratio[0].expand_as(ratio))  # negative: independent layers
    ps.template_share(s, templates=1)
    w = weights(s).reshape(4, -1)
    tmpl = s[0].parametrizations.weight.original[0].reshape(-1)
    for i in range(4):
        c = s[i].parametrizations.weight[0].coeff
        assert c.shape == (1,)
        torch.testing.assert_close(w[i], c * tmpl)
    assert len({id(layer.parametrizations.weight.original) for layer in s}) == 1


def test_lstsq_is_the_best_rank_t_fit_across_layers():
    s = stack(6)
    w0 = weights(s).reshape(6, -1).double()
    sv = torch.linalg.svdvals(w0)
    for t in (1, 3):
        m = stack(6)
        ps.template_share(m, templates=t)
        err = (weights(m).reshape(6, -1).double() - w0).square().sum()
        torch.testing.assert_close(err, sv[t:].square().sum(), rtol=1e-4, atol=1e-6)


def test_glob_params_inside_blocks_make_one_bank_per_matched_name():
    b = blocks()
    x = torch.randn(3, 8)
    y = b(x)
    ps.template_share(b, templates=4, params=("*.weight",))
    groups = ps.find_ties(b)
    assert [g.kind for g in groups] == ["bank", "bank"]
    assert groups[0].members == tuple(f"{i}.0.weight" for i in range(4))
    assert groups[1].members == tuple(f"{i}.2.weight" for i in range(4))
    torch.testing.assert_close(b(x), y, rtol=0, atol=0)
    # biases were not matched: still plain, independent parameters
    assert all(type(blk[0].bias) is nn.Parameter for blk in b)


def test_random_init_starts_fresh_with_unit_coefficients():
    s = stack()
    w0 = weights(s)
    ps.template_share(s, templates=2, init="random")
    c = torch.stack([layer.parametrizations.weight[0].coeff.detach() for layer in s])
    torch.testing.assert_close(c.norm(dim=1), torch.ones(4))
    w = weights(s)
    assert not torch.allclose(w, w0, atol=1e-2)  # not fitted to the old weights
    assert 0.02 < w.std() < 1.0  # on the scale of nn.Linear's initialisation


def test_banks_train_templates_and_coefficients():
    s = stack()
    ps.template_share(s, templates=2)
    x = x_in()
    loss = sum(layer(x).square().sum() for layer in s)
    loss.backward()
    tmpl = s[0].parametrizations.weight.original
    assert tmpl.grad is not None and tmpl.grad.abs().sum() > 0
    for layer in s:
        assert layer.parametrizations.weight[0].coeff.grad.abs().sum() > 0
    names = [n for n, _ in s.named_parameters()]
    assert sum(n.endswith("original") for n in names) == 1  # the optimizer sees the templates once


def test_template_share_on_a_plain_list_of_modules():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    model = nn.ModuleDict({"a": a, "b": b})
    ps.template_share([model["a"], model["b"]], templates=1)
    (g,) = ps.find_ties(model)
    assert g.kind == "bank" and g.members == ("a.weight", "b.weight") and g.source == "a.parametrizations.weight.original"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"templates": 0}, "out of range"),
        ({"templates": 5}, "between 1 and 4"),
        ({"templates": True}, "integer"),
        ({"templates": 2, "params": ("nope",)}, "matches no parameter"),
        ({"templates": 2, "params": ()}, "non-empty"),
        ({"templates": 2, "init": "svd"}, "init must be"),
    ],
)
def test_template_share_bad_input_leaves_layers_unchanged(kwargs, match, unchanged):
    s = stack()
    with unchanged(s), pytest.raises(ps.SharingError, match=match):
        ps.template_share(s, **kwargs)


def test_template_share_refuses_different_or_computed_layers(unchanged):
    torch.manual_seed(0)
    mixed = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 5)])
    with unchanged(mixed), pytest.raises(ps.SharingError, match=r"\(4, 4\) in layer 0 but \(5, 4\) in layer 1"):
        ps.template_share(mixed, templates=1)
    s = stack()
    ps.template_share([s[0], s[1]], templates=1)
    with unchanged(s), pytest.raises(ps.SharingError, match="computed by a parametrization"):
        ps.template_share(s, templates=2)
    same = stack(2)
    with unchanged(same), pytest.raises(ps.SharingError, match="same module object"):
        ps.template_share([same[0], same[0]], templates=1)
    with pytest.raises(ps.SharingError, match="list of modules"):
        ps.template_share(nn.Linear(3, 3), templates=1)


# ---- the bank kind's forms, plans and checkpoints ---------------------------------------------------
def _fresh_and_loaded(make, share, path):
    m = share(make())
    ps.save(m, path)
    fresh = make()
    assert ps.find_ties(fresh) == []  # negative: built untied
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    return m, fresh


@pytest.mark.parametrize(
    "share",
    [
        lambda m: ps.template_share(m, templates=2, params=("*.weight",)),
        lambda m: ps.basis_share(m, ["*.0.weight", "*.2.weight"], ratio=0.4, group_size=3),
        lambda m: ps.relax(ps.share_layers(m, unique=2, strategy="cycle"), rank=2),
        lambda m: ps.relax(ps.share_layers(m, unique=2, strategy="cycle"), rank=2, names="[01].0.weight"),
    ],
    ids=["mix", "basis", "delta", "delta-on-alias"],
)
def test_checkpoint_round_trip_into_a_fresh_model(share, tmp_path):
    m, fresh = _fresh_and_loaded(blocks, share, tmp_path / "m.safetensors")
    x = torch.randn(3, 8)
    assert ps.find_ties(fresh) == ps.find_ties(m)
    assert ps.check(fresh, ps.plan(m)) == []
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    ck = ps.read(tmp_path / "m.safetensors")
    r = ps.report(m)
    assert ck.stored_bytes == r.unique_bytes < r.total_bytes  # every stored tensor once, nothing else


def test_report_counts_bank_and_delta_storage_exactly():
    b = blocks()
    ps.basis_share(b, "*.0.weight", rank=5, group_size=2)
    r = ps.report(b)
    rows = {row.group.members[0]: row.stats for row in r.rows}
    st = rows["0.0.weight"]
    assert st.uses == 2 and st.used_numel == 2 * 16 * 8
    assert st.stored_numel == 5 * 8 + 2 * 16 * 5  # basis (k, in) + coefficients (out, k) per layer
    assert st.saved_bytes == (2 * 16 * 8 - st.stored_numel) * 4
    assert r.saved_bytes == sum(row.stats.saved_bytes for row in r.rows)
    assert "rank-5 basis" in str(r)


def test_apply_plan_keeps_values_when_only_the_ties_were_broken():
    m = blocks()
    ps.template_share(m, templates=2, params=("*.weight",))
    p = ps.plan(m)
    x = torch.randn(3, 8)
    broken = blocks(seed=1)
    ps.template_share(broken, templates=2, params=("*.weight",))
    broken.load_state_dict(m.state_dict(), assign=True)
    assert ps.check(broken, p) != []
    ps.apply_plan(broken, p)
    assert ps.check(broken, p) == []
    torch.testing.assert_close(broken(x), m(x), rtol=0, atol=0)


def test_apply_plan_rejects_a_plan_that_does_not_fit(unchanged):
    m = blocks()
    ps.template_share(m, templates=2, params=("*.weight",))
    p = ps.plan(m)
    other = nn.Sequential(*[nn.Sequential(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 8)) for _ in range(4)])
    with unchanged(other), pytest.raises(ps.SharingError, match=r"has shape \(3, 8\) but the bank .* makes \(16, 8\)"):
        ps.apply_plan(other, p)
    d = p.to_dict()
    d["groups"][0]["options"]["form"] = "spiral"
    with unchanged(other), pytest.raises(ps.SharingError, match="unknown form 'spiral'"):
        ps.apply_plan(other, d)


# ---- materialize ------------------------------------------------------------------------------------
def test_materialize_gives_plain_parameters_with_identical_outputs():
    m = blocks()
    ps.basis_share(m, "*.0.weight", ratio=0.5)
    ps.relax(ps.tie(m, "0.2.weight", "1.2.weight", "2.2.weight", "3.2.weight"), rank=2)
    assert sorted({g.kind for g in ps.find_ties(m)}) == ["bank", "delta"]
    x = torch.randn(3, 8)
    y = m(x)
    assert ps.report(m).saved_bytes > 0
    ps.materialize(m)
    assert ps.find_ties(m) == []
    assert all(type(p) is nn.Parameter for p in m.parameters())
    assert ps.report(m).saved_bytes == 0
    assert torch.equal(m(x), y)


def test_materialize_some_members_keeps_the_bank_for_the_rest():
    s = stack()
    ps.template_share(s, templates=2)
    x = x_in()
    y = [layer(x) for layer in s]
    ps.materialize(s, "0.weight", "2.weight")
    (g,) = ps.find_ties(s)
    assert g.members == ("1.weight", "3.weight") and g.source == "1.parametrizations.weight.original"
    assert all(torch.equal(layer(x), yy) for layer, yy in zip(s, y))
    delta = ps.relax(ps.share_layers(stack(), unique=1, strategy="all"), rank=2)
    xd = x_in()
    yd = delta[3](xd)
    ps.materialize(delta, "3.weight")
    assert type(delta[3].weight) is nn.Parameter and torch.equal(delta[3](xd), yd)
    assert isinstance(delta[0].parametrizations.weight[0], Delta)


def test_materialize_bad_names_leave_the_model_unchanged(unchanged):
    s = stack()
    ps.template_share([s[0], s[1]], templates=1)
    with unchanged(s), pytest.raises(ps.SharingError, match="'2.weight' is a plain parameter, not a bank or delta"):
        ps.materialize(s, "0.weight", "2.weight")
    with unchanged(s), pytest.raises(ps.SharingError, match="unknown parameter"):
        ps.materialize(s, "9.weight")
    plain = stack()
    with unchanged(plain):
        ps.materialize(plain)  # nothing to do


def test_untie_turns_banks_into_plain_parameters_too():
    s = stack()
    ps.template_share(s, templates=2)
    x = x_in()
    y = s[2](x)
    ps.untie(s)
    assert ps.find_ties(s) == [] and torch.equal(s[2](x), y)
