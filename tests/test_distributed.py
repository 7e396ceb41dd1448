"""ps.distributed: FSDP2 units that keep ties whole, sharded checkpoints, ties checked across ranks.

Unit tests of :func:`fsdp_groups` run in this process. Everything else runs on two real
processes (gloo, localhost, a free port, a hard timeout): ``tests/_dist_workers.py`` runs every
scenario once per session (one process start keeps the file within its time budget) and the
tests here compare its results with single-process runs computed in this process.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import _dist_workers as W
import paramshare as ps
from conftest import assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)

# groups that ps.distributed.fsdp_groups gives each case (the worker checks FSDP2 accepts them)
EXPECTED_GROUPS = {
    "alias-layers": [["blocks.0", "blocks.2"], ["blocks.1", "blocks.3"], [""]],
    "alias-embed": [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], [""]],
    "transpose": [["blocks.0", "blocks.2"], ["blocks.1"], ["blocks.3"], [""]],
    "hash": [["blocks.0", "blocks.2"], ["blocks.1", "blocks.3"], [""]],
    "rows": [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], [""]],
    "bank": [["blocks.0", "blocks.1", "blocks.2", "blocks.3"], [""]],
    "delta": [["blocks.0", "blocks.2"], ["blocks.1", "blocks.3"], [""]],
    "codebook": [["blocks.0", "blocks.2"], ["blocks.1", "blocks.3"], [""]],
}


@pytest.fixture(params=W.CASES, ids=str)
def case(request) -> W.DistCase:
    return request.param


# ---- the case table ------------------------------------------------------------------------
def test_every_registered_kind_has_a_distributed_case():
    assert set(ps.kind_names()) <= {c.kind for c in W.CASES}, (
        "add a DistCase for every sharing kind to tests/_dist_workers.py CASES"
    )
    assert set(EXPECTED_GROUPS) == {c.name for c in W.CASES}


def test_cases_really_share(case):
    m = W.shared(case)
    assert case.kind in {g.kind for g in ps.find_ties(m)}
    assert ps.find_ties(W.build()) == []  # negative: the plain model shares nothing


# ---- fsdp_groups, in process -----------------------------------------------------------------
def test_fsdp_groups_untied_model_is_one_unit_per_block():
    assert ps.distributed.fsdp_groups(W.build()) == [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], [""]]


def test_fsdp_groups_merge_units_a_tie_spans(case):
    m = W.shared(case)
    before = snapshot(m)
    groups = ps.distributed.fsdp_groups(m)
    assert_unchanged(m, before)
    assert groups == EXPECTED_GROUPS[case.name]
    assert groups == ps.distributed.fsdp_groups(copy.deepcopy(m))  # deterministic
    # every tie group lives in exactly one unit (modules are named by the innermost unit holding them)
    units = [n for g in groups[:-1] for n in g]
    unit_of = {n: i for i, g in enumerate(groups) for n in g}

    def owner(param: str) -> int:
        hits = [u for u in units if param.startswith(u + ".")]
        return unit_of[max(hits, key=len)] if hits else len(groups) - 1

    for g in ps.find_ties(m):
        assert len({owner(x) for x in g.members}) == 1, g


def test_fsdp_groups_tie_into_the_root_folds_the_block():
    m = ps.tie(W.build(), "norm.bias", "blocks.1.b.bias")
    assert ps.distributed.fsdp_groups(m) == [["blocks.0"], ["blocks.2"], ["blocks.3"], [""]]


def test_fsdp_groups_blocks_by_type_and_by_name():
    m = W.build()
    default = ps.distributed.fsdp_groups(m)
    assert ps.distributed.fsdp_groups(m, blocks=W.Block) == default
    assert ps.distributed.fsdp_groups(m, blocks=["blocks.1", "blocks.3"]) == [["blocks.1"], ["blocks.3"], [""]]
    lin = ps.distributed.fsdp_groups(m, blocks=nn.Linear)
    assert lin[0] == ["blocks.0.a"] and lin[-2:] == [["head"], [""]] and len(lin) == 10
    # nested blocks: the inner ones first, then the block around them
    nested = ps.distributed.fsdp_groups(m, blocks=["blocks.0", nn.Linear])
    assert nested.index(["blocks.0.a"]) < nested.index(["blocks.0"]) and nested.index(["blocks.0.b"]) < nested.index(["blocks.0"])
    # a tie between two Linear units merges them; untied Linears stay alone
    tied = ps.tie(W.build(), "blocks.0.a.weight", "blocks.2.a.weight")
    groups = ps.distributed.fsdp_groups(tied, blocks=nn.Linear)
    assert ["blocks.0.a", "blocks.2.a"] in groups and ["blocks.0.b"] in groups and ["blocks.2.a"] not in groups


def test_fsdp_groups_one_module_at_two_paths_is_one_unit():
    m = W.build()
    m.extra = m.blocks[1]  # the same module object reachable twice: FSDP2 keeps it in one unit
    assert ps.distributed.fsdp_groups(m) == [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], [""]]
    # a parameter registered in a block and at the root: the block folds into the root
    m = W.build()
    m.register_parameter("scale", m.blocks[2].b.bias)
    assert ps.distributed.fsdp_groups(m) == [["blocks.0"], ["blocks.1"], ["blocks.3"], [""]]


def test_fsdp_groups_a_buffer_shared_by_blocks_does_not_merge_them():
    m = W.build()
    cache = torch.arange(8.0)
    for b in m.blocks:
        b.register_buffer("cache", cache, persistent=False)  # one tensor in every block
    assert ps.distributed.fsdp_groups(m) == [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.3"], [""]]


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3))
        self.q = nn.Linear(3, 3)


def test_fsdp_groups_merges_units_that_must_each_come_first():
    # {P.q, Z} must be sharded before P (it holds P.q) and {P, Z.q} before Z: neither can come
    # first, so they become one unit {P, Z}
    m = nn.ModuleDict({"P": _Pair(), "Z": _Pair()})
    ps.tie(m, "P.q.bias", "Z.w")
    ps.tie(m, "P.w", "Z.q.bias")
    assert ps.distributed.fsdp_groups(m, blocks=["P", "P.q", "Z", "Z.q"]) == [["P", "Z"], [""]]
    # negative: with one of the ties only, the units stay apart, inner ones first
    m = nn.ModuleDict({"P": _Pair(), "Z": _Pair()})
    ps.tie(m, "P.q.bias", "Z.w")
    assert ps.distributed.fsdp_groups(m, blocks=["P", "P.q", "Z", "Z.q"]) == [["Z.q"], ["P.q", "Z"], ["P"], [""]]


def test_fsdp_groups_without_a_module_list_is_the_root_alone():
    assert ps.distributed.fsdp_groups(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) == [[""]]


@pytest.mark.parametrize(
    "blocks, message",
    [
        ("blocks.9", "does not exist: 'blocks.9'; did you mean"),
        (nn.Conv1d, "no module of that type"),
        ("", "cannot name the root"),
        (3, "module types or module names"),
        ([W.Block, 2.5], "module types or module names"),
    ],
)
def test_fsdp_groups_bad_blocks(blocks, message, unchanged):
    m = W.shared("alias-layers")
    with unchanged(m), pytest.raises(ps.SharingError, match=message.replace("(", r"\(")):
        ps.distributed.fsdp_groups(m, blocks=blocks)


def test_collectives_outside_a_process_group_raise(unchanged):
    import torch.distributed as dist

    assert not dist.is_initialized()
    m = W.shared("alias-embed")
    with unchanged(m):
        for call in (ps.distributed.check_ties, ps.distributed.shard):
            with pytest.raises(ps.SharingError, match="init_process_group"):
                call(m)
        with pytest.raises(ps.SharingError, match="init_process_group"):
            ps.distributed.save(m, "unused.safetensors")
    assert ps.distributed.is_sharded(m) is False


def test_import_paramshare_does_not_import_fsdp():
    code = (
        "import sys, paramshare as ps\n"
        "assert callable(ps.distributed.shard) and callable(ps.distributed.fsdp_groups)\n"
        "print('torch.distributed.fsdp' in sys.modules, 'torch.distributed.tensor' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---- two real processes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def ranks(dist_dir) -> list[dict]:
    """Every scenario of tests/_dist_workers.py on 2 gloo ranks (one start, hard timeout)."""
    return W.launch("all", dist_dir, world=2, timeout=170)


def _result(ranks, name: str) -> list[dict]:
    out = [r.get(name) for r in ranks]
    assert all(o is not None for o in out), f"scenario {name!r} did not run"
    for i, o in enumerate(out):
        assert o["ok"], f"rank {i}, scenario {name!r}:\n{o['error']}"
    return out


def _assert_params(got: dict, want: dict, **tol):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], **(tol or TOL), msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def references() -> dict:
    return {c.name: W.reference(c.name) for c in W.CASES}


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_matches_one_process_and_keeps_ties(ranks, references, case):
    r0, r1 = _result(ranks, f"ddp/{case}")
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"ranks differ in {k}"
    _assert_params(r0["params"], references[case.name])
    assert r0["check"] == r1["check"] == []
    assert r0["check_ties"] == r1["check_ties"] == []
    untrained = dict(W.shared(case).named_parameters())
    assert any(not torch.allclose(untrained[k], v) for k, v in r0["params"].items())  # it did train


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_shard_matches_one_process_and_keeps_ties(ranks, references, case):
    r0, r1 = _result(ranks, f"fsdp/{case}")
    assert r0["groups"] == EXPECTED_GROUPS[case.name]
    for r in (r0, r1):
        _assert_params(r["params"], references[case.name])
        assert r["check"] == [] and r["check_ties"] == []
    assert r0["out"].shape == (2, W.SEQ, W.VOCAB)


@pytest.mark.slow
@pytest.mark.distributed
def test_naive_per_layer_wrapping_of_a_tied_model_fails(ranks, references, case):
    m = W.shared(case)
    layers = [n for n, x in m.named_modules() if isinstance(x, (nn.Linear, nn.Embedding))]

    def layer(name: str) -> str:
        return max((n for n in layers if name.startswith(n + ".")), key=len, default="")

    split = any(len({layer(n) for n in (*g.members, g.source)}) > 1 for g in ps.find_ties(m))
    for r in _result(ranks, f"naive/{case}"):
        if split:  # a tie across layers: PyTorch rejects the per-layer units
            assert "already managed by another FSDP group" in r["error"], r["error"]
        else:  # a tie inside one layer survives per-layer wrapping (positive control)
            assert r["error"] == ""
            _assert_params(r["params"], references[case.name])
    if case.kind in ("alias", "transpose"):
        assert split


def _structural(problems: list[str]) -> list[str]:
    """Problems with the ties, not with values (to_empty leaves a codebook's labels uninitialised)."""
    return sorted(p for p in problems if "uninitialised" not in p)


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_init_sharded_then_materialised_keeps_ties_and_trains(ranks, references, case):
    for r in _result(ranks, f"meta-shard-first/{case}"):
        assert _structural(r["after_to_empty"]) == []  # sharding first: to_empty keeps every tie
        assert r["check"] == []
        _assert_params(r["params"], references[case.name])


@pytest.mark.slow
@pytest.mark.distributed
def test_meta_init_materialised_then_retied_then_sharded_trains(ranks, references, case):
    with torch.device("meta"):
        m = W.shared(case)
    lost = _structural(ps.check(m.to_empty(device="cpu"), ps.plan(W.shared(case))))  # what plain to_empty unties
    if case.kind == "alias":
        assert lost != []  # negative: plain to_empty unties aliases
    for r in _result(ranks, f"meta-plain-first/{case}"):
        assert _structural(r["after_to_empty"]) == lost
        assert _structural(r["retied"]) == [] and r["check"] == []
        _assert_params(r["params"], references[case.name])


@pytest.mark.slow
@pytest.mark.distributed
def test_save_load_of_a_sharded_model(ranks, dist_dir, references, case):
    r0, r1 = _result(ranks, f"save_load/{case}")
    trained = _result(ranks, f"fsdp/{case}")[0]["params"]
    for r in (r0, r1):
        assert not torch.allclose(r["before"], r["ref"])  # negative: the fresh model differs
        torch.testing.assert_close(r["after"], r["ref"], rtol=0, atol=0)
        assert r["check"] == []
        _assert_params(r["params"], trained, rtol=0, atol=0)
    assert r0["file_exists"]
    # the file holds full tensors and the plan: an unsharded model built untied loads it
    path = dist_dir / f"{case}.safetensors"
    plain = W.build(seed=3)
    assert ps.find_ties(plain) == []
    ps.load(plain, path)
    assert ps.check(plain, ps.plan(W.shared(case))) == []
    _assert_params(dict(plain.named_parameters()), references[case.name])


@pytest.mark.slow
@pytest.mark.distributed
def test_collective_save_and_load_of_a_ddp_model(ranks, dist_dir, references):
    for r in _result(ranks, "ddp-save-load"):
        _assert_params(r["loaded"], r["params"], rtol=0, atol=0)
        _assert_params(r["params"], references["transpose"])
    ck = ps.read(dist_dir / "ddp.safetensors")
    assert [g.kind for g in ck.plan] == ["transpose"]


@pytest.mark.slow
@pytest.mark.distributed
def test_siamese_under_ddp_with_activation_checkpointing(ranks):
    ref = W.siamese_reference()
    for name in ("siamese/non-reentrant", "siamese/reentrant-static-graph"):
        r0, r1 = _result(ranks, name)
        _assert_params(r0["params"], ref)
        _assert_params(r1["params"], r0["params"], rtol=0, atol=0)
        assert r0["check_ties"] == []
    # negative control: reentrant checkpointing of the twice-used encoder under plain DDP
    for r in _result(ranks, "siamese/reentrant"):
        assert "marked as ready twice" in r["error"] or "mark a variable ready only once" in r["error"]


@pytest.mark.slow
@pytest.mark.distributed
def test_check_ties_finds_ranks_that_differ(ranks):
    r0, r1 = _result(ranks, "check_ties/ties-differ")
    assert r0["problems"] == r1["problems"]  # every rank gets the same answer
    assert len(r0["problems"]) == 1 and "rank 1's ties differ" in r0["problems"][0]
    assert "embed.weight -> embed.weight, head.weight" in r0["problems"][0]
    r0, r1 = _result(ranks, "check_ties/options-differ")  # same members, other row labels
    assert r0["problems"] == r1["problems"]
    assert any("rank 1's ties differ" in p and "another shape or options" in p and "[0, 1, 1, -1" in p for p in r0["problems"])
    r0, r1 = _result(ranks, "check_ties/values-differ")
    assert r0["problems"] == r1["problems"]
    assert len(r0["problems"]) == 1 and "'blocks.0.a.weight'" in r0["problems"][0] and "rank 1's values" in r0["problems"][0]


@pytest.mark.slow
@pytest.mark.distributed
def test_shard_bad_input(ranks):
    for r in _result(ranks, "bad/mesh"):
        assert "the mesh covers 1 ranks" in r["error"] and "world has 2" in r["error"]
        assert r["unchanged"]
    for r in _result(ranks, "bad/kwargs"):
        assert "reshard_after_forwards" in r["error"] and "reshard_after_forward," in r["error"]
        assert r["unchanged"]
    for r in _result(ranks, "bad/twice"):
        assert "already sharded" in r["error"]
    for r in _result(ranks, "bad/scalar"):
        assert "0-dimensional parameters: 'temperature'" in r["error"] and r["unchanged"]


@pytest.mark.slow
@pytest.mark.distributed
def test_load_into_a_sharded_model_fails_cleanly_on_every_rank(ranks):
    for r in _result(ranks, "bad/load-untied"):  # the file ties embed and head, the model does not
        assert "its ties differ from the file's" in r["error"] and "'head.weight'" in r["error"]
        assert "ps.apply_plan(model, ps.read(path).plan)" in r["error"]
        assert r["unchanged"]
    r0, r1 = _result(ranks, "bad/load-missing")  # the file is missing on rank 1 only
    assert "failed on rank 1" in r0["error"]
    assert "missing.safetensors" in r1["error"]


@pytest.mark.slow
@pytest.mark.distributed
def test_example_train_fsdp_runs_on_two_ranks(ranks, dist_dir):
    """examples/train_fsdp.py's main() on the two ranks (as under torchrun --nproc_per_node=2)."""
    for r in _result(ranks, "example/train_fsdp"):
        assert r["check_ties"] == [] and r["reloaded_identical"] is True
        assert r["loss"] < r["first_loss_bound"]  # it learns: below the loss of a uniform guess
    ck = ps.read(dist_dir / "example.safetensors")
    kinds = {g.kind for g in ck.plan}
    assert kinds == {"alias"} and any("head.weight" in g.members for g in ck.plan)
