"""Basis sharing (ps.basis_share): exactness limits, optimality, calibration, Hugging Face BERT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.basis import _calibrate
from paramshare.kinds.bank import Bank, basis_spectrum, fit_basis


def mlp(n: int = 4, d: int = 16, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(d, d) for _ in range(n)])


def ws(m) -> list[torch.Tensor]:
    return [layer.weight.detach().clone() for layer in m]


def test_full_rank_reproduces_the_weights():
    m = mlp()
    w = ws(m)
    ps.basis_share(m, "*.weight", rank=16, group_size=2)  # rank of 2 stacked 16x16 weights: 16
    for layer, wi in zip(m, w):
        assert isinstance(layer.parametrizations.weight[0], Bank)
        torch.testing.assert_close(layer.weight.detach(), wi, rtol=1e-5, atol=1e-5)
    # negative: one rank less is not exact
    low = mlp()
    ps.basis_share(low, "*.weight", rank=15, group_size=2)
    assert not all(torch.allclose(layer.weight, wi, atol=1e-4) for layer, wi in zip(low, w))


def test_uncalibrated_basis_is_the_best_rank_k_fit_of_the_stacked_weights():
    m = mlp()
    w = ws(m)
    ps.basis_share(m, "*.weight", rank=5, group_size=2)
    for g in (0, 2):
        stacked = torch.cat([w[g], w[g + 1]]).double()
        tail = torch.linalg.svdvals(stacked)[5:].square().sum()
        err = sum((m[i].weight.detach() - w[i]).double().square().sum() for i in (g, g + 1))
        torch.testing.assert_close(err, tail, rtol=1e-4, atol=1e-6)
    assert m[0].parametrizations.weight.original is m[1].parametrizations.weight.original
    assert m[0].parametrizations.weight.original is not m[2].parametrizations.weight.original


@pytest.mark.parametrize("ratio", [0.2, 0.5, 0.8])
def test_ratio_removes_at_least_that_share_with_the_largest_rank(ratio):
    m = mlp(n=5, d=12)
    ps.basis_share(m, "*.weight", ratio=ratio, group_size=2)  # groups of 2, 2 and 1
    sizes = []
    for g in ps.find_ties(m):
        n = len(g.members)
        k = g.shape[0]
        kept = k * (12 + n * 12)
        assert kept <= (1 - ratio) * n * 144 < (k + 1) * (12 + n * 12)
        sizes.append(n)
    assert sizes == [2, 2, 1]


def test_pattern_list_makes_one_family_per_glob():
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 8)) for _ in range(4)])
    ps.basis_share(m, ["*.0.weight", "*.2.weight"], ratio=0.3)
    groups = ps.find_ties(m)
    assert sorted(g.members for g in groups) == [("0.0.weight", "1.0.weight"), ("0.2.weight", "1.2.weight"),
                                                 ("2.0.weight", "3.0.weight"), ("2.2.weight", "3.2.weight")]
    for g in groups:  # bases span each family's inputs
        assert g.shape[1:] == ((8,) if g.members[0].endswith(".0.weight") else (24,))


def _correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(1, -2, d)  # strongly anisotropic inputs, as real activations are
    mix = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]  # one distribution
    return (torch.randn(n, d, generator=g) * scale) @ mix.T


class Parallel(nn.Module):
    """Four projections of one input (as query, key and value are)."""

    def __init__(self, d: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.heads = nn.ModuleList(nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return torch.cat([h(x) for h in self.heads], dim=-1)


def test_calibration_measurably_improves_output_fidelity():
    cal = _correlated_inputs(512, 16, seed=1)
    held_out = _correlated_inputs(512, 16, seed=2)

    def rel_err(calibration):
        m = Parallel()
        with torch.no_grad():
            ref = m(held_out)
            ps.basis_share(m, "*.weight", ratio=0.5, calibration=calibration)
            return ((m(held_out) - ref).norm() / ref.norm()).item()

    plain = rel_err(None)
    calibrated = rel_err([cal[:256], cal[256:]])
    assert calibrated < 0.5 * plain


def test_fit_basis_minimises_the_sensitivity_weighted_whitened_error():
    # one layer: the weighted, whitened truncated SVD is the optimum of ||D (W - W') S||
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 16, generator=g, dtype=torch.float64)
    x = _correlated_inputs(256, 16, seed=1).double()
    d = torch.rand(10, generator=g, dtype=torch.float64) + 0.1
    gram = x.T @ x
    t, (c,) = fit_basis([w], 4, "basis_in", [gram], [d])
    err = (d[:, None] * (x @ (c @ t - w).T).T).square().sum()
    evals, evecs = torch.linalg.eigh(gram)
    tail = torch.linalg.svdvals(d[:, None] * w @ (evecs * evals.clamp(min=0).sqrt()))[4:].square().sum()
    torch.testing.assert_close(err, tail, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(basis_spectrum([w], [gram], [d])[4:].square().sum(), tail, rtol=1e-4, atol=0)
    # negative: ignoring the weights is worse on the weighted error
    t0, (c0,) = fit_basis([w], 4, "basis_in", [gram])
    assert (d[:, None] * (x @ (c0 @ t0 - w).T).T).square().sum() > 1.01 * tail


def test_shared_basis_is_refined_for_layers_whose_inputs_differ():
    # two layers sharing a basis, their inputs with different correlations: the SVD whitens by
    # the summed Grams, the refinement fits each layer's own; it only ever lowers the error
    from paramshare.kinds.bank import BasisFactors

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(12, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [_correlated_inputs(256, 16, seed=1).double(), _correlated_inputs(256, 16, seed=7).double() * torch.linspace(0.2, 3, 16, dtype=torch.float64)]
    grams = [x.T @ x for x in xs]
    rows = [torch.rand(12, generator=g, dtype=torch.float64) + 0.1 for _ in range(2)]
    f = BasisFactors(ws, grams, rows)

    def direct(t, cs):  # the error written out: sum_i ||D_i (W_i - C_i B) X_i^T||^2
        return sum(float((r[:, None] * ((c @ t - w) @ x.T)).square().sum()) for r, c, w, x in zip(rows, cs, ws, xs))

    errors = []
    for steps in (0, 1, 3, 8):
        t, cs = f.fit(5, refine=steps)
        errors.append(direct(t, cs))
        assert f.error(t, cs) == pytest.approx(errors[-1], rel=1e-9)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors, errors[1:]))  # never worse
    assert errors[-1] < 0.97 * errors[0]  # and here clearly better
    assert f.fit(5)[0].shape == (5, 16)  # the default refines too
    torch.testing.assert_close(f.fit(5)[0], f.fit(5, refine=BasisFactors.REFINE_STEPS)[0])
    # equal Grams and no row weights: the SVD is already optimal, refinement changes ~nothing
    same = BasisFactors(ws, [grams[0], grams[0]])
    e0, e8 = same.error(*same.fit(5, refine=0)), same.error(*same.fit(5, refine=8))
    assert e8 == pytest.approx(e0, rel=1e-6)


def test_per_layer_grams_are_shrunk_toward_their_mean_by_the_calibration_size():
    from paramshare.kinds.bank import BasisFactors, _shrunk

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(40, 16, generator=g, dtype=torch.float64) * (i + 1) for i in range(3)]
    grams = [x.T @ x for x in xs]
    assert _shrunk(grams, None) is grams and _shrunk(grams[:1], 10) == grams[:1]  # nothing to pool
    shrunk = _shrunk(grams, 48)  # d = 16: alpha = 16 / 64 = 0.25
    mean = sum(grams) / 3
    for before, after in zip(grams, shrunk):
        torch.testing.assert_close(after, 0.75 * before + 0.25 * mean)
    torch.testing.assert_close(sum(shrunk), sum(grams))  # the summed whitening is unchanged
    assert _shrunk(grams, 0)[0].allclose(mean)  # no rows: the pooled estimate only
    ws = [torch.randn(12, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    plain, pooled = BasisFactors(ws, grams), BasisFactors(ws, grams, tokens=48)
    torch.testing.assert_close(plain.s, pooled.s)  # same SVD; only the per-layer fits change
    assert not torch.allclose(plain.fit(4)[1][0], pooled.fit(4)[1][0])


def test_calibration_records_input_moments_and_output_sensitivity():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    scale = torch.tensor([0.1, 1.0, 3.0, 0.0])
    model = nn.Sequential(lin, Scale(scale))
    x = torch.randn(4096, 8)
    stats = _calibrate(model, [x[:2048], x[2048:]], [ps._index.ModelIndex(model).uses["0.weight"]])
    st = stats["0.weight"]
    torch.testing.assert_close(st.gram, (x.double().T @ x.double()), rtol=1e-9, atol=1e-6)
    assert st.tokens == 4096
    d = (st.sens / st.tokens).sqrt()  # |d out / d y| per channel: the scale (zero stays zero)
    torch.testing.assert_close(d.float(), scale, rtol=0.05, atol=1e-6)


class Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, y):
        return y * self.s


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pattern": "*.weight", "ratio": 0.0}, "strictly between 0 and 1"),
        ({"pattern": "*.weight", "ratio": 1.0}, "strictly between 0 and 1"),
        ({"pattern": "*.weight", "ratio": True}, "strictly between 0 and 1"),
        ({"pattern": "*.weight", "ratio": 0.99}, "removes every parameter"),
        ({"pattern": "*.weight"}, "exactly one of ratio"),
        ({"pattern": "*.weight", "ratio": 0.5, "rank": 2}, "exactly one of ratio"),
        ({"pattern": "*.weight", "rank": 17}, r"rank at most 16; choose rank <= 16"),
        ({"pattern": "*.weight", "rank": 2, "group_size": 0}, "out of range"),
        ({"pattern": "*.wieght", "rank": 2}, "matches no parameter.*did you mean"),
        ({"pattern": ["*.weight", "0.*"], "rank": 2}, "matches both"),
        ({"pattern": "*", "rank": 2}, "different shapes"),
        ({"pattern": "*.bias", "rank": 2}, "2 or more dimensions"),
        ({"pattern": "*.weight", "rank": 2, "calibration": [torch.randn(3, 5)]}, "calibration batch 0 cannot run"),
        ({"pattern": "*.weight", "rank": 2, "calibration": []}, "no batches"),
        ({"pattern": "*.weight", "rank": 2, "calibration": ["text"]}, "is a str"),
    ],
)
def test_bad_input_leaves_the_model_unchanged(kwargs, match, unchanged):
    m = mlp()
    with unchanged(m), pytest.raises(ps.SharingError, match=match):
        ps.basis_share(m, **kwargs)


def test_calibration_restores_training_mode_and_refuses_unreached_or_conv_weights(unchanged):
    torch.manual_seed(0)
    m = nn.ModuleDict({"a": nn.Linear(6, 6), "b": nn.Linear(6, 6)})
    m.forward = lambda x: m["a"](x)  # "b" never runs
    m.train()
    with unchanged(m), pytest.raises(ps.SharingError, match="never reached 'b.weight'"):
        ps.basis_share(m, "*.weight", rank=2, calibration=[torch.randn(4, 6)])
    assert m.training and m["a"].training
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with unchanged(conv), pytest.raises(ps.SharingError, match="different shapes"):
        ps.basis_share(conv, "*.weight", rank=2)
    conv2 = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    with unchanged(conv2), pytest.raises(ps.SharingError, match="2-D weights"):
        ps.basis_share(conv2, "*.weight", rank=2, calibration=[torch.randn(1, 4, 9, 9)])
    ps.basis_share(conv2, "*.weight", rank=4)  # without calibration a conv basis is fine
    assert conv2(torch.randn(1, 4, 9, 9)).shape == (1, 4, 5, 5)


# ---- a Hugging Face BERT (built from a config: no download) --------------------------------------
def tiny_bert(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def bert_batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, 12), generator=g)
        mask = torch.ones(4, 12, dtype=torch.long)
        mask[:, 9:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_basis_share_on_hugging_face_bert_with_calibration_and_checkpoint(tmp_path):
    model = tiny_bert()
    families = [f"encoder.layer.?.{n}.weight" for n in ("attention.self.query", "attention.self.key",
                                                         "attention.self.value", "attention.output.dense",
                                                         "intermediate.dense", "output.dense")]
    ev = bert_batches(2, seed=9)
    with torch.no_grad():
        ref = [model(**b).last_hidden_state for b in ev]
    ps.basis_share(model, families, ratio=0.3, calibration=bert_batches(3, seed=1))
    groups = ps.find_ties(model)
    assert len(groups) == 12 and {g.kind for g in groups} == {"bank"}
    with torch.no_grad():
        out = [model(**b).last_hidden_state for b in ev]
    cos = torch.cat([nn.functional.cosine_similarity(a, b, dim=-1).flatten() for a, b in zip(out, ref)]).mean()
    assert 0.5 < cos < 1.0  # close to the original, not identical
    path = tmp_path / "bert.safetensors"
    ps.save(model, path)
    fresh = tiny_bert(seed=3)
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    with torch.no_grad():
        for b, o in zip(ev, out):
            torch.testing.assert_close(fresh(**b).last_hidden_state, o, rtol=0, atol=0)
    r = ps.report(model)
    linear = sum(math.prod(u.shape) for n, u in tiny_bert().named_parameters() if n.endswith("weight") and "encoder" in n and "LayerNorm" not in n)
    removed = (r.saved_params) / linear
    assert 0.3 <= removed < 0.4
