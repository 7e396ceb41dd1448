"""Soft weight-sharing: the GMM prior's penalty, its parameters, and quantization to codebooks."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import paramshare as ps
from paramshare.gmm import GMMPrior, _NegLogSumExp


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))


def _reference_nll(prior: GMMPrior, weights: list[torch.Tensor]) -> float:
    """The negative log prior written out with numpy, in float64."""
    w = np.concatenate([t.detach().double().numpy().ravel() for t in weights])
    mu = prior.means.detach().double().numpy()
    var = prior.stds.detach().double().numpy() ** 2
    pi = prior.mixing.detach().double().numpy()
    dens = pi * np.exp(-((w[:, None] - mu) ** 2) / (2 * var)) / np.sqrt(2 * np.pi * var)
    nll = -np.log(dens.sum(1)).sum()
    (a0, b0), (a, b) = prior.hyperprior
    lam = 1 / var
    nll += (1 - a0) * np.log(lam[0]) + b0 * lam[0] + ((1 - a) * np.log(lam[1:]) + b * lam[1:]).sum()
    return float(nll)


def test_penalty_equals_the_mixture_formula():
    net = _net().double()
    prior = GMMPrior(net, components=5, init_std=0.1).double()
    with torch.no_grad():
        prior.mean_free.copy_(torch.tensor([-0.3, -0.1, 0.15, 0.4]))
        prior.log_precision.copy_(torch.tensor([5.0, 3.0, 4.0, 2.5, 3.5]))
        prior.mixing_free.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    got = prior().item()
    want = _reference_nll(prior, [net[0].weight, net[2].weight])
    assert math.isclose(got, want, rel_tol=1e-9)
    # the negative: biases are not in the default selection, so adding them changes the value
    with_bias = GMMPrior(net, components=5, include=["0.weight", "2.weight", "0.bias", "2.bias"]).double()
    with torch.no_grad():
        for a, b in zip(with_bias.parameters(), prior.parameters()):
            a.copy_(b)
    assert not math.isclose(with_bias().item(), want, rel_tol=1e-6)


def test_fused_log_sum_exp_gradcheck_and_prior_gradients_match_direct_autograd():
    q = torch.randn(4, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(_NegLogSumExp.apply, (q,))
    net = _net().double()
    prior = GMMPrior(net, components=4, pi_zero=None).double()
    prior().backward()
    fast = [t.grad.clone() for t in (net[0].weight, net[2].weight, *prior.parameters())]
    for t in (net[0].weight, net[2].weight, *prior.parameters()):
        t.grad = None
    w = torch.cat([net[0].weight.reshape(-1), net[2].weight.reshape(-1)])
    direct = -torch.logsumexp(prior._log_joint(w), 1).sum()
    (a0, b0), (a, b) = prior.hyperprior
    g = prior.log_precision
    direct = direct + (1 - a0) * g[0] + b0 * g[0].exp() + ((1 - a) * g[1:] + b * g[1:].exp()).sum()
    direct.backward()
    slow = [t.grad for t in (net[0].weight, net[2].weight, *prior.parameters())]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s)


def test_zero_component_is_pinned_and_the_rest_learn():
    net = _net()
    prior = GMMPrior(net, components=6)
    assert [n for n, _ in prior.named_parameters()] == ["mean_free", "log_precision", "mixing_free"]
    assert all(p.data_ptr() != q.data_ptr() for p in prior.parameters() for q in net.parameters())
    assert set(prior.state_dict()) == {"mean_free", "log_precision", "mixing_free"}
    before = [p.detach().clone() for p in prior.parameters()]
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        prior().backward()
        opt.step()
    assert prior.means[0].item() == 0.0 and math.isclose(prior.mixing[0].item(), 0.99, rel_tol=1e-6)
    assert math.isclose(prior.mixing.sum().item(), 1.0, rel_tol=1e-6)
    assert all(not torch.equal(b, p) for b, p in zip(before, prior.parameters()))
    learn = GMMPrior(net, components=6, pi_zero=None)
    assert math.isclose(learn.mixing[0].item(), 0.99, rel_tol=1e-5)
    learn().backward()
    assert learn.mixing_free.grad[0] != 0  # the zero component's weight learns too


def test_penalty_pulls_weights_onto_few_values():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 40))
    prior = GMMPrior(net, components=4, hyperprior=None, init_std=0.02)
    with torch.no_grad():
        prior.mean_free.copy_(torch.tensor([-0.12, 0.06, 0.12]))

    def spread():
        w = net[0].weight.detach().reshape(-1, 1)
        return (w - prior.means.detach()).abs().min(1).values.mean().item()

    start = spread()
    opt = torch.optim.Adam(net[0].parameters(), lr=2e-3)
    for _ in range(100):
        opt.zero_grad()
        prior().backward()
        opt.step()
    assert spread() < 0.3 * start  # weights sit near the component means
    zero = (prior.assign(net[0].weight) == 0).double().mean().item()
    assert zero > 0.5  # the pinned zero component, weighted 0.99, takes most weights


def test_prior_reads_the_model_it_is_given():
    net = _net()
    prior = GMMPrior(net, components=3)
    twin = copy.deepcopy(net)
    assert prior(twin).item() == prior().item()
    with torch.no_grad():
        twin[0].weight.mul_(3)
    assert prior(twin).item() != prior().item()
    with pytest.raises(ps.SharingError, match="no parameter"):
        prior(nn.Sequential(nn.ReLU()))


def test_assign_picks_the_most_responsible_component():
    net = _net()
    prior = GMMPrior(net, components=3, pi_zero=0.5, init_std=0.05)
    with torch.no_grad():
        prior.mean_free.copy_(torch.tensor([-1.0, 1.0]))
    w = torch.tensor([[0.01, -0.9, 1.2], [0.4, -0.6, 0.7]])
    assert prior.assign(w).tolist() == [[0, 1, 2], [0, 1, 2]]
    assert prior.assign(w).shape == w.shape and prior.assign(w).dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"components": 1}, "components"),
        ({"components": 2.5}, "components"),
        ({"pi_zero": 1.0}, "pi_zero"),
        ({"pi_zero": 0}, "pi_zero"),
        ({"init_std": -1.0}, "init_std"),
        ({"hyperprior": ((1, 2),)}, "hyperprior"),
        ({"hyperprior": ((1, 2), (0, 1))}, "hyperprior"),
        ({"include": "fc*"}, "matches no parameter"),
        ({"include": 5}, "include"),
    ],
)
def test_bad_arguments(kwargs, match, unchanged):
    net = _net()
    with unchanged(net), pytest.raises(ps.SharingError, match=match):
        GMMPrior(net, **kwargs)


def test_refuses_computed_and_integer_weights_and_counts_tied_weights_once(unchanged):
    net = ps.hash(_net(), 0.5, include="0")
    with unchanged(net), pytest.raises(ps.SharingError, match="computed by HashedWeight"):
        GMMPrior(net)
    q = nn.Sequential(nn.Linear(3, 3))
    q[0].weight = nn.Parameter(torch.ones(3, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(ps.SharingError, match="no weight selected"):
        GMMPrior(q)
    with pytest.raises(ps.SharingError, match="no weight selected"):
        GMMPrior(nn.Sequential(nn.LayerNorm(3)))
    assert GMMPrior(nn.Sequential(nn.LayerNorm(3)), include="0.weight").names == ("0.weight",)
    tied = ps.tie(nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5)), "0.weight", "1.weight")
    assert GMMPrior(tied).names == ("0.weight",)


# ---- quantize: codebook weights through the codebook kind ---------------------------------
def _trained_prior(seed: int = 0):
    net = _net(seed)
    prior = GMMPrior(net, components=4, pi_zero=0.6, init_std=0.03, hyperprior=None)
    with torch.no_grad():
        prior.mean_free.copy_(torch.tensor([-0.2, 0.1, 0.25]))
    return net, prior


def test_quantize_snaps_weights_to_component_means_as_codebook_weights(tmp_path):
    from paramshare.cluster import get_codebook

    net, prior = _trained_prior()
    dense = copy.deepcopy(net)
    want = {n: prior.means.detach()[prior.assign(dict(dense.named_parameters())[n])] for n in prior.names}
    x = torch.randn(5, 12)
    assert prior.quantize() is net
    assert [(g.kind, g.members) for g in ps.find_ties(net)] == [("codebook", ("0.weight",)), ("codebook", ("2.weight",))]
    for name in prior.names:
        mod = net.get_submodule(name.rpartition(".")[0])
        torch.testing.assert_close(mod.weight, want[name])
        centroids, labels = get_codebook(net, name)
        used = set(torch.unique(want[name]).tolist())
        assert set(centroids.detach().tolist()) == used  # only the components the weight uses
        assert centroids[0].item() == 0.0 and (labels == 0).any()  # the zero component is centroid 0
    assert torch.equal(net[0].bias, dense[0].bias)  # biases untouched
    # the forward is the dense forward with the snapped weights
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for name in prior.names:
            ref.get_parameter(name).copy_(want[name])
    torch.testing.assert_close(net(x), ref(x))
    # centroid 0 is pinned: fine-tuning leaves the pruned weights at exactly zero
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net(x).square().sum().backward()
    opt.step()
    c0, labels0 = get_codebook(net, "0.weight")
    assert c0[0].item() == 0.0 and (net[0].weight.detach()[labels0 == 0] == 0).all()
    assert (c0[1:].detach() != torch.tensor(sorted(used - {0.0}))).any()  # the others trained
    # a checkpoint restores the quantized model into a freshly built dense one
    ps.save(net, tmp_path / "q.safetensors")
    fresh = _net(1)
    ps.load(fresh, tmp_path / "q.safetensors")
    torch.testing.assert_close(fresh(x), net(x))


def test_quantize_another_model_and_refuse_computed_weights(unchanged):
    net, prior = _trained_prior()
    twin = copy.deepcopy(net)
    prior.quantize(twin)
    assert ps.find_ties(net) == [] and len(ps.find_ties(twin)) == 2
    with unchanged(twin), pytest.raises(ps.SharingError, match="already computed by Codebook"):
        prior.quantize(twin)
    other = ps.hash(_net(), 0.5, include="2")
    with unchanged(other), pytest.raises(ps.SharingError, match="already computed by HashedWeight"):
        prior.quantize(other)
    with pytest.raises(ps.SharingError, match="no parameter"):
        prior.quantize(nn.Sequential(nn.Linear(12, 10)))


def test_quantized_file_is_a_few_bits_per_weight(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(200, 100))
    prior = GMMPrior(net, components=8)
    dense_path, q_path, z_path = tmp_path / "d.safetensors", tmp_path / "q.safetensors", tmp_path / "z.safetensors"
    ps.save(net, dense_path)
    prior.quantize()
    ps.save(net, q_path)
    ps.save(net, z_path, compress=True)
    dense, q, z = (p.stat().st_size for p in (dense_path, q_path, z_path))
    assert q < dense / 6  # at most 3 bits per weight for <= 8 components, plus header and bias
    assert z <= q
