"""Real properties of the data that the study's claims rest on (not constants)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from paramshare.study.context import StudyContext
from paramshare.study.data import load_dataset
from paramshare.study.experiments import baselines, spatial
from paramshare.study.jobs import run_jobs


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset("mnist1d")


@pytest.mark.slow
def test_quick_cnn_beats_quick_mlp_and_loses_its_lead_on_shuffled_positions(mnist1d):
    ctx = StudyContext(mnist1d, quick=True, seed=0)
    runs = {(j.kwargs["model"], j.kwargs.get("shuffle", False)): j for j in spatial.jobs(ctx)}
    quick = {j.kwargs["model"]: j for j in baselines.jobs(ctx)}
    assert runs["cnn", False].key == quick["cnn"].key  # the same run in both sections
    want = [runs["cnn", False], runs["mlp", False], runs["cnn", True]]
    results = run_jobs(want, mnist1d, workers=1)  # one thread per run, as the study trains
    cnn, mlp, shuffled = (results[j.key] for j in want)
    assert cnn["stored_params"] < mlp["stored_params"] / 2
    assert cnn["test_acc"] > mlp["test_acc"] + 0.15, (cnn["test_acc"], mlp["test_acc"])
    # the same CNN on shuffled positions: sharing's assumption fails and the lead is gone
    assert shuffled["test_acc"] < cnn["test_acc"] - 0.15, (shuffled["test_acc"], cnn["test_acc"])
    assert shuffled["test_acc"] < mlp["test_acc"] + 0.05


def test_mnist1d_has_the_package_defaults_and_leaves_global_rngs_alone(mnist1d):
    assert mnist1d.x.shape == (4000, 1, 40) and mnist1d.x_test.shape == (1000, 1, 40)
    assert mnist1d.x.dtype == np.float32 and sorted(set(mnist1d.y.tolist())) == list(range(10))
    random.seed(5)
    np.random.seed(5)
    a, b = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    load_dataset("digits")
    assert (random.random(), np.random.rand()) == (a, b)


@pytest.mark.slow
def test_shuffled_positions_are_exactly_the_packages_shuffle_seq(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.shuffle_seq = True
    state = np.random.get_state()
    ref = make_dataset(args)
    np.random.set_state(state)
    x, y, xt, yt = mnist1d.arrays(shuffle=True)
    np.testing.assert_allclose(x[:, 0], ref["x"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(xt[:, 0], ref["x_test"], rtol=0, atol=1e-6)
    assert not np.allclose(mnist1d.x[:, 0], ref["x"], atol=1e-3)  # the unshuffled signals differ


def test_subsets_are_stratified_nested_and_seeded(mnist1d):
    small = mnist1d.subset_indices(0.1, seed=3)
    half = mnist1d.subset_indices(0.5, seed=3)
    assert set(small) <= set(half) and len(set(half)) == len(half)
    assert abs(len(small) - 400) <= 10 and abs(len(half) - 2000) <= 10
    counts = np.bincount(mnist1d.y[small], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 45
    assert not np.array_equal(small, mnist1d.subset_indices(0.1, seed=4))
    assert np.array_equal(mnist1d.subset_indices(1.0, seed=3), np.arange(4000))


def test_step_budgets_scale():
    ctx = StudyContext(data=None, quick=False)
    assert ctx.steps(6000, 1000) == 6000 and ctx.seeds(3, 1) == [0, 1, 2] and not ctx.reduced
    ctx = StudyContext(data=None, quick=True, seed=7)
    assert ctx.steps(6000, 1000) == 1000 and ctx.seeds(3, 2) == [7, 8] and ctx.reduced
    ctx = StudyContext(data=None, steps_override=60)
    assert ctx.steps(6000, 1000) == 60 and ctx.steps(2000, 200) == 20 and ctx.steps(10, 1) == 1 and ctx.reduced


def test_digits_dataset_shape():
    d = load_dataset("digits")
    assert d.x.shape[1:] == (8, 8) and len(d.y) + len(d.y_test) == 1797 and d.published == {}
    assert abs(float(d.x.mean())) < 1e-3


@pytest.mark.slow
def test_growl_run_prunes_then_ties_and_no_penalty_prunes_nothing(mnist1d):
    from paramshare.study.experiments.growl import growl_mlp

    dense = 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    r = growl_mlp(mnist1d, steps=150, seed=0, lambda1=0.5, lambda2=0.25, thresholds=[1.0, 0.7], finetune=5)
    prune, tied = r["levels"]
    assert sum(r["zero_slices"]) > 0  # the penalty zeroes whole input slices ...
    assert prune["stored_params"] < dense  # ... which growl_tie stores as nothing
    assert tied["stored_params"] < prune["stored_params"]  # tying similar slices saves more
    assert tied["layers"][1][2] < tied["layers"][1][1] <= 100  # fewer shared vectors than kept inputs
    assert 0.1 < prune["test_acc"] <= 1.0
    r0 = growl_mlp(mnist1d, steps=150, seed=0, lambda1=0.0, lambda2=0.0, thresholds=[1.0], finetune=0)
    assert r0["zero_slices"] == [0, 0, 0] and r0["levels"][0]["stored_params"] == dense
    assert r0["levels"][0]["layers"] == [[40, 40, 40], [100, 100, 100], [100, 100, 100]]
