"""Sharing-aware checkpoints: ps.save / ps.load / ps.read on real safetensors files."""

from __future__ import annotations

import itertools
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import paramshare as ps
from conftest import assert_unchanged, snapshot

ROOT = Path(__file__).resolve().parents[1]


# ---- models -------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 8, blocks: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)) for _ in range(blocks))
        self.norm = nn.BatchNorm1d(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = x + torch.tanh(b(x))
        x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        return self.head(x)


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().eval()


def shared_lm(seed: int = 0) -> TinyLM:
    m = tiny_lm(seed)
    ps.tie(m, "embed.weight", "head.weight")
    ps.share_layers(m.blocks, unique=1, strategy="all")
    with torch.no_grad():  # buffers with values that a fresh model does not have
        m.norm.running_mean.uniform_(-1, 1)
        m.norm.running_var.uniform_(0.5, 2)
        m.norm.num_batches_tracked.fill_(7)
    return m


def autoencoder(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 12))


def tied_autoencoder(seed: int = 0) -> nn.Sequential:
    return ps.tie(autoencoder(seed), "0.weight", "2.weight", transpose=True)


TOKENS = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
X12 = torch.randn(3, 12, generator=torch.Generator().manual_seed(4))

CASES = {
    "lm": (shared_lm, tiny_lm, lambda m: m(TOKENS)),
    "autoencoder": (tied_autoencoder, autoencoder, lambda m: m(X12)),
}


def header_of(path) -> tuple[int, dict]:
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def rewrite(path, out, header: dict | None = None, data: bytes | None = None, header_bytes: bytes | None = None) -> Path:
    """Write ``out``: ``path`` with its JSON header (or raw header bytes / data) replaced."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    if header_bytes is None:
        header_bytes = json.dumps(header if header is not None else json.loads(raw[8 : 8 + n])).encode()
    body = raw[8 + n :] if data is None else data
    Path(out).write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + body)
    return Path(out)


# ---- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_restores_ties_in_a_model_built_untied(name, tmp_path):
    make_shared, make_plain, run = CASES[name]
    m = make_shared()
    path = tmp_path / "m.safetensors"
    ps.save(m, path)
    fresh = make_plain(seed=1)
    assert ps.find_ties(fresh) == []  # negative: untied, other values
    assert not torch.equal(run(fresh), run(m))
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    assert ps.find_ties(fresh) == ps.find_ties(m)
    assert ps.check(fresh, ps.plan(m)) == []
    assert torch.equal(run(fresh), run(m))
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_plain_safetensors_loses_the_ties_that_ps_load_restores(tmp_path):
    m = tied_autoencoder()
    with pytest.raises(RuntimeError, match="share memory"):
        save_file(m.state_dict(), tmp_path / "plain.safetensors")
    save_model(m, tmp_path / "st.safetensors")
    fresh = autoencoder(seed=1)
    with pytest.raises(RuntimeError):  # the transposed weight is not in the file under its name
        load_model(fresh, tmp_path / "st.safetensors")
    ps.save(m, tmp_path / "ps.safetensors")
    ps.load(fresh, tmp_path / "ps.safetensors")
    assert ps.find_ties(fresh) == ps.find_ties(m)


def test_file_size_is_unique_bytes_plus_header(tmp_path):
    m = shared_lm()
    path = tmp_path / "m.safetensors"
    ps.save(m, path)
    n, head = header_of(path)
    buffers = sum(b.numel() * b.element_size() for b in m.buffers())
    assert path.stat().st_size == 8 + n + ps.report(m).unique_bytes + buffers
    assert ps.read(path).header_bytes == 8 + n
    # untied, the same model's file holds every use: the difference is what sharing saved
    untied = ps.untie(shared_lm())
    ps.save(untied, tmp_path / "untied.safetensors")
    n2, _ = header_of(tmp_path / "untied.safetensors")
    assert (tmp_path / "untied.safetensors").stat().st_size - 8 - n2 == path.stat().st_size - 8 - n + ps.report(m).saved_bytes
    # one entry per stored tensor, named by the group's source
    names = set(head) - {"__metadata__"}
    assert "embed.weight" in names and "head.weight" not in names
    assert "blocks.0.0.weight" in names and "blocks.1.0.weight" not in names


def test_file_opens_with_plain_safetensors_and_carries_plan_and_metadata(tmp_path):
    m = shared_lm()
    path = tmp_path / "m.safetensors"
    ps.save(m, path, metadata={"run": "7", "note": "ünïcode"})
    tensors = load_file(path)
    index_stored = {n: t for n, t in m.state_dict().items() if n in tensors}
    assert len(tensors) == len(index_stored)
    for k, v in tensors.items():
        assert torch.equal(v, index_stored[k])
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(tensors)
    assert meta["paramshare.format"] == "1"
    # the plan as compact JSON: alias groups as name lists (source first; the shape is the
    # file tensor's), the other groups in full; ps.read gives the plan back
    stored = json.loads(meta["paramshare.plan"])
    plan = ps.plan(m)
    aliases = [g for g in plan if g.kind == "alias"]
    assert stored["alias"] == [list(g.members) for g in aliases] and all(g.members[0] == g.source for g in aliases)
    assert [ps.TieGroup.from_dict(g) for g in stored.get("groups", [])] == [g for g in plan if g.kind != "alias"]
    assert ps.read(path).plan == plan
    assert meta["run"] == "7" and meta["note"] == "ünïcode"
    ck = ps.read(path)
    assert ck.metadata == {"run": "7", "note": "ünïcode"} and ck.plan == ps.plan(m) and ck.format == 1
    assert sorted(ck.tensors) == sorted(tensors)
    ck.tensors["embed.weight"].zero_()  # read() gives independent tensors
    assert not torch.equal(ps.read(path).tensors["embed.weight"], ck.tensors["embed.weight"])


def test_plan_file_form_keeps_order_and_the_full_form_still_loads(tmp_path):
    m = autoencoder()
    ps.tie(m, "0.weight", "2.weight", transpose=True)
    path = tmp_path / "ae.safetensors"
    ps.save(m, path)
    n, head = header_of(path)
    stored = json.loads(head["__metadata__"]["paramshare.plan"])
    assert "alias" not in stored and [g["kind"] for g in stored["groups"]] == ["transpose"]
    assert ps.read(path).plan == ps.plan(m)
    # a file whose plan is written in full (SharingPlan.to_json) loads the same
    full = dict(head, __metadata__=dict(head["__metadata__"], **{"paramshare.plan": ps.plan(m).to_json()}))
    other = rewrite(path, tmp_path / "full.safetensors", full)
    fresh = autoencoder(seed=1)
    assert ps.load(fresh, other) == ps.LoadResult([], [])
    assert ps.find_ties(fresh) == ps.find_ties(m) and ps.read(other).plan == ps.plan(m)
    lm = shared_lm()
    ps.save(lm, tmp_path / "lm.safetensors")
    full_lm = dict(header_of(tmp_path / "lm.safetensors")[1])
    full_lm["__metadata__"] = dict(full_lm["__metadata__"], **{"paramshare.plan": ps.plan(lm).to_json()})
    assert ps.read(rewrite(tmp_path / "lm.safetensors", tmp_path / "lm_full.safetensors", full_lm)).plan == ps.plan(lm)


def test_save_is_deterministic_and_leaves_the_model_alone(tmp_path):
    m = shared_lm()
    before = snapshot(m)
    ps.save(m, tmp_path / "a.safetensors")
    ps.save(m, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert_unchanged(m, before)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "b.safetensors"]


def test_bad_save_arguments_raise_and_write_nothing(tmp_path):
    m = shared_lm()
    for bad, match in [
        ({"n": 1}, "strings to strings"),
        ({"paramshare.plan": "x"}, "reserved"),
        ("text", "dict of strings"),
    ]:
        with pytest.raises(ps.CheckpointError, match=match):
            ps.save(m, tmp_path / "x.safetensors", metadata=bad)
    with pytest.raises(ps.CheckpointError, match="is a directory"):
        ps.save(m, tmp_path)
    with pytest.raises(ps.CheckpointError, match="does not exist"):
        ps.save(m, tmp_path / "nope" / "x.safetensors")
    with pytest.raises(ps.CheckpointError, match="compress must be"):
        ps.save(m, tmp_path / "x.safetensors", compress="yes")
    meta = nn.Linear(3, 3)
    meta.weight = nn.Parameter(torch.empty(3, 3, device="meta"))  # as built under torch.device("meta")
    with pytest.raises(ps.CheckpointError, match="meta device"):
        ps.save(meta, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_extra_state_that_is_not_a_tensor_is_refused(tmp_path):
    class WithExtra(nn.Linear):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass

    with pytest.raises(ps.CheckpointError, match="not a tensor"):
        ps.save(nn.Sequential(WithExtra(2, 2)), tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == []


def test_buffers_that_share_memory_are_stored_once_and_loaded_into_each(tmp_path):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
        m[0].register_buffer("table", torch.arange(6.0))
        m[1].register_buffer("table", torch.zeros(6))
        return m

    m = make()
    m[1].table = m[0].table  # one tensor, two names
    with torch.no_grad():
        m[0].table.mul_(3)
    ps.save(m, tmp_path / "m.safetensors")
    ck = ps.read(tmp_path / "m.safetensors")
    assert ck.aliases == {"1.table": "0.table"} and "1.table" not in ck.tensors
    fresh = make()
    assert ps.load(fresh, tmp_path / "m.safetensors") == ps.LoadResult([], [])
    assert torch.equal(fresh[1].table, torch.arange(6.0) * 3) and torch.equal(fresh[0].table, fresh[1].table)
    assert fresh[0].table is not fresh[1].table  # buffers get values; only parameters are tied


# ---- strict -------------------------------------------------------------------------------------
def test_strict_names_missing_and_unexpected_keys_and_nonstrict_loads_the_rest(tmp_path):
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ps.save(m, tmp_path / "m.safetensors")
    other = nn.ModuleDict({"0": nn.Linear(4, 4), "2": nn.Linear(4, 2)})
    before = snapshot(other)
    with pytest.raises(ps.CheckpointError) as e:
        ps.load(other, tmp_path / "m.safetensors")
    msg = str(e.value)
    assert 'Missing key(s) in the file: "2.weight", "2.bias".' in msg
    assert 'Unexpected key(s) in the file: "1.bias", "1.weight".' in msg  # in file order
    assert "strict=False" in msg and "m.safetensors" in msg
    assert_unchanged(other, before)
    res = ps.load(other, tmp_path / "m.safetensors", strict=False)
    assert res == ps.LoadResult(["2.weight", "2.bias"], ["1.bias", "1.weight"])
    assert torch.equal(other["0"].weight, m[0].weight)
    assert torch.equal(other["2"].weight, before["state"]["2.weight"])
    with pytest.raises(ps.CheckpointError, match="strict must be"):
        ps.load(other, tmp_path / "m.safetensors", strict=1)


def test_shape_mismatch_outside_the_plan_leaves_an_untied_model_untied(tmp_path):
    m = shared_lm()
    ps.save(m, tmp_path / "m.safetensors")
    fresh = TinyLM(d=8)
    fresh.norm = nn.BatchNorm1d(9)
    before = snapshot(fresh)
    with pytest.raises(ps.CheckpointError, match="size mismatch for 'norm.weight'"):
        ps.load(fresh, tmp_path / "m.safetensors")
    assert_unchanged(fresh, before)
    assert ps.find_ties(fresh) == []


# ---- other writers ------------------------------------------------------------------------------
def tied_lm_pair():
    torch.manual_seed(0)
    m = nn.ModuleDict({"embed": nn.Embedding(30, 6), "mid": nn.Linear(6, 6), "head": nn.Linear(6, 30, bias=False)})
    return ps.tie(m, "embed.weight", "head.weight")


def run_lm(m):
    return m["head"](torch.tanh(m["mid"](m["embed"](TOKENS % 30))))


def test_loads_save_model_files_and_ties_what_their_alias_metadata_names(tmp_path):
    m = tied_lm_pair()
    save_model(m, tmp_path / "st.safetensors")
    ck = ps.read(tmp_path / "st.safetensors")
    assert ck.plan is None and ck.format is None
    assert ck.aliases == {"head.weight": "embed.weight"}
    torch.manual_seed(5)
    fresh = nn.ModuleDict({"embed": nn.Embedding(30, 6), "mid": nn.Linear(6, 6), "head": nn.Linear(6, 30, bias=False)})
    assert ps.load(fresh, tmp_path / "st.safetensors") == ps.LoadResult([], [])
    assert fresh["head"].weight is fresh["embed"].weight
    assert torch.equal(run_lm(fresh), run_lm(m))


def test_plain_state_dicts_load_values_and_keep_the_models_ties(tmp_path):
    m = tied_lm_pair()
    state = {k: v.clone() for k, v in m.state_dict().items()}  # both names, equal values
    save_file(state, tmp_path / "plain.safetensors")
    fresh = ps.tie(nn.ModuleDict({"embed": nn.Embedding(30, 6), "mid": nn.Linear(6, 6), "head": nn.Linear(6, 30, bias=False)}),
                   "embed.weight", "head.weight")
    assert ps.load(fresh, tmp_path / "plain.safetensors") == ps.LoadResult([], [])
    assert fresh["head"].weight is fresh["embed"].weight
    assert torch.equal(run_lm(fresh), run_lm(m))
    # a plain file without the tied name: the tie covers it
    del state["head.weight"]
    save_file(state, tmp_path / "one.safetensors")
    assert ps.load(fresh, tmp_path / "one.safetensors") == ps.LoadResult([], [])
    # different values for two names the model ties: refused, model unchanged
    state["head.weight"] = state["embed.weight"] + 1
    save_file(state, tmp_path / "conflict.safetensors")
    before = snapshot(fresh)
    with pytest.raises(ps.CheckpointError, match="different values for 'embed.weight', 'head.weight'"):
        ps.load(fresh, tmp_path / "conflict.safetensors")
    assert_unchanged(fresh, before)


# ---- compression --------------------------------------------------------------------------------
def with_codes(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Linear(16, 16)
    g = torch.Generator().manual_seed(seed)
    m.register_buffer("codes", torch.randint(0, 4, (64, 64), generator=g, dtype=torch.int64))  # low entropy
    m.register_buffer("noise", torch.randint(0, 256, (512,), generator=g, dtype=torch.uint8))  # incompressible
    return m


def test_compress_codes_integer_tensors_and_round_trips(tmp_path):
    m = with_codes()
    ps.save(m, tmp_path / "raw.safetensors")
    ps.save(m, tmp_path / "z.safetensors", compress=True)
    raw, z = (tmp_path / "raw.safetensors").stat().st_size, (tmp_path / "z.safetensors").stat().st_size
    assert z < raw - 64 * 64 * 8 * 0.9  # int64 codes of 2 bits shrink by far more than 90%
    plain = load_file(tmp_path / "z.safetensors")  # still a standard file
    assert plain["codes"].dtype == torch.uint8 and plain["codes"].dim() == 1
    assert plain["noise"].dtype == torch.uint8 and torch.equal(plain["noise"], m.noise)  # kept raw: did not shrink
    assert torch.equal(plain["weight"], m.weight)  # floats never coded
    ck = ps.read(tmp_path / "z.safetensors")
    assert set(ck.encoding) == {"codes"} and ck.encoding["codes"]["codec"] in ("zlib", "lzma")
    assert torch.equal(ck.tensors["codes"], m.codes) and ck.tensors["codes"].dtype == torch.int64
    fresh = with_codes(seed=1)
    assert ps.load(fresh, tmp_path / "z.safetensors") == ps.LoadResult([], [])
    assert torch.equal(fresh.codes, m.codes) and torch.equal(fresh.weight, m.weight)


def test_corrupt_compressed_tensors_are_refused(tmp_path):
    m = with_codes()
    ps.save(m, tmp_path / "z.safetensors", compress=True)
    n, head = header_of(tmp_path / "z.safetensors")
    enc = json.loads(head["__metadata__"]["paramshare.encoding"])
    raw = (tmp_path / "z.safetensors").read_bytes()
    b0, b1 = head["codes"]["data_offsets"]
    data = bytearray(raw[8 + n :])
    data[b0 + (b1 - b0) // 2] ^= 0xFF  # flip a byte inside the stream
    cases = {
        "stream": rewrite(tmp_path / "z.safetensors", tmp_path / "a.safetensors", data=bytes(data)),
    }
    bomb = dict(head)
    bomb["__metadata__"] = dict(head["__metadata__"], **{"paramshare.encoding": json.dumps({"codes": dict(enc["codes"], shape=[2, 2])})})
    cases["too long"] = rewrite(tmp_path / "z.safetensors", tmp_path / "b.safetensors", header=bomb)
    unknown = dict(head)
    unknown["__metadata__"] = dict(head["__metadata__"], **{"paramshare.encoding": json.dumps({"codes": dict(enc["codes"], codec="zstd")})})
    cases["codec"] = rewrite(tmp_path / "z.safetensors", tmp_path / "c.safetensors", header=unknown)
    fresh = with_codes(seed=1)
    before = snapshot(fresh)
    for what, path in cases.items():
        with pytest.raises(ps.CheckpointError, match=path.name):
            ps.load(fresh, path)
        with pytest.raises(ps.CheckpointError):
            ps.read(path)
        assert_unchanged(fresh, before)


# ---- bad files ----------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    ps.save(shared_lm(), path)
    return path


def _corruptions(good: Path, out: Path):
    raw = good.read_bytes()
    n, head = header_of(good)
    meta = head["__metadata__"]
    plan = ps.read(good).plan.to_dict()  # the full form, which files may also carry
    compact = json.loads(meta["paramshare.plan"])
    assert "alias" in compact  # the file form lists alias groups as bare name lists

    def with_meta(**kw):
        return dict(head, __metadata__=dict(meta, **kw))

    def with_entry(name, **kw):
        return dict(head, **{name: dict(head[name], **kw)})

    def with_plan(p):
        return with_meta(**{"paramshare.plan": json.dumps(p)})

    first = next(k for k in head if k != "__metadata__")
    second = [k for k in head if k not in ("__metadata__", first)][0]
    wrong_member = json.loads(json.dumps(plan))
    wrong_member["groups"][0]["members"][1] = "head.wieght"
    wrong_shape = json.loads(json.dumps(plan))
    wrong_shape["groups"][0]["shape"] = [51, 8]
    unknown_kind = json.loads(json.dumps(plan))
    unknown_kind["groups"][0]["kind"] = "hologram"
    return {
        "empty file": (b"", "shorter than the 8-byte header"),
        "5 bytes": (raw[:5], "shorter than the 8-byte header"),
        "truncated header": (raw[: 8 + n // 2], "truncated"),
        "truncated data": (raw[:-7], "outside the"),
        "header length over the cap": (struct.pack("<Q", 2**40) + raw[8:], "exceeds the cap"),
        "header not JSON": (struct.pack("<Q", n) + b"{" + b"x" * (n - 1) + raw[8 + n :], "not valid JSON"),
        "header not UTF-8": (struct.pack("<Q", n) + b"{\xff\xfe" + raw[11 : 8 + n] + raw[8 + n :], "not UTF-8"),
        "header a list": (rewrite(good, out, header_bytes=b"[1, 2]").read_bytes(), "not a JSON object"),
        "duplicate key": (rewrite(good, out, header_bytes=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}').read_bytes(), "duplicate key"),
        "offsets out of bounds": (rewrite(good, out, with_entry(first, data_offsets=[0, 10**12])).read_bytes(), "outside the"),
        "offsets overlap": (rewrite(good, out, with_entry(second, data_offsets=head[first]["data_offsets"], shape=head[first]["shape"], dtype=head[first]["dtype"])).read_bytes(), "overlap"),
        "dtype lies about size": (rewrite(good, out, with_entry(first, dtype="F16")).read_bytes(), "lies about offsets or dtype"),
        "unknown dtype": (rewrite(good, out, with_entry(first, dtype="F128")).read_bytes(), "does not know"),
        "negative shape": (rewrite(good, out, with_entry(first, shape=[-1])).read_bytes(), "invalid shape"),
        "plan not JSON": (rewrite(good, out, with_meta(**{"paramshare.plan": "{groups: ["})).read_bytes(), "not valid JSON"),
        "plan names a missing parameter": (rewrite(good, out, with_plan(wrong_member)).read_bytes(), "head.wieght"),
        "plan shape disagrees with the tensor": (rewrite(good, out, with_plan(wrong_shape)).read_bytes(), "shape"),
        "unknown kind": (rewrite(good, out, with_plan(unknown_kind)).read_bytes(), "unknown sharing kind 'hologram'"),
        "newer format": (rewrite(good, out, with_meta(**{"paramshare.format": "99"})).read_bytes(), "newer than this paramshare"),
        "newer plan": (rewrite(good, out, with_plan(dict(plan, version=99))).read_bytes(), "upgrade paramshare"),
        "bad format": (rewrite(good, out, with_meta(**{"paramshare.format": "one"})).read_bytes(), "not a version number"),
        "alias to nowhere": (rewrite(good, out, with_meta(**{"paramshare.aliases": '{"x": "nowhere"}'})).read_bytes(), "not a tensor in the file"),
        "compact alias not a list": (rewrite(good, out, with_plan({"alias": "embed.weight"})).read_bytes(), "'alias' must list lists"),
        "compact alias of one name": (rewrite(good, out, with_plan(dict(compact, alias=[["embed.weight"]]))).read_bytes(), "'alias' must list lists"),
        "compact alias of a name not in the file": (rewrite(good, out, with_plan(dict(compact, alias=[["nowhere.weight", "head.weight"]]))).read_bytes(), "has no tensor 'nowhere.weight'"),
        "compact alias names a missing parameter": (rewrite(good, out, with_plan(dict(compact, alias=[["embed.weight", "head.wieght"]]))).read_bytes(), "head.wieght"),
        "metadata not strings": (rewrite(good, out, dict(head, __metadata__={"a": 1})).read_bytes(), "strings to strings"),
    }


def test_every_kind_of_bad_file_is_a_checkpoint_error_and_the_model_is_unchanged(good, tmp_path):
    cases = _corruptions(good, tmp_path / "scratch.safetensors")
    fresh = tiny_lm(seed=1)
    before = snapshot(fresh)
    for what, (content, match) in cases.items():
        path = tmp_path / f"{what.replace(' ', '_')}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ps.CheckpointError) as e:
            ps.load(fresh, path)
        assert path.name in str(e.value), what
        assert match in str(e.value), (what, str(e.value))
        assert_unchanged(fresh, before)
    # the plan errors need the model; the file errors are found by read() too
    with pytest.raises(ps.CheckpointError, match="outside the"):
        ps.read(tmp_path / "truncated_data.safetensors")


def test_missing_paths_and_directories(tmp_path):
    m = tiny_lm()
    before = snapshot(m)
    with pytest.raises(ps.CheckpointError, match="no such file"):
        ps.load(m, tmp_path / "absent.safetensors")
    with pytest.raises(ps.CheckpointError, match="is a directory"):
        ps.load(m, tmp_path)
    with pytest.raises(ps.CheckpointError, match="is a directory"):
        ps.read(tmp_path)
    with pytest.raises(ps.CheckpointError, match="expected a file path"):
        ps.read(42)
    assert_unchanged(m, before)


def test_a_plan_that_does_not_fit_the_model_names_the_parameter(good, tmp_path):
    small = nn.Sequential(nn.Linear(2, 2))
    before = snapshot(small)
    with pytest.raises(ps.CheckpointError, match="does not fit the model") as e:
        ps.load(small, good)
    assert "embed.weight" in str(e.value)
    assert_unchanged(small, before)


_FUZZ = {}


def _fuzz_setup():
    if not _FUZZ:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="ps-fuzz-"))
        ps.save(shared_lm(), d / "good.safetensors")
        _FUZZ["dir"] = d
        _FUZZ["raw"] = (d / "good.safetensors").read_bytes()
        _FUZZ["n"] = struct.unpack("<Q", _FUZZ["raw"][:8])[0]
    return _FUZZ


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=0, max_size=4),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    in_header=st.booleans(),
)
def test_fuzzed_files_give_a_checkpoint_error_or_load(flips, cut, in_header):
    f = _fuzz_setup()
    raw = bytearray(f["raw"])
    span = 8 + f["n"] if in_header else len(raw)
    for pos, xor in flips:
        raw[int(pos * span)] ^= xor
    if cut is not None:
        raw = raw[: int(cut * len(raw))]
    path = f["dir"] / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    if "model" not in f:
        f["model"] = tiny_lm(seed=1)
        f["before"] = snapshot(f["model"])
    try:
        ps.load(f["model"], path, strict=False)
    except ps.CheckpointError as e:
        event("refused")
        assert str(path) in str(e)
        assert_unchanged(f["model"], f["before"])
    else:
        event("loaded")
        del f["model"]  # loaded: the next example starts from a fresh model
    try:
        ps.read(path)
    except ps.CheckpointError:
        pass


# ---- atomic writes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_error_or_a_crash_mid_save_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.safetensors"
    ps.save(nn.Linear(4, 4), target)
    old = target.read_bytes()
    script = textwrap.dedent(
        """
        import resource, signal, sys
        import torch.nn as nn, paramshare as ps
        big = nn.Linear(512, 512)  # 1 MB, over the file-size limit below
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG
        try:
            ps.save(big, sys.argv[1])
        except ps.CheckpointError as e:
            print("error:", e, flush=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # now the write kills the process
        ps.save(big, sys.argv[1])
        print("not reached", flush=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, env=env, timeout=300)
    assert "error:" in proc.stdout and "previous file there is unchanged" in proc.stdout, proc.stderr
    assert "not reached" not in proc.stdout
    assert proc.returncode != 0  # killed by SIGXFSZ mid-write
    assert target.read_bytes() == old
    leftovers = [n for n in os.listdir(tmp_path) if n != "m.safetensors"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".m.safetensors.paramshare-")  # the crashed write's
    ps.save(nn.Linear(4, 4), target)  # the next save removes what the dead writer left
    assert os.listdir(tmp_path) == ["m.safetensors"]


def test_large_tensors_are_written_in_chunks_handed_to_write_back(tmp_path, monkeypatch):
    from paramshare import _stfile

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(100, 70), nn.Linear(70, 3))  # 28,000 bytes: several chunks, ends mid-chunk
    ps.save(m, tmp_path / "whole.safetensors")
    calls = []
    real = _stfile._START_WRITEBACK
    monkeypatch.setattr(_stfile, "_CHUNK", 4096)
    monkeypatch.setattr(_stfile, "_START_WRITEBACK", lambda fd, off, n: (calls.append((off, n)), real and real(fd, off, n)))
    ps.save(m, tmp_path / "chunked.safetensors")
    data = (tmp_path / "chunked.safetensors").read_bytes()
    assert data == (tmp_path / "whole.safetensors").read_bytes()
    # every byte handed to write-back once, in order, no call larger than a chunk
    assert [off for off, _ in calls] == list(itertools.accumulate([0] + [n for _, n in calls[:-1]]))
    assert sum(n for _, n in calls) == len(data) and max(n for _, n in calls) <= 4096
    fresh = nn.Sequential(nn.Linear(100, 70), nn.Linear(70, 3))
    ps.load(fresh, tmp_path / "chunked.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), m.state_dict().values()))


# ---- transformers -------------------------------------------------------------------------------
def _data_bytes(path) -> int:
    n, _ = header_of(path)
    return Path(path).stat().st_size - 8 - n


def _plan_metadata_bytes(path) -> int:
    """Header bytes that the format version and the plan take (with the 8-byte padding)."""
    _, head = header_of(path)
    meta = head["__metadata__"]
    block = {"__metadata__": {k: meta[k] for k in ("paramshare.format", "paramshare.plan")}}
    return len(json.dumps(block, separators=(",", ":"), ensure_ascii=False)) + 7


@pytest.mark.slow
def test_bert_for_masked_lm_round_trips_with_its_tied_decoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    m = transformers.BertForMaskedLM(cfg).eval()
    assert {g.source for g in ps.find_ties(m)} == {"bert.embeddings.word_embeddings.weight", "cls.predictions.bias"}
    ps.save(m, tmp_path / "ps.safetensors")
    save_model(m, tmp_path / "st.safetensors")
    x = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(x).logits
    # into a fresh tied model and into one built untied (tie_word_embeddings=False)
    for tie in (True, False):
        torch.manual_seed(1)
        fresh = transformers.BertForMaskedLM(transformers.BertConfig(**{**cfg.to_dict(), "tie_word_embeddings": tie})).eval()
        assert (ps.find_ties(fresh) == ps.find_ties(m)) == tie
        assert ps.load(fresh, tmp_path / "ps.safetensors") == ps.LoadResult([], [])
        assert fresh.cls.predictions.decoder.weight is fresh.bert.embeddings.word_embeddings.weight
        assert ps.find_ties(fresh) == ps.find_ties(m)
        with torch.no_grad():
            assert torch.equal(fresh(x).logits, ref)
    # the same tensor bytes as safetensors' own save_model, and a file no larger: the header
    # carries the plan, and its short offsets (small tensors first) pay for it
    assert _data_bytes(tmp_path / "ps.safetensors") == _data_bytes(tmp_path / "st.safetensors")
    assert (tmp_path / "ps.safetensors").stat().st_size <= (tmp_path / "st.safetensors").stat().st_size
    assert (tmp_path / "ps.safetensors").stat().st_size < _data_bytes(tmp_path / "st.safetensors") + ps.report(m).saved_bytes


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import load_minilm, minilm_dir
    finally:
        sys.path.pop(0)
    try:
        model, tok = load_minilm()
    except Exception as e:  # pragma: no cover - the package is a dev dependency
        pytest.skip(f"MiniLM not available: {e}")
    return model, tok, minilm_dir()


@pytest.mark.slow
def test_real_minilm_round_trips_into_a_freshly_built_model(minilm, tmp_path):
    from transformers import AutoConfig, AutoModel

    model, tok, folder = minilm
    ps.save(model, tmp_path / "ps.safetensors")
    save_model(model, tmp_path / "st.safetensors")
    torch.manual_seed(0)
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(folder)).eval()
    enc = tok(["Tied weights are stored once.", "A second sentence."], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
        assert not torch.equal(fresh(**enc).last_hidden_state, ref)
        assert ps.load(fresh, tmp_path / "ps.safetensors") == ps.LoadResult([], [])
        assert torch.equal(fresh(**enc).last_hidden_state, ref)
    assert ps.find_ties(fresh) == ps.find_ties(model)
    assert _data_bytes(tmp_path / "ps.safetensors") == _data_bytes(tmp_path / "st.safetensors")
    assert (tmp_path / "ps.safetensors").stat().st_size <= (tmp_path / "st.safetensors").stat().st_size
    # and the published file (written by Hugging Face) loads as a plain state dict
    fresh2 = AutoModel.from_config(AutoConfig.from_pretrained(folder)).eval()
    res = ps.load(fresh2, folder / "model.safetensors", strict=False)
    assert res.missing == []
    with torch.no_grad():
        assert torch.equal(fresh2(**enc).last_hidden_state, ref)


def test_a_kind_that_refuses_the_files_tensors_on_the_trial_copy_leaves_the_model_alone(tmp_path):
    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))

    hashed = ps.hash(mlp(), 0.25)
    g = next(g for g in ps.find_ties(hashed) if g.kind == "hash")
    ps.save(hashed, tmp_path / "h.safetensors")
    n, head = header_of(tmp_path / "h.safetensors")
    (size,) = head[g.source]["shape"]
    assert size % 2 == 0
    bad = dict(head, **{g.source: dict(head[g.source], shape=[size // 2, 2])})  # same bytes, another shape
    rewrite(tmp_path / "h.safetensors", tmp_path / "bad.safetensors", header=bad)
    fresh = mlp()
    before = snapshot(fresh)
    with pytest.raises(ps.CheckpointError, match="shape"):
        ps.load(fresh, tmp_path / "bad.safetensors")
    assert_unchanged(fresh, before)
    assert ps.find_ties(fresh) == []
    ps.load(fresh, tmp_path / "h.safetensors")  # the good file installs the hash kind
    assert ps.find_ties(fresh) == ps.find_ties(hashed)
