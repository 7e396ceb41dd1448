"""ps.nn.DynamicLinear: a router mixes a shared bank of weight templates per input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.dynamic import DynamicLinear


def layer(t: int = 4, bias: bool = True, seed: int = 0) -> DynamicLinear:
    torch.manual_seed(seed)
    return DynamicLinear(6, 5, templates=t, bias=bias)


def test_is_exported_from_ps_nn():
    assert ps.nn.DynamicLinear is DynamicLinear


@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)])
@pytest.mark.parametrize("bias", [True, False])
def test_output_is_each_input_times_its_own_mixed_weight(shape, bias):
    m = layer(bias=bias)
    x = torch.randn(*shape)
    w = m.weight_for(x)
    assert w.shape == shape[:-1] + (5, 6)
    expected = torch.einsum("...oi,...i->...o", w, x)
    if bias:
        expected = expected + m.bias_for(x)
    else:
        assert m.bias_for(x) is None
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-6)
    p = m.mixing(x)
    torch.testing.assert_close(p.sum(-1), torch.ones(shape[:-1]))
    torch.testing.assert_close(w, torch.einsum("...t,toi->...oi", p, m.templates))


def test_different_inputs_use_different_weights_but_one_template_means_one_weight():
    x = torch.randn(2, 6)
    w = layer(4).weight_for(x)
    assert not torch.allclose(w[0], w[1])
    one = layer(1)
    w1 = one.weight_for(x)
    torch.testing.assert_close(w1[0], w1[1])
    torch.testing.assert_close(w1[0], one.templates[0])  # T = 1 is an ordinary linear layer
    lin = nn.Linear(6, 5)
    with torch.no_grad():
        lin.weight.copy_(one.templates[0])
        lin.bias.copy_(one.bias[0])
    torch.testing.assert_close(one(x), lin(x))


def test_gradients_reach_templates_biases_and_router():
    m = layer()
    m(torch.randn(8, 6)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    names, params = zip(*[(n, p.detach().double().requires_grad_()) for n, p in m.named_parameters()])
    x = torch.randn(3, 6, dtype=torch.float64)
    m64 = copy.deepcopy(m).double()

    def f(*ps_):
        return torch.func.functional_call(m64, dict(zip(names, ps_)), (x,)).square().sum()

    assert torch.autograd.gradcheck(f, params)


def test_stores_the_bank_once_and_reports_it():
    m = layer()
    assert sum(p.numel() for p in m.parameters()) == 4 * 5 * 6 + 4 * 5 + (6 * 4 + 4)
    assert ps.report(m).unique_params == 4 * 5 * 6 + 4 * 5 + 28


def test_learns_an_input_dependent_map_a_linear_layer_cannot():
    # y = A x for x[0] > 0 and B x otherwise: one weight cannot fit both halves, a routed bank can
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    x = torch.randn(256, 6, generator=g)
    y = torch.where(x[:, :1] > 0, x @ a.T, x @ b.T)

    def fit(model):  # plain gradient descent
        params = list(model.parameters())
        for _ in range(200):
            loss = (model(x) - y).square().mean()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, grad in zip(params, grads):
                    p -= 0.3 * grad
        return loss.item()

    torch.manual_seed(0)
    dynamic = fit(DynamicLinear(6, 3, templates=2))
    torch.manual_seed(0)
    static = fit(nn.Linear(6, 3))
    assert dynamic < 0.1 * static


def test_survives_state_dict_deepcopy_torch_save_and_checkpoints(tmp_path):
    m = layer()
    x = torch.randn(4, 6)
    y = m(x)
    other = layer(seed=1)
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(other(x), y, rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(m)(x), y, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y, rtol=0, atol=0)
    ps.save(m, tmp_path / "dyn.safetensors")
    fresh = layer(seed=2)
    assert ps.load(fresh, tmp_path / "dyn.safetensors") == ps.LoadResult([], [])
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((6, 5, 0), {}, "templates must be a positive integer"),
        ((6, 5, 2.0), {}, "templates must be a positive integer"),
        ((0, 5, 2), {}, "in_features must be a positive integer"),
        ((6, -1, 2), {}, "out_features must be a positive integer"),
        ((6, 5, 2), {"bias": "yes"}, "bias must be True or False"),
    ],
)
def test_bad_arguments_raise_clear_errors(args, kwargs, match):
    with pytest.raises(ps.SharingError, match=match):
        DynamicLinear(*args, **kwargs)
