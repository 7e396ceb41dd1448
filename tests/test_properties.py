"""Property tests over random tie groups on a random MLP."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import paramshare as ps

WIDTHS = (4, 6)


def build(seed: int, n_layers: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i in range(n_layers):
        d_in, d_out = WIDTHS[i % 2], WIDTHS[(i + 1) % 2]
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    return nn.Sequential(*layers)


@st.composite
def tied_models(draw):
    seed = draw(st.integers(0, 1000))
    n = draw(st.integers(2, 7))
    ops = draw(
        st.lists(
            st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), st.booleans(), st.sampled_from(["weight", "bias"])),
            max_size=6,
        )
    )
    return seed, n, ops


def make(seed, n, ops):
    m = build(seed, n)
    for a, b, transpose, attr in ops:
        try:
            ps.tie(m, f"{2 * a}.{attr}", f"{2 * b}.{attr}", transpose=transpose and attr == "weight")
        except ps.SharingError:
            pass  # incompatible shapes or a self-tie: skipped, the model is unchanged
    return m


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tied_models())
def test_plan_json_round_trip_is_identity(params):
    m = make(*params)
    p = ps.plan(m)
    assert ps.SharingPlan.from_json(p.to_json()) == p
    assert ps.check(m, p) == []


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tied_models())
def test_apply_plan_on_fresh_model_gives_same_ties_and_outputs(params):
    seed, n, _ = params
    m = make(*params)
    p = ps.plan(m)
    fresh = build(seed + 1, n)
    ps.apply_plan(fresh, p)
    assert ps.find_ties(fresh) == ps.find_ties(m)
    assert ps.check(fresh, p) == []
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(3, WIDTHS[0])
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tied_models())
def test_report_counts_add_up(params):
    seed, n, _ = params
    m = make(*params)
    r = ps.report(m)
    assert r.total_params == ps.report(build(seed, n)).total_params
    assert r.unique_params == sum(p.numel() for p in m.parameters())
    assert r.total_bytes - r.unique_bytes == sum(row.stats.saved_bytes for row in r.rows)
    untied = ps.untie(m)
    assert ps.find_ties(untied) == []
    assert ps.report(untied).unique_params == r.total_params
