"""share_layers and layer_assignment."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

import paramshare as ps


def stack(n=6, d=8, bn=False):
    torch.manual_seed(0)
    blocks = []
    for _ in range(n):
        layers = [nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)]
        if bn:
            layers.append(nn.BatchNorm1d(d))
        blocks.append(nn.Sequential(*layers))
    return nn.ModuleList(blocks)


@pytest.mark.parametrize(
    "strategy, unique, expected",
    [
        ("all", 1, [0, 0, 0, 0, 0, 0]),
        ("sequence", 3, [0, 0, 1, 1, 2, 2]),
        ("cycle", 3, [0, 1, 2, 0, 1, 2]),
        ("cycle_rev", 3, [0, 1, 2, 2, 1, 0]),
        ("cycle_rev", 2, [0, 1, 0, 1, 1, 0]),
        ("cycle", 6, [0, 1, 2, 3, 4, 5]),
        ([1, 0, 0, 1, 1, 0], 2, [1, 0, 0, 1, 1, 0]),
    ],
)
def test_strategies(strategy, unique, expected):
    assert ps.layer_assignment(6, unique, strategy) == expected
    layers = ps.share_layers(stack(), unique, strategy)
    for i in range(6):
        for j in range(6):
            same = layers[i][0].weight is layers[j][0].weight
            assert same == (expected[i] == expected[j])
            assert (layers[i][2].bias is layers[j][2].bias) == same
    r = ps.report(layers)
    per_block = 2 * (8 * 8 + 8)
    assert r.unique_params == unique * per_block
    assert r.total_params == 6 * per_block


def test_init_first_keeps_each_groups_first_block():
    layers = stack()
    firsts = [layers[i][0].weight.detach().clone() for i in range(3)]
    ps.share_layers(layers, 3, "cycle")
    for i in range(6):
        assert torch.equal(layers[i][0].weight, firsts[i % 3])


def test_init_mean_averages_the_group():
    layers = stack()
    w = [layers[i][2].weight.detach().clone() for i in range(6)]
    ps.share_layers(layers, 2, "sequence", init="mean")
    torch.testing.assert_close(layers[0][2].weight, torch.stack(w[:3]).mean(0))
    torch.testing.assert_close(layers[5][2].weight, torch.stack(w[3:]).mean(0))
    assert not torch.allclose(layers[0][2].weight, w[0])


def test_buffers_stay_per_position():
    layers = ps.share_layers(stack(bn=True), 1, "all")
    assert layers[0][3].weight is layers[4][3].weight
    assert layers[0][3].running_mean is not layers[4][3].running_mean
    x = torch.randn(16, 8)
    layers.train()
    layers[0](x)
    assert not torch.equal(layers[0][3].running_mean, layers[1][3].running_mean)


def test_sequential_works_and_sharing_reduces_optimizer_state():
    seq = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    ps.share_layers(seq, 2, "cycle")
    opt = torch.optim.Adam(seq.parameters())
    seq(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert len(opt.state) == 4  # 2 blocks x (weight, bias)


def test_inner_transposed_ties_are_reproduced():
    layers = nn.ModuleList(nn.Sequential(nn.Linear(6, 3), nn.Linear(3, 6)) for _ in range(4))
    for i in range(4):
        ps.tie(layers, f"{i}.0.weight", f"{i}.1.weight", transpose=True)
    ps.share_layers(layers, 1, "all")
    assert ps.report(layers).unique_params == 18 + 3 + 6
    assert torch.equal(layers[3][1].weight, layers[0][0].weight.T)


@pytest.mark.parametrize(
    "unique, strategy, init, message",
    [
        (0, "cycle", "first", "positive integer"),
        (7, "cycle", "first", "exceeds the 6 layers"),
        (4, "cycle", "first", r"does not divide the 6 layers.*\[1, 2, 3, 6\]"),
        (4, "sequence", "first", "does not divide"),
        (2, "all", "first", "unique must be 1"),
        (2, "zigzag", "first", "unknown strategy 'zigzag'"),
        (2, [0, 1, 0], "first", "has 3 entries but there are 6 layers"),
        (2, [0, 1, 2, 0, 1, 0], "first", r"outside range\(2\)"),
        (3, [0, 1, 0, 1, 0, 1], "first", r"never uses blocks \[2\]"),
        (2, "cycle", "median", "init must be"),
        (2.0, "cycle", "first", "positive integer"),
    ],
)
def test_bad_input_clear_error_and_unchanged(unique, strategy, init, message):
    layers = stack()
    before = snapshot(layers)
    with pytest.raises(ps.SharingError, match=message):
        ps.share_layers(layers, unique, strategy, init)
    assert_unchanged(layers, before)


def test_structurally_different_blocks():
    layers = stack(4)
    layers[2] = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 16))
    before = snapshot(layers)
    with pytest.raises(ps.SharingError, match=r"(?s)block 2 does not match block 0.*\(16, 8\)"):
        ps.share_layers(layers, 1, "all")
    assert_unchanged(layers, before)
    other = nn.ModuleList([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)])
    with pytest.raises(ps.SharingError, match="Linear but block 1 is a Conv1d"):
        ps.share_layers(other, 1, "all")
    with pytest.raises(ps.SharingError, match="ModuleList or nn.Sequential"):
        ps.share_layers(nn.ModuleDict({"a": nn.Linear(2, 2)}), 1, "all")
    with pytest.raises(ps.SharingError, match="no parameters"):
        ps.share_layers(nn.ModuleList([nn.ReLU(), nn.ReLU()]), 1, "all")
