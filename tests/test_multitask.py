"""ps.nn.MultiTask: one shared trunk, one head per task."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import paramshare as ps


class CountingTrunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return torch.relu(self.fc(x))


def build():
    torch.manual_seed(0)
    return ps.nn.MultiTask(CountingTrunk(), {"a": nn.Linear(8, 3), "b": nn.Linear(8, 5)})


def test_forward_one_task_all_tasks_and_per_task_inputs():
    mt = build()
    x = torch.randn(4, 6)
    feats = torch.relu(mt.trunk.fc(x))
    assert torch.allclose(mt(x, "b"), mt.heads["b"](feats))
    mt.trunk.calls = 0
    out = mt(x)
    assert mt.trunk.calls == 1  # the trunk runs once for every head
    assert list(out) == ["a", "b"] and out["a"].shape == (4, 3) and out["b"].shape == (4, 5)
    assert torch.allclose(out["a"], mt.heads["a"](feats))
    xa, xb = torch.randn(2, 6), torch.randn(7, 6)
    per = mt({"b": xb, "a": xa})
    assert per["a"].shape == (2, 3) and per["b"].shape == (7, 5)
    assert torch.allclose(per["b"], mt(xb, "b"))
    assert mt.tasks == ["a", "b"]


def test_trunk_is_stored_once_and_learns_from_every_task():
    mt = build()
    x = torch.randn(4, 6)
    out = mt(x)
    out["a"].sum().backward()
    g_a = mt.trunk.fc.weight.grad.clone()
    mt.zero_grad()
    mt(x, "b").sum().backward()
    g_b = mt.trunk.fc.weight.grad.clone()
    mt.zero_grad()
    both = mt(x)
    (both["a"].sum() + both["b"].sum()).backward()
    assert torch.allclose(mt.trunk.fc.weight.grad, g_a + g_b)
    assert mt.heads["a"].weight.grad is not None and mt.heads["b"].weight.grad is not None
    # negative: a head is not shared
    assert mt.heads["a"].weight.grad.shape != mt.heads["b"].weight.grad.shape
    trunk_params = sum(p.numel() for p in mt.trunk.parameters())
    heads_params = sum(p.numel() for p in mt.heads.parameters())
    assert ps.report(mt).unique_params == trunk_params + heads_params
    separate = nn.ModuleList([copy.deepcopy(mt.trunk), copy.deepcopy(mt.trunk)])  # one trunk per task, untied
    assert ps.report(separate).unique_params == 2 * trunk_params


def test_round_trips():
    mt = build()
    x = torch.randn(3, 6)
    buf = io.BytesIO()
    torch.save(mt.state_dict(), buf)
    buf.seek(0)
    fresh = ps.nn.MultiTask(CountingTrunk(), {"a": nn.Linear(8, 3), "b": nn.Linear(8, 5)})
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.allclose(fresh(x, "a"), mt(x, "a"))
    clone = pickle.loads(pickle.dumps(mt))
    assert torch.allclose(clone(x, "b"), mt(x, "b"))


def test_bad_input():
    with pytest.raises(ps.SharingError, match="non-empty dict"):
        ps.nn.MultiTask(nn.Linear(2, 2), {})
    with pytest.raises(ps.SharingError, match="trunk must be an nn.Module"):
        ps.nn.MultiTask("trunk", {"a": nn.Linear(2, 2)})
    with pytest.raises(ps.SharingError, match="head of task 'a' must be an nn.Module"):
        ps.nn.MultiTask(nn.Linear(2, 2), {"a": 3})
    with pytest.raises(ps.SharingError, match="task names"):
        ps.nn.MultiTask(nn.Linear(2, 2), {"a.b": nn.Linear(2, 2)})
    mt = build()
    with pytest.raises(ps.SharingError, match="unknown task 'c'"):
        mt(torch.randn(1, 6), "c")
    with pytest.raises(ps.SharingError, match="did you mean 'b'"):
        mt({"bb": torch.randn(1, 6)})
    with pytest.raises(ps.SharingError, match="either a dict"):
        mt({"a": torch.randn(1, 6)}, "a")
