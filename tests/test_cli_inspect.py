"""``paramshare inspect`` and ``paramshare dedupe`` on real files: crafted ones with known
duplicates, PyTorch state dicts, paramshare checkpoints and the real MiniLM weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import paramshare as ps
from paramshare.cli import main

ROOT = Path(__file__).resolve().parents[1]
W = 64 * 32 * 4  # bytes of one 64x32 float32 weight


def crafted_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    return {
        "enc.weight": a,
        "copy.weight": a.clone(),  # exact duplicate
        "dec.weight": a.T.contiguous(),  # transposed duplicate
        "twin.weight": a + 0.1 * torch.randn(64, 32, generator=g),  # near: cosine about 0.995
        "other.weight": torch.randn(64, 32, generator=g),  # unrelated
        "enc.bias": torch.randn(64, generator=g),
    }


class Payload:
    """Unpickling it creates a file: proof of whether a reader unpickled it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out = capsys.readouterr()
    return code, out.out, out.err


def inspect_json(capsys, *argv) -> dict:
    code, out, err = cli(capsys, "inspect", *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_inspect_finds_exact_transposed_and_near_duplicates(tmp_path, capsys):
    t = crafted_tensors()
    save_file(t, tmp_path / "w.safetensors")
    info = inspect_json(capsys, tmp_path / "w.safetensors", "--near", "0.99")
    assert info["format"] == "safetensors" and info["tensors"] == 6
    assert info["tensor_bytes"] == 5 * W + 256
    assert info["unique_bytes"] == 4 * W + 256
    assert [sorted(d["names"]) for d in info["exact_duplicates"]] == [["copy.weight", "enc.weight"]]
    assert info["exact_duplicates"][0]["bytes_saved"] == W
    [tr] = info["transposed_duplicates"]
    assert tr["target"] == "dec.weight" and tr["bytes_saved"] == W
    assert tr["source"] in ("enc.weight", "copy.weight")  # the first of the exact pair, in file order
    [near] = info["near_duplicates"]
    assert near["b"] == "twin.weight" and near["a"] == tr["source"] and not near["transposed"]
    cos = torch.nn.functional.cosine_similarity(t["enc.weight"].reshape(-1), t["twin.weight"].reshape(-1), dim=0).item()
    assert near["cosine"] == pytest.approx(cos, abs=1e-5) and 0.99 <= cos < 0.999
    assert info["bytes_saved"] == {"exact": W, "transposed": W, "near": W}
    # negatives: a stricter threshold drops the near pair; no --near, no search
    assert inspect_json(capsys, tmp_path / "w.safetensors", "--near", "0.999")["near_duplicates"] == []
    plain = inspect_json(capsys, tmp_path / "w.safetensors")
    assert plain["near_duplicates"] is None and plain["bytes_saved"]["near"] is None
    # the table shows the same
    code, out, _ = cli(capsys, "inspect", tmp_path / "w.safetensors", "--near", "0.99")
    assert code == 0
    assert "exact duplicates: 1 group(s); tying them saves 8.0 KiB" in out
    assert "transposed duplicates: 1" in out and "near duplicates (cosine >= 0.99): 1 pair(s)" in out


def test_inspect_transposed_near_duplicates(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(48, 16, generator=g)
    save_file({"a": a, "b": (a.T + 0.05 * torch.randn(16, 48, generator=g)).contiguous(), "c": torch.randn(16, 48, generator=g)},
              tmp_path / "t.safetensors")
    info = inspect_json(capsys, tmp_path / "t.safetensors", "--near", "0.95")
    assert info["transposed_duplicates"] == []
    [near] = info["near_duplicates"]
    assert {near["a"], near["b"]} == {"a", "b"} and near["transposed"]


def test_inspect_paramshare_checkpoints_show_plan_aliases_and_compression(tmp_path, capsys):
    m = nn.ModuleDict({"embed": nn.Embedding(40, 8), "head": nn.Linear(8, 40, bias=False)})
    ps.tie(m, "embed.weight", "head.weight")
    m.register_buffer("codes", torch.zeros(1000, dtype=torch.int64))
    ps.save(m, tmp_path / "m.safetensors", compress=True)
    info = inspect_json(capsys, tmp_path / "m.safetensors")
    assert info["format"] == "paramshare"
    assert info["plan"]["groups"][0]["members"] == ["embed.weight", "head.weight"]
    assert info["tensors"] == 2 and info["tensor_bytes"] == 40 * 8 * 4 + 8000
    assert info["compressed"]["codes"]["stored_bytes"] < 100
    code, out, _ = cli(capsys, "inspect", tmp_path / "m.safetensors")
    assert "sharing plan: 1 group(s)" in out and "embed.weight" in out


def test_inspect_shows_the_codebooks_of_a_clustered_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))
    ps.cluster(m, bits=3, min_numel=100, include=["0.weight"])
    ps.cluster(m, clusters=5, granularity="channel", min_numel=100, include=["2.weight"])
    path = tmp_path / "c.safetensors"
    ps.save(m, path)
    info = inspect_json(capsys, path)
    books = {b["weight"]: b for b in info["codebooks"]}
    assert set(books) == {"0.weight", "2.weight"}
    b0, b2 = books["0.weight"], books["2.weight"]
    assert (b0["shape"], b0["clusters"], b0["bits"], b0["granularity"]) == ([32, 64], 8, 3, "tensor")
    assert (b2["shape"], b2["clusters"], b2["bits"], b2["granularity"]) == ([8, 32], 5, 3, 1)
    assert b0["stored_bytes"] == 8 * 4 + (32 * 64 * 3 + 7) // 8  # centroids + labels packed at 3 bits
    assert b2["stored_bytes"] == 8 * 5 * 4 + (8 * 32 * 3 + 7) // 8  # a codebook per output channel
    assert b0["dense_bytes"] == 32 * 64 * 4 and b2["dense_bytes"] == 8 * 32 * 4
    code, out, _ = cli(capsys, "inspect", path)
    assert code == 0
    assert "sharing plan: 2 group(s): 2 codebook" in out
    assert "codebooks: 2 clustered weight(s)" in out and "32x64" in out and " channel " in out
    assert "parametrizations.weight.original" not in out  # internal storage names stay out of the table


def test_inspect_piped_into_a_reader_that_stops_early_exits_quietly(tmp_path):
    import subprocess

    path = tmp_path / "many.safetensors"
    save_file({f"t{i:04d}.weight": torch.full((2,), float(i)) for i in range(3000)}, str(path))
    run = "import sys; from paramshare.cli import main; sys.exit(main())"
    cmd = f"{sys.executable} -c '{run}' inspect {path} --limit 0 | head -n 1"
    done = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str(path)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_inspect_reads_pt_files_with_weights_only_and_sees_shared_storage(tmp_path, capsys):
    lin = nn.Linear(8, 8)
    state = {"a.weight": lin.weight.data, "b.weight": lin.weight.data, "c": torch.ones(3)}
    torch.save(state, tmp_path / "w.pt")
    info = inspect_json(capsys, tmp_path / "w.pt")
    assert info["format"] == "torch" and info["tensors"] == 2
    assert info["aliases"] == {"b.weight": "a.weight"}

    marker = tmp_path / "unpickled"
    torch.save({"x": torch.ones(2), "evil": Payload(marker)}, tmp_path / "evil.bin")
    code, out, err = cli(capsys, "inspect", tmp_path / "evil.bin")
    assert code == 2 and out == "" and "weights_only" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()  # refused before anything ran


@pytest.mark.parametrize("content", [b"", b"not a weights file at all", b"\xff" * 64])
def test_inspect_unreadable_files_exit_2_with_one_line(tmp_path, capsys, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    code, out, err = cli(capsys, "inspect", path)
    assert code == 2 and out == ""
    assert err.startswith("paramshare inspect: ") and "bad.safetensors" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(capsys, "inspect", tmp_path / "missing.safetensors")
    assert code == 2 and "no such file" in err
    code, _, err = cli(capsys, "inspect", path, "--near", "1.5")
    assert code == 2 and "--near" in err


@pytest.fixture(scope="module")
def minilm_file() -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import minilm_dir
    finally:
        sys.path.pop(0)
    try:
        return minilm_dir() / "model.safetensors"
    except Exception as e:  # pragma: no cover - a dev dependency
        pytest.skip(f"MiniLM not available: {e}")


@pytest.mark.slow
def test_inspect_real_minilm_file(minilm_file, capsys):
    from safetensors import safe_open

    info = inspect_json(capsys, minilm_file, "--near", "0.9")
    with safe_open(minilm_file, "pt") as f:
        names = list(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
        assert info["metadata"] == f.metadata()
    assert info["tensors"] == len(names)
    assert info["tensor_bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert info["plan"] is None and info["exact_duplicates"] == [] and info["transposed_duplicates"] == []
    # the sketches miss nothing: every pair brute force finds at cosine >= 0.9 is listed, and nothing else
    by_shape: dict[tuple, list[str]] = {}
    for n, t in tensors.items():
        if t.numel() >= 16:
            by_shape.setdefault(tuple(t.shape), []).append(n)
    brute = set()
    for shape, group in by_shape.items():
        flat = torch.nn.functional.normalize(torch.stack([tensors[n].reshape(-1).double() for n in group]), dim=1)
        sims = flat @ flat.T
        brute |= {frozenset((group[i], group[j])) for i in range(len(group)) for j in range(i + 1, len(group)) if sims[i, j] >= 0.9}
        if len(shape) == 2 and (shape[1], shape[0]) in by_shape and shape[0] < shape[1]:
            other = by_shape[(shape[1], shape[0])]
            tflat = torch.nn.functional.normalize(torch.stack([tensors[n].T.reshape(-1).double() for n in other]), dim=1)
            cross = flat @ tflat.T
            brute |= {frozenset((group[i], other[j])) for i in range(len(group)) for j in range(len(other)) if cross[i, j] >= 0.9}
    found = {frozenset((d["a"], d["b"])) for d in info["near_duplicates"]}
    assert brute and found == brute


def test_dedupe_ties_exact_and_transposed_duplicates_and_outputs_stay_exact(tmp_path, capsys):
    t = crafted_tensors()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.copy, self.twin, self.other = (nn.Linear(32, 64) for _ in range(4))
            self.dec = nn.Linear(64, 32, bias=False)

        def forward(self, x):
            return self.dec(torch.tanh(self.enc(x) + self.copy(x) + self.twin(x) + self.other(x)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        for name, value in t.items():
            net.get_parameter(name).copy_(value)
    save_file({k: v.clone() for k, v in net.state_dict().items()}, tmp_path / "in.safetensors")
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))

    code, out, err = cli(capsys, "dedupe", tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    assert code == 0, err
    assert "2 tensor(s) tied (1 exact, 1 transposed, 0 near)" in out and f"saved 16.0 KiB ({2 * W:,} bytes)" in out
    before = (tmp_path / "in.safetensors").stat().st_size
    assert before - (tmp_path / "out.safetensors").stat().st_size >= 2 * W - 512
    fresh = Net()
    assert ps.find_ties(fresh) == []
    assert ps.load(fresh, tmp_path / "out.safetensors") == ps.LoadResult([], [])
    kinds = {(g.kind, g.source, g.members) for g in ps.find_ties(fresh)}
    assert kinds == {("alias", "enc.weight", ("enc.weight", "copy.weight")), ("transpose", "enc.weight", ("dec.weight",))}
    # every tensor comes back bit for bit; the output only differs by the rounding of a matmul on a transposed view
    for name, value in net.state_dict().items():
        module, _, attr = name.rpartition(".")
        assert torch.equal(getattr(fresh.get_submodule(module), attr), value), name
    torch.testing.assert_close(fresh(x), net(x), rtol=1e-6, atol=1e-5)

    # --near also ties the twin: outputs move a little, every replaced tensor stays within the threshold
    code, out, err = cli(capsys, "dedupe", tmp_path / "in.safetensors", tmp_path / "near.safetensors", "--near", "0.99", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert (res["exact"], res["transposed"], res["near"]) == (1, 1, 1) and res["bytes_saved"] == 3 * W
    assert res["lowest_near_cosine"] >= 0.99
    fresh = Net()
    ps.load(fresh, tmp_path / "near.safetensors")
    assert fresh.twin.weight is fresh.enc.weight
    with torch.no_grad():
        rel = ((fresh(x) - net(x)).norm() / net(x).norm()).item()
    assert 0 < rel < 0.2, rel
    # unreadable input: exit 2, nothing written
    code, _, err = cli(capsys, "dedupe", tmp_path / "absent.safetensors", tmp_path / "x.safetensors")
    assert code == 2 and "no such file" in err and not (tmp_path / "x.safetensors").exists()
