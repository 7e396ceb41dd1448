"""The study's plot helpers: point labels that would print over each other are merged."""

from __future__ import annotations

from paramshare.study.plots import _merged_labels
from paramshare.study.section import Figure, Series


def test_labels_of_nearly_coinciding_points_are_merged_and_others_kept():
    s = Series("ordered", [410, 5134, 5210, 15210], [0.32, 0.918, 0.917, 0.659], point_labels=["logistic", "GRU", "CNN", "MLP"])
    fig = Figure(file="f.png", title="t", xlabel="x", ylabel="y", series=[s], logx=True, ylim=(0, 1.02))
    assert _merged_labels(s, fig) == [(410, 0.32, "logistic"), (5134, 0.918, "GRU, CNN"), (15210, 0.659, "MLP")]
    # the same x, far apart in y: two labels
    s2 = Series("ordered", [5134, 5210], [0.60, 0.917], point_labels=["GRU", "CNN"])
    fig2 = Figure(file="f.png", title="t", xlabel="x", ylabel="y", series=[s2], logx=True, ylim=(0, 1.02))
    assert [t for *_, t in _merged_labels(s2, fig2)] == ["GRU", "CNN"]
    # empty labels are skipped
    s3 = Series("ordered", [1, 2], [0.1, 0.9], point_labels=["", "B"])
    assert _merged_labels(s3, Figure(file="f.png", title="t", xlabel="x", ylabel="y", series=[s3])) == [(2, 0.9, "B")]
