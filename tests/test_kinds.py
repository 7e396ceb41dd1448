"""The checks every sharing kind must pass, driven by one table with a row per kind.

A new kind adds one ``KindCase`` to ``CASES`` and gets all of them: plan round trip,
``apply_plan`` on a fresh model, ``check`` (positive and negative), report counts, gradients
reaching the stored tensors, survival through deepcopy/pickle/dtype round trips/state_dict.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.func import functional_call

import paramshare as ps


@dataclass
class KindCase:
    kind: str
    build: Callable[[], nn.Module]  # a fresh, untied model (deterministic)
    share: Callable[[nn.Module], nn.Module]  # impose the kind with the public API
    inputs: Callable[[], tuple]  # forward inputs
    # the kind links tensors across modules, so assign=True / to_empty break it; a kind whose
    # stored tensors live inside one module's parametrization has nothing to break there
    breakable: bool = True

    def __str__(self) -> str:
        return self.kind


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def _autoencoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 12))


def _x(n_in: int):
    return lambda: (torch.randn(4, n_in, generator=torch.Generator().manual_seed(1)),)


CASES = [
    KindCase("alias", _mlp, lambda m: ps.tie(m, "0.weight", "2.weight"), _x(8)),
    KindCase("transpose", _autoencoder, lambda m: ps.tie(m, "0.weight", "2.weight", transpose=True), _x(12)),
    KindCase("hash", _mlp, lambda m: ps.hash(m, 0.25), _x(8), breakable=False),
    # columns of 0.weight: inputs 0, 1, 7 share one vector, 2 and 4 another, 5 and 6 a third; 3 pruned
    KindCase("rows", _mlp, lambda m: (ps.tie_rows(m, "0.weight", [0, 0, 1, -1, 1, 2, 2, 0]), m)[1], _x(8), breakable=False),
    # tied 0.weight/2.weight clustered once (both read one codebook), 4.weight its own 2-bit codebook
    KindCase("codebook", _mlp, lambda m: ps.cluster(ps.tie(m, "0.weight", "2.weight"), bits=2, min_numel=1), _x(8)),
    # 0.weight and 2.weight as mixtures of one template; then as a shared rank-3 basis
    KindCase("bank", _mlp, lambda m: (ps.template_share([m[0], m[2]], templates=1), m)[1], _x(8)),
    KindCase("bank", _mlp, lambda m: ps.basis_share(m, "[02].weight", rank=3), _x(8)),
    # 0.weight and 2.weight share a base, each with its own rank-1 delta
    KindCase("delta", _mlp, lambda m: ps.relax(ps.tie(m, "0.weight", "2.weight"), rank=1), _x(8)),
]


def _shared(case: KindCase) -> nn.Module:
    return case.share(case.build())


@pytest.fixture(params=CASES, ids=str)
def case(request) -> KindCase:
    return request.param


def test_every_registered_kind_has_a_case():
    assert sorted({c.kind for c in CASES}) == sorted(ps.kind_names())


def test_plan_round_trip(case):
    m = _shared(case)
    p = ps.plan(m)
    assert case.kind in {g.kind for g in p}
    assert ps.SharingPlan.from_json(p.to_json()) == p
    assert ps.SharingPlan.from_dict(p.to_dict()) == p
    assert ps.plan(case.build()) != p  # an untied model has another plan


def test_apply_plan_on_fresh_model(case):
    m = _shared(case)
    p = ps.plan(m)
    fresh = case.build()
    assert ps.check(fresh, p) != []  # negative: the fresh model does not match yet
    ps.apply_plan(fresh, p)
    assert ps.check(fresh, p) == []
    assert ps.find_ties(fresh) == ps.find_ties(m)
    fresh.load_state_dict(m.state_dict())
    x = case.inputs()
    torch.testing.assert_close(fresh(*x), m(*x), rtol=0, atol=0)


def test_report_counts_add_up(case):
    m = _shared(case)
    r = ps.report(m)
    untied = ps.report(case.build())
    assert r.total_params == untied.total_params  # what the modules use does not change
    assert r.total_bytes == untied.total_bytes
    assert untied.unique_bytes == untied.total_bytes and untied.saved_bytes == 0
    assert r.saved_bytes == sum(row.stats.saved_bytes for row in r.rows) > 0
    assert r.unique_params == sum(p.numel() for p in m.parameters())


def test_gradients_reach_stored_tensors(case):
    m = _shared(case).double()
    names, params = zip(*[(n, p.detach().requires_grad_()) for n, p in m.named_parameters()])
    x = tuple(t.double() for t in case.inputs())

    def f(*ps_):
        return functional_call(m, dict(zip(names, ps_)), x).square().sum()

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)


def test_optimizer_sees_each_stored_tensor_once_and_moves_uses_together(case):
    m = _shared(case)
    p = ps.plan(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    stored = list(m.parameters())
    assert len({id(t) for t in stored}) == len(stored)
    m(*case.inputs()).square().sum().backward()
    opt.step()
    assert ps.check(m, p) == []


@pytest.mark.parametrize(
    "transform",
    [
        lambda m: copy.deepcopy(m),
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: torch.load(_saved(m), weights_only=False),
        lambda m: m.to(torch.float64),
        lambda m: m.double().float(),
    ],
    ids=["deepcopy", "pickle", "torch.save(model)", "to-float64", "double-float"],
)
def test_ties_survive(case, transform):
    m = _shared(case)
    p = ps.plan(m)
    out = transform(m)
    assert ps.check(out, p) == []
    assert ps.find_ties(out) == ps.find_ties(m)


def _saved(m: nn.Module) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return buf


def test_state_dict_round_trip_into_same_plan(case):
    m = _shared(case)
    other = _shared(case)
    with torch.no_grad():
        for q in other.parameters():
            q.add_(1.0)
    other.load_state_dict(m.state_dict())
    assert ps.check(other, ps.plan(m)) == []
    x = case.inputs()
    torch.testing.assert_close(other(*x), m(*x), rtol=0, atol=0)


def test_ties_survive_torch_compile_forward_and_backward(case):
    m = _shared(case)
    ref = copy.deepcopy(m)
    x = case.inputs()
    out = torch.compile(m, backend="aot_eager")(*x)
    out.square().sum().backward()
    expected = ref(*x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name}")
    assert ps.check(m, ps.plan(ref)) == []


def test_assign_and_to_empty_break_ties_and_apply_plan_restores(case):
    m = _shared(case)
    p = ps.plan(m)
    x = case.inputs()
    broken = _shared(case)
    broken.load_state_dict(m.state_dict(), assign=True)
    assert (ps.check(broken, p) != []) == case.breakable
    ps.apply_plan(broken, p)
    assert ps.check(broken, p) == []
    torch.testing.assert_close(broken(*x), m(*x), rtol=0, atol=0)

    with torch.device("meta"):
        meta = _shared(case)
    meta.to_empty(device="cpu")
    assert (ps.check(meta, p) != []) == case.breakable
    ps.apply_plan(meta, p)
    assert ps.check(meta, p) == []
    meta.load_state_dict(m.state_dict())
    torch.testing.assert_close(meta(*x), m(*x), rtol=0, atol=0)


def test_checkpoint_round_trip_into_fresh_untied_model(case, tmp_path):
    m = _shared(case)
    path = tmp_path / f"{case.kind}.safetensors"
    ps.save(m, path)
    fresh = case.build()
    x = case.inputs()
    assert ps.find_ties(fresh) != ps.find_ties(m)  # negative: built untied
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    assert ps.find_ties(fresh) == ps.find_ties(m)
    assert ps.check(fresh, ps.plan(m)) == []
    torch.testing.assert_close(fresh(*x), m(*x), rtol=0, atol=0)
    ck = ps.read(path)
    assert ck.plan == ps.plan(m)
    data_bytes = path.stat().st_size - ck.header_bytes
    params = {id(p) for p in m.parameters()}
    index = ps._index.ModelIndex(m)
    stored = [t for g in ps.find_ties(m) for t in ps.get_kind(g.kind).stored(index, g).values()]
    if all(id(t) in params for t in stored):  # the kind stores dense model tensors
        assert data_bytes == ps.report(m).unique_bytes
    assert data_bytes == ck.stored_bytes < ps.report(m).total_bytes
    # compressed: integer tensors entropy-coded, decoded on load
    ps.save(m, tmp_path / "z.safetensors", compress=True)
    fresh = case.build()
    ps.load(fresh, tmp_path / "z.safetensors")
    assert ps.find_ties(fresh) == ps.find_ties(m)
    torch.testing.assert_close(fresh(*x), m(*x), rtol=0, atol=0)
