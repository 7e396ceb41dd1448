"""report(): exact counts and a readable table."""

from __future__ import annotations

import json
import math

import torch
from torch import nn

import paramshare as ps


def test_untied_model_counts_every_parameter_once_and_ignores_buffers():
    m = nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 3))
    r = ps.report(m)
    n = sum(p.numel() for p in m.parameters())
    assert r.total_params == r.unique_params == n
    assert r.total_bytes == r.unique_bytes == 4 * n
    assert r.saved_bytes == 0 and r.ratio == 1.0 and r.groups == ()


def test_alias_and_transpose_exact():
    m = nn.ModuleDict({
        "embed": nn.Embedding(100, 16),
        "head": nn.Linear(16, 100, bias=False),
        "enc": nn.Linear(100, 16, bias=False),
        "dec": nn.Linear(16, 100, bias=False),
    })
    ps.tie(m, "embed.weight", "head.weight")
    ps.tie(m, "enc.weight", "dec.weight", transpose=True)
    r = ps.report(m)
    assert r.total_params == 4 * 1600
    assert r.unique_params == 2 * 1600
    assert r.total_bytes == 4 * 1600 * 4 and r.unique_bytes == 2 * 1600 * 4
    assert r.saved_bytes == sum(row.stats.saved_bytes for row in r.rows) == 2 * 1600 * 4
    assert r.ratio == 2.0
    kinds = {row.group.kind: row.stats for row in r.rows}
    assert kinds["alias"].uses == 2 and kinds["alias"].stored_numel == 1600
    assert kinds["transpose"].uses == 1 and kinds["transpose"].stored_numel == 0


def test_mixed_dtypes_count_bytes_per_dtype():
    m = nn.ModuleDict({"a": nn.Linear(8, 8, bias=False), "b": nn.Linear(8, 8, bias=False), "c": nn.Linear(8, 8, bias=False).half()})
    ps.tie(m, "a.weight", "b.weight")
    r = ps.report(m)
    assert r.total_bytes == 64 * 4 * 2 + 64 * 2
    assert r.unique_bytes == 64 * 4 + 64 * 2


def test_transpose_and_alias_of_one_source_both_count():
    m = nn.ModuleDict({k: nn.Linear(6, 6, bias=False) for k in "abc"})
    ps.tie(m, "a.weight", "b.weight")
    ps.tie(m, "a.weight", "c.weight", transpose=True)
    r = ps.report(m)
    assert (r.total_params, r.unique_params) == (108, 36)
    assert r.saved_bytes == sum(row.stats.saved_bytes for row in r.rows)


def test_meta_model_is_counted_without_memory():
    with torch.device("meta"):
        m = nn.ModuleList(nn.Linear(512, 512) for _ in range(4))
    ps.share_layers(m, 1, "all")
    r = ps.report(m)
    assert r.unique_params == 512 * 512 + 512
    assert r.total_params == 4 * (512 * 512 + 512)


def test_table_and_dict():
    m = ps.share_layers(nn.ModuleList(nn.Linear(32, 32) for _ in range(30)), 1, "all")
    r = ps.report(m)
    text = str(r)
    assert "Sharing report: 2 tie groups" in text
    assert "alias" in text and "(32, 32)" in text and "(+28 more)" in text
    assert "30.00x" in text
    d = r.to_dict()
    json.dumps(d)
    assert d["ratio"] == 30.0 and d["saved_bytes"] == r.saved_bytes and len(d["groups"]) == 2
    many = ps.report(ps.share_layers(nn.ModuleList(nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)]) for _ in range(2)), 1, "all"))
    assert "... 10 more groups" in many.table(max_rows=20)


def test_empty_model():
    r = ps.report(nn.ReLU())
    assert r.total_params == r.unique_params == 0
    assert math.isinf(r.ratio)
    assert "inf" in str(r)
