"""ps.nn seed modules: shapes, exact report counts, gradients summed over uses, untying, bad input."""

from __future__ import annotations

import copy
import doctest
import io
import math
import pickle

import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.nn import LocallyConnected1d, Recurrent, Siamese, TiedAutoencoder

from conftest import assert_unchanged, snapshot


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_ps_nn_is_reachable_and_does_not_shadow_torch_nn():
    import paramshare.nn
    import paramshare.tying

    assert ps.nn is paramshare.nn and ps.nn is not torch.nn
    assert paramshare.tying.nn is torch.nn  # library modules still see torch.nn
    assert "nn" in ps.__all__
    for name in ("LocallyConnected1d", "Siamese", "TiedAutoencoder", "Recurrent"):
        assert getattr(ps.nn, name).__module__ == "paramshare.nn"


def test_docstring_examples_run():
    result = doctest.testmod(ps.nn, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0


# ---- LocallyConnected1d -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cin,cout,k,length,stride,padding,bias",
    [(1, 25, 5, 40, 2, 1, True), (3, 4, 3, 10, 1, 0, True), (2, 5, 4, 9, 3, 2, False), (1, 1, 1, 1, 1, 0, True)],
)
def test_locally_connected_shapes_and_exact_counts(cin, cout, k, length, stride, padding, bias):
    lc = LocallyConnected1d(cin, cout, k, length, stride=stride, padding=padding, bias=bias)
    conv = nn.Conv1d(cin, cout, k, stride=stride, padding=padding, bias=bias)
    x = torch.randn(3, cin, length)
    out_len = (length + 2 * padding - k) // stride + 1
    assert lc.output_length == out_len
    assert lc(x).shape == conv(x).shape == (3, cout, out_len)
    assert lc(x[0]).shape == (cout, out_len)  # unbatched, as Conv1d allows
    assert torch.allclose(lc(x[0]), lc(x)[0], atol=1e-6)
    r = ps.report(lc)
    expected = out_len * (cout * cin * k + (cout if bias else 0))
    assert r.unique_params == r.total_params == expected
    assert r.unique_params == out_len * numel(conv)  # one conv's parameters per position
    assert r.groups == ()  # the independent-parameter layer shares nothing


def test_locally_connected_initialises_like_conv1d():
    torch.manual_seed(0)
    lc = LocallyConnected1d(4, 8, 3, 50)
    bound = 1 / math.sqrt(4 * 3)
    assert lc.weight.abs().max() <= bound and lc.bias.abs().max() <= bound
    assert lc.weight.abs().max() > 0.9 * bound
    assert not torch.equal(lc.weight[0], lc.weight[1])  # each position drawn independently


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 5, "stride": 2, "padding": 1},
        {"kernel_size": 3, "padding": "same"},
        {"kernel_size": 3, "padding": "valid"},
        {"kernel_size": 2, "stride": 2, "bias": False},
    ],
)
def test_from_conv_gives_identical_outputs_and_summed_gradients(kwargs):
    torch.manual_seed(1)
    conv = nn.Conv1d(3, 6, **kwargs)
    before = snapshot(conv)
    lc = LocallyConnected1d.from_conv(conv, input_length=21)
    assert_unchanged(conv, before)
    x = torch.randn(4, 3, 21)
    y_conv, y_lc = conv(x), lc(x)
    assert y_lc.shape == y_conv.shape
    torch.testing.assert_close(y_lc, y_conv, atol=1e-5, rtol=1e-5)
    # the convolution's gradient is the sum of the per-position gradients of its untied copy
    g = torch.randn_like(y_conv)
    (y_conv * g).sum().backward()
    (y_lc * g).sum().backward()
    torch.testing.assert_close(lc.weight.grad.sum(0), conv.weight.grad, atol=1e-5, rtol=1e-5)
    if conv.bias is not None:
        torch.testing.assert_close(lc.bias.grad.sum(0), conv.bias.grad, atol=1e-5, rtol=1e-5)
    # the positions are independent: changing one position's filters changes that output only
    with torch.no_grad():
        lc.weight[1] += 1.0
        y2 = lc(x)
    changed = (y2 != y_lc).any(dim=0).any(dim=0)
    assert changed.tolist() == [i == 1 for i in range(y_lc.shape[-1])]
    assert lc.weight.data_ptr() != conv.weight.data_ptr()


def test_from_conv_keeps_device_dtype_and_requires_grad():
    conv = nn.Conv1d(2, 3, 3).double()
    conv.weight.requires_grad_(False)
    lc = LocallyConnected1d.from_conv(conv, 10)
    assert lc.weight.dtype == torch.float64 and not lc.weight.requires_grad and lc.bias.requires_grad


@pytest.mark.parametrize(
    "conv,match",
    [
        (nn.Conv1d(4, 4, 3, groups=2), "groups=1"),
        (nn.Conv1d(2, 2, 3, dilation=2), "dilation=1"),
        (nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"), "zero padding"),
        (nn.Conv1d(2, 2, 4, padding="same"), "even kernel_size 4"),
        (nn.Conv2d(2, 2, 3), "needs an nn.Conv1d"),
        (nn.Linear(3, 3), "needs an nn.Conv1d"),
    ],
)
def test_from_conv_refuses_what_it_cannot_model(conv, match):
    before = snapshot(conv)
    with pytest.raises(ps.SharingError, match=match):
        LocallyConnected1d.from_conv(conv, 12)
    assert_unchanged(conv, before)


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((1, 2, 7, 4), {}, "kernel_size 7 is longer than the padded input"),
        ((0, 2, 3, 10), {}, "in_channels must be an integer >= 1, got 0"),
        ((1, 2, 3, 10), {"stride": 0}, "stride must be"),
        ((1, 2, 3, 10), {"padding": -1}, "padding must be an integer >= 0"),
        ((1, 2, 3.0, 10), {}, "kernel_size must be an integer"),
        ((1, 2, 3, True), {}, "input_length must be an integer"),
        ((1, 2, 3, 10), {"bias": 1}, "bias must be True or False"),
    ],
)
def test_locally_connected_bad_arguments(args, kwargs, match):
    with pytest.raises(ps.SharingError, match=match):
        LocallyConnected1d(*args, **kwargs)


def test_locally_connected_rejects_wrong_input_shape():
    lc = LocallyConnected1d(2, 3, 3, 10)
    lc(torch.randn(1, 2, 10))
    for bad in (torch.randn(1, 2, 11), torch.randn(1, 3, 10), torch.randn(2, 1, 2, 10)):
        with pytest.raises(ps.SharingError, match=r"expects input \(batch, 2, 10\)"):
            lc(bad)


# ---- Siamese ---------------------------------------------------------------------------------------
def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 4))


class Distance(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(4, 1)

    def forward(self, e1, e2):
        return self.scale((e1 - e2).abs()).squeeze(-1)


def test_siamese_shares_one_encoder_and_reports_it():
    enc = _encoder()
    net = Siamese(enc, Distance())
    assert net.encoder is enc
    for (n, p), (m, q) in zip(net.encoder.named_parameters(), net.twin.named_parameters()):
        assert n == m and p is q
    x1, x2 = torch.randn(5, 10), torch.randn(5, 10)
    assert net(x1, x2).shape == (5,)
    torch.testing.assert_close(net(x1, x2), net(x2, x1))  # one encoder and a symmetric head: symmetric
    e = numel(enc)
    r = ps.report(net)
    assert (r.total_params, r.unique_params) == (2 * e + 5, e + 5)
    assert {g.kind for g in r.groups} == {"alias"} and len(r.groups) == 4
    assert all(g.members == (f"encoder.{g.source.split('.', 1)[1]}", f"twin.{g.source.split('.', 1)[1]}") for g in r.groups)


def test_siamese_without_head_returns_both_embeddings():
    net = Siamese(_encoder())
    x1, x2 = torch.randn(3, 10), torch.randn(3, 10)
    e1, e2 = net(x1, x2)
    torch.testing.assert_close(e1, net.embed(x1))
    torch.testing.assert_close(e2, net.embed(x2))


def test_siamese_gradients_sum_over_both_branches():
    net = Siamese(_encoder(), Distance())
    untied = ps.untie(copy.deepcopy(net))
    assert untied.twin[0].weight is not untied.encoder[0].weight
    x1, x2 = torch.randn(6, 10), torch.randn(6, 10)
    net(x1, x2).pow(2).sum().backward()
    untied(x1, x2).pow(2).sum().backward()
    for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
        shared = net.encoder.get_parameter(name).grad
        both = untied.encoder.get_parameter(name).grad + untied.twin.get_parameter(name).grad
        torch.testing.assert_close(shared, both)
        assert not torch.allclose(shared, untied.encoder.get_parameter(name).grad)  # the twin's share is real


def test_unshared_siamese_is_two_independent_encoders():
    enc = _encoder()
    net = Siamese(enc, Distance(), shared=False)
    e = numel(enc)
    r = ps.report(net)
    assert (r.total_params, r.unique_params, r.groups) == (2 * e + 5, 2 * e + 5, ())
    assert net.twin[0].weight is not net.encoder[0].weight
    assert torch.equal(net.twin[0].weight, net.encoder[0].weight)  # same starting point


def test_siamese_tie_survives_deepcopy_and_pickle_and_can_be_untied():
    net = Siamese(_encoder())
    for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert clone.twin[0].weight is clone.encoder[0].weight
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    ps.untie(net)
    assert net.twin[0].weight is not net.encoder[0].weight
    assert ps.report(net).groups == ()


def test_siamese_keeps_buffers_per_branch():
    net = Siamese(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    assert net.twin[1].running_mean is not net.encoder[1].running_mean
    assert net.twin[1].weight is net.encoder[1].weight


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        (("not a module",), {}, "needs an nn.Module encoder"),
        ((nn.Linear(2, 2), lambda a, b: a), {}, "head must be an nn.Module"),
        ((nn.Linear(2, 2),), {"shared": "yes"}, "shared must be True or False"),
        ((nn.ReLU(),), {}, "no parameters to share"),
    ],
)
def test_siamese_bad_arguments(args, kwargs, match):
    with pytest.raises(ps.SharingError, match=match):
        Siamese(*args, **kwargs)


def test_siamese_leaves_the_encoder_as_it_was():
    enc = _encoder()
    before = snapshot(enc)
    Siamese(enc)
    assert_unchanged(enc, before)


# ---- TiedAutoencoder ---------------------------------------------------------------------------------
def test_tied_autoencoder_structure_counts_and_plan():
    torch.manual_seed(0)
    ae = TiedAutoencoder([40, 32, 8])
    x = torch.randn(7, 40)
    assert ae(x).shape == (7, 40) and ae.encode(x).shape == (7, 8)
    torch.testing.assert_close(ae(x), ae.decode(ae.encode(x)))
    assert ae.decoder[0].weight.shape == (32, 8) and ae.decoder[2].weight.shape == (40, 32)
    assert torch.equal(ae.decoder[2].weight, ae.encoder[0].weight.t())
    r = ps.report(ae)
    weights, biases = 40 * 32 + 32 * 8, (32 + 8) + (32 + 40)
    assert (r.total_params, r.unique_params) == (2 * weights + biases, weights + biases)
    groups = {(g.kind, g.source, g.members) for g in ps.plan(ae)}
    assert groups == {("transpose", "encoder.0.weight", ("decoder.2.weight",)),
                      ("transpose", "encoder.2.weight", ("decoder.0.weight",))}
    assert [type(m).__name__ for m in ae.encoder] == ["Linear", "ReLU", "Linear"]


def test_tied_autoencoder_gradients_sum_over_encoder_and_decoder():
    torch.manual_seed(0)
    ae = TiedAutoencoder([12, 6, 3], activation=nn.Tanh)
    untied = ps.untie(copy.deepcopy(ae))
    assert ps.report(untied).groups == ()
    assert len(ps.plan(ae)) == 2  # untying the copy left the original tied (copies share no class state)
    x = torch.randn(9, 12)
    torch.testing.assert_close(ae(x), untied(x))
    nn.functional.mse_loss(ae(x), x).backward()
    nn.functional.mse_loss(untied(x), x).backward()
    enc_grad = ae.encoder[0].weight.grad
    both = untied.encoder[0].weight.grad + untied.decoder[2].weight.grad.t()
    torch.testing.assert_close(enc_grad, both)
    assert not torch.allclose(enc_grad, untied.encoder[0].weight.grad)


def test_tied_autoencoder_activations():
    ae = TiedAutoencoder([6, 4, 2], activation=None, output_activation=nn.Sigmoid)
    assert [type(m).__name__ for m in ae.encoder] == ["Linear", "Linear"]
    assert type(ae.decoder[-1]).__name__ == "Sigmoid"
    y = ae(torch.randn(5, 6) * 10)
    assert ((y > 0) & (y < 1)).all()
    assert ps.report(TiedAutoencoder([6, 2])).unique_params == 6 * 2 + 2 + 6


@pytest.mark.parametrize(
    "sizes,kwargs,match",
    [
        ([5], {}, "at least an input and a code width"),
        ([5, 0], {}, "every size must be an integer >= 1"),
        (5, {}, "sizes must be a list"),
        ([5, 3], {"activation": nn.ReLU()}, "not an instance"),
        ([5, 3], {"activation": "relu"}, "module class or factory"),
        ([5, 3], {"output_activation": lambda: 3}, "must build an nn.Module"),
    ],
)
def test_tied_autoencoder_bad_arguments(sizes, kwargs, match):
    with pytest.raises(ps.SharingError, match=match):
        TiedAutoencoder(sizes, **kwargs)


# ---- Recurrent --------------------------------------------------------------------------------------
def test_recurrent_applies_one_block_and_reports_the_saving():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(16, 16), nn.Tanh())
    rec = Recurrent(block, steps=5)
    assert rec.block is block and rec.steps == 5 and len(rec.layers) == 5
    x = torch.randn(3, 16)
    expected = x
    for _ in range(5):
        expected = block(expected)
    torch.testing.assert_close(rec(x), expected)
    r = ps.report(rec)
    assert (r.total_params, r.unique_params, r.ratio) == (5 * 272, 272, 5.0)
    assert [g.members for g in ps.plan(rec)] == [
        tuple(f"layers.{i}.0.weight" for i in range(5)), tuple(f"layers.{i}.0.bias" for i in range(5))]
    assert ps.report(Recurrent(nn.Linear(4, 4), 1)).ratio == 1.0


def test_recurrent_gradients_sum_over_steps_and_untie():
    torch.manual_seed(0)
    rec = Recurrent(nn.Sequential(nn.Linear(6, 6), nn.Tanh()), steps=3)
    untied = ps.untie(copy.deepcopy(rec))
    assert untied.layers[0][0].weight is not untied.layers[1][0].weight
    assert ps.report(untied).unique_params == 3 * 42
    x = torch.randn(4, 6)
    rec(x).sum().backward()
    untied(x).sum().backward()
    total = sum(untied.layers[i][0].weight.grad for i in range(3))
    torch.testing.assert_close(rec.block[0].weight.grad, total)
    assert not torch.allclose(rec.block[0].weight.grad, untied.layers[0][0].weight.grad)


def test_recurrent_passes_extra_arguments_and_keeps_buffers_per_step():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.norm = nn.BatchNorm1d(3)

        def forward(self, x, scale=1.0):
            return self.norm(self.lin(x)) * scale

    rec = Recurrent(Scaled(), steps=2)
    x = torch.randn(5, 3)
    rec.eval()
    torch.testing.assert_close(rec(x, scale=2.0), rec.block(rec.block(x, scale=2.0), scale=2.0))
    assert rec.layers[1].norm.running_mean is not rec.layers[0].norm.running_mean
    assert rec.layers[1].lin.weight is rec.layers[0].lin.weight
    ps.share_layers(ps.untie(rec).layers, unique=1, strategy="all")
    assert rec.layers[1].lin.weight is rec.layers[0].lin.weight


@pytest.mark.parametrize("block,steps,match", [
    (nn.Linear(2, 2), 0, "steps must be an integer >= 1, got 0"),
    (nn.Linear(2, 2), True, "steps must be an integer"),
    (nn.Linear(2, 2), 2.0, "steps must be an integer"),
    ("block", 2, "needs an nn.Module block"),
])
def test_recurrent_bad_arguments(block, steps, match):
    with pytest.raises(ps.SharingError, match=match):
        Recurrent(block, steps)
