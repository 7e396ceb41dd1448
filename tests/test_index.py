"""The model index walks a model once and agrees with torch's own traversal."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import paramshare as ps
from paramshare._index import ModelIndex

from test_kinds import CASES, _shared


class _Twice(nn.Module):
    """One submodule registered under two names, a None child and a None parameter."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = self.a
        self.gap = None
        self.register_parameter("unused", None)
        self.scale = nn.Parameter(torch.ones(4))


class _OwnTraversal(nn.Module):
    """A wrapper that hides a child from named_modules, as some wrappers do."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.hidden = nn.Linear(3, 3)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        yield prefix, self
        yield from self.inner.named_modules(memo, prefix + ("." if prefix else "") + "inner", remove_duplicate)


def _models():
    yield "twice", _Twice()
    lm = nn.ModuleDict({"embed": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    yield "tied lm", ps.tie(lm, "embed.weight", "head.weight")
    wn = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    parametrizations.weight_norm(wn[1])
    yield "torch weight_norm", wn
    yield "shared layers", ps.share_layers(nn.ModuleList(nn.Linear(4, 4) for _ in range(3)), unique=1)
    for case in CASES:
        yield case.kind, _shared(case)


@pytest.mark.parametrize("label,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_parameter_paths_match_named_parameters(label, model):
    index = ModelIndex(model)
    want = dict(model.named_parameters(remove_duplicate=False))
    assert list(index.param_paths) == list(want)
    assert all(index.param_paths[k] is v for k, v in want.items())


@pytest.mark.parametrize("label,model", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_uses_are_the_attributes_a_forward_reads(label, model):
    index = ModelIndex(model)
    for name, use in index.uses.items():
        assert "parametrizations." not in name
        value = use.value()
        assert isinstance(value, torch.Tensor)
        if use.param is not None:  # a plain use is the registered parameter itself
            assert value is use.param and not use.derived
        else:
            assert use.derived and name in index.derived_uses


def test_a_module_with_its_own_traversal_is_asked():
    model = _OwnTraversal()
    index = ModelIndex(model)
    assert list(index.param_paths) == list(dict(model.named_parameters(remove_duplicate=False)))
    assert "hidden.weight" not in index.param_paths


def test_repeated_registrations_are_listed_under_every_path():
    index = ModelIndex(_Twice())
    assert {"a.weight", "b.weight"} <= set(index.uses) and index.uses["a.weight"].param is index.uses["b.weight"].param
    assert "unused" not in index.uses and "gap" not in index.modules
    assert index.canonical(index.uses["b.weight"].param) == "a.weight"


class _Extra(nn.Linear):
    def get_extra_state(self):
        return {"note": 1}

    def set_extra_state(self, state):
        pass


def _stateful_models():
    yield from _models()
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    bn[0].register_buffer("scratch", torch.zeros(2), persistent=False)
    bn[0].register_buffer("empty", None)
    yield "buffers", bn
    yield "extra state", nn.Sequential(nn.Linear(2, 2), _Extra(2, 2))
    hooked = nn.Sequential(nn.Linear(2, 2))

    def drop_bias(module, sd, prefix, meta):
        del sd["0.bias"]

    hooked.register_state_dict_post_hook(drop_bias)
    yield "state_dict hook", hooked


@pytest.mark.parametrize("label,model", list(_stateful_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_state_entries_match_state_dict(label, model):
    got = ModelIndex(model).state_entries()
    want = model.state_dict(keep_vars=True)
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k] is v or (not isinstance(v, torch.Tensor) and got[k] == v), k
