"""Shared test helpers: snapshots that prove a failed call left a model exactly as it was."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def snapshot(model: nn.Module) -> dict:
    """Everything a call could change: parameter objects per path, values, ties, classes."""
    import paramshare as ps

    return {
        "params": [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        "buffers": [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)],
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ties": ps.find_ties(model),
        "classes": [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Fail unless ``model`` matches ``before`` (a :func:`snapshot`) exactly."""
    after = snapshot(model)
    assert after["params"] == before["params"], "parameter objects changed"
    assert after["buffers"] == before["buffers"], "buffer objects changed"
    assert after["classes"] == before["classes"], "module classes changed"
    assert after["ties"] == before["ties"], "ties changed"
    assert after["state"].keys() == before["state"].keys(), "state_dict keys changed"
    for k, v in before["state"].items():
        w = after["state"][k]
        assert w.shape == v.shape and w.dtype == v.dtype and torch.equal(w, v), f"value of {k} changed"


@pytest.fixture
def unchanged():
    """``with unchanged(model): <call that must raise>`` style helper as a fixture."""

    class _Guard:
        def __call__(self, model):
            self.model = model
            self.before = snapshot(model)
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            assert_unchanged(self.model, self.before)
            return False

    return _Guard()
