"""ps.cluster / ps.uncluster, the codebook kind, set_codebook, checkpoints of clustered models and
``paramshare compress``."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import paramshare as ps
from paramshare.cluster import get_codebook, set_codebook, sse
from paramshare.kinds.codebook import Codebook


def mlp(seed: int = 0, width: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


def x_in(n: int = 16) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(1))


def test_cluster_makes_codebook_weights_and_keeps_forward():
    m = mlp()
    dense = [m[i].weight.detach().clone() for i in (0, 2)]
    ps.cluster(m, bits=3, min_numel=1000)
    assert isinstance(m[0], nn.Linear) and type(m[0]).__name__ == "ParametrizedLinear"
    assert isinstance(m[4], nn.Linear) and type(m[4]) is nn.Linear  # 5*64 < 1000: stays dense
    for i, d in zip((0, 2), dense):
        w = m[i].weight
        assert w.unique().numel() <= 8 and w.shape == d.shape
        cb = m[i].parametrizations.weight[0]
        assert isinstance(cb, Codebook) and cb.labels.dtype == torch.uint8
        # optimal: the codebook is the exact 1-D k-means of the weight
        c, labels = ps.kmeans1d(d, 8)
        assert sse(d, m[i].parametrizations.weight.original.detach(), cb.labels.long()) == pytest.approx(sse(d, c, labels), rel=1e-6)
        assert not torch.equal(w, d)  # negative: the weight changed
    # the clustered forward is the dense forward with the reconstructed weights
    x = x_in()
    h = F.relu(F.linear(x, m[0].weight, m[0].bias))
    h = F.relu(F.linear(h, m[2].weight, m[2].bias))
    torch.testing.assert_close(m(x), F.linear(h, m[4].weight, m[4].bias), rtol=0, atol=0)
    names = [n for n, _ in m.named_parameters()]
    assert "0.parametrizations.weight.original" in names and "0.weight" not in names
    r = ps.report(m)
    assert [g.kind for g in r.groups] == ["codebook", "codebook"]
    assert "8 clusters" in r.rows[0].stats.detail and "bits/weight" in r.rows[0].stats.detail
    # 3-bit labels plus 8 float32 centroids
    assert r.rows[0].stats.stored_bytes == 8 * 4 + -(-32 * 64 * 3 // 8)
    assert r.rows[0].stats.detail.endswith("800 B with the codebook")  # bytes: labels and centroids


def test_centroid_gradients_are_summed_member_gradients_and_fine_tuning_works():
    m = mlp()
    ps.cluster(m, clusters=6, min_numel=1000)
    x, y = x_in(), torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
    w = m[2].weight.detach().requires_grad_()
    # the gradient of the loss with respect to the dense weight, through a plain forward
    h = F.relu(F.linear(x, m[0].weight.detach(), m[0].bias.detach()))
    out = F.linear(F.relu(F.linear(h, w, m[2].bias.detach())), m[4].weight.detach(), m[4].bias.detach())
    F.cross_entropy(out, y).backward()
    F.cross_entropy(m(x), y).backward()
    cent = m[2].parametrizations.weight.original
    labels = m[2].parametrizations.weight[0].labels.long()
    want = torch.zeros(6).index_add_(0, labels.reshape(-1), w.grad.reshape(-1))
    torch.testing.assert_close(cent.grad, want)
    assert cent.grad.abs().sum() > 0
    # fine-tuning with any optimizer keeps the codebook structure and lowers the loss
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < first
    assert m[2].weight.unique().numel() <= 6
    assert torch.equal(m[2].parametrizations.weight[0].labels.long(), labels)  # labels are not trained


def test_granularity_channel_and_groups():
    m = mlp()
    ps.cluster(m, bits=2, granularity="channel", include="2.weight", min_numel=0)
    c = m[2].parametrizations.weight.original
    assert c.shape == (64, 4)
    assert all(m[2].weight[r].unique().numel() <= 4 for r in range(64))
    m2 = mlp()
    ps.cluster(m2, bits=2, granularity=16, include=["0", "2"], min_numel=0)
    assert m2[0].parametrizations.weight.original.shape == (4, 4)
    w = m2[0].weight
    for g in range(4):
        assert w[16 * g:16 * (g + 1)].unique().numel() <= 4
    # per-channel optimum beats (or ties) one codebook for the tensor
    m3 = mlp()
    ps.cluster(m3, bits=2, include="2.weight", min_numel=0)
    d = mlp()[2].weight.detach()
    assert (m[2].weight - d).square().sum() < (m3[2].weight - d).square().sum()
    # the batched per-row programme is exact: each row's error equals kmeans1d's
    for r in (0, 17, 63):
        cr, lr = ps.kmeans1d(d[r], 4)
        assert (m[2].weight[r] - d[r]).square().sum().item() == pytest.approx(sse(d[r], cr, lr), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("init", ["optimal", "kmeans++", "linear", "density"])
def test_inits(init):
    m = mlp()
    d = m[2].weight.detach().clone()
    ps.cluster(m, bits=3, include="2.weight", min_numel=0, init=init)
    assert m[2].weight.unique().numel() <= 8
    err = (m[2].weight - d).square().sum().item()
    c, labels = ps.kmeans1d(d, 8)
    assert err >= sse(d, c, labels) * (1 - 1e-6)  # none beats the optimum
    if init == "linear":
        cent = m[2].parametrizations.weight.original.detach()
        torch.testing.assert_close(cent, torch.linspace(d.min(), d.max(), 8))


def test_prune_pins_a_zero_centroid_that_stays_zero():
    m = mlp()
    ps.cluster(m, bits=2, prune=0.5, include="2.weight", min_numel=0)
    w = m[2].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 4096)
    cent = m[2].parametrizations.weight.original
    assert cent[0].item() == 0.0
    before = cent.detach().clone()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
    for step in range(3):
        opt.zero_grad()
        m(x_in()).square().sum().backward()
        if step == 0:
            assert cent.grad[0].item() == 0.0 and cent.grad[1:].abs().sum() > 0
        opt.step()
    assert m[2].weight.eq(0).float().mean().item() == pytest.approx(0.5, abs=1 / 4096)
    assert cent[0].item() == 0.0 and not torch.equal(cent[1:], before[1:])
    p = ps.plan(m)
    assert p.groups[0].options["zero"] is True


def test_activation_aware_clustering_lowers_output_error():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight[:, :4] *= 0.05  # a few input features carry most of the energy, through small weights
    scale = torch.ones(64)
    scale[:4] = 30.0
    x = torch.randn(512, 64) * scale
    ref = lin(x).detach()

    def copy_of_lin():
        q = nn.Sequential(nn.Linear(64, 32))
        q[0].load_state_dict(lin.state_dict())
        return q

    plain, aware = copy_of_lin(), copy_of_lin()
    ps.cluster(plain, bits=2, min_numel=0)
    ps.cluster(aware, bits=2, min_numel=0, data=[x[:256], (x[256:],)])
    err_plain = (plain(x) - ref).square().mean().item()
    err_aware = (aware(x) - ref).square().mean().item()
    assert err_aware < 0.2 * err_plain
    # negative: on the weights alone the activation-aware codebook is worse
    wd = lin.weight.detach()
    assert (aware[0].weight - wd).square().sum() > (plain[0].weight - wd).square().sum()
    # the same with a codebook per group of 8 output channels
    plain_g, aware_g = copy_of_lin(), copy_of_lin()
    ps.cluster(plain_g, bits=2, min_numel=0, granularity=8)
    ps.cluster(aware_g, bits=2, min_numel=0, granularity=8, data=x)
    assert aware_g[0].parametrizations.weight.original.shape == (4, 4)
    assert (aware_g(x) - ref).square().mean() < 0.5 * (plain_g(x) - ref).square().mean()


def test_tied_weights_are_clustered_once_and_uncluster_restores_the_tie():
    lm = nn.ModuleDict({"embed": nn.Embedding(100, 16), "head": nn.Linear(16, 100, bias=False)})
    ps.tie(lm, "embed.weight", "head.weight")
    ps.cluster(lm, bits=4, min_numel=0)
    (g,) = ps.find_ties(lm)
    assert g.kind == "codebook" and g.members == ("embed.weight", "head.weight")
    assert lm["embed"].parametrizations.weight.original is lm["head"].parametrizations.weight.original
    assert len(list(lm.parameters())) == 1
    before = lm["head"].weight.detach().clone()
    ps.uncluster(lm)
    assert type(lm["head"]) is nn.Linear and lm["embed"].weight is lm["head"].weight
    assert torch.equal(lm["head"].weight, before)
    assert [t.kind for t in ps.find_ties(lm)] == ["alias"]


def test_recluster_and_untie():
    m = mlp()
    ps.cluster(m, bits=4, min_numel=1000)
    ps.cluster(m, bits=2, include="2.weight", min_numel=0)
    assert m[2].weight.unique().numel() <= 4 and m[0].weight.unique().numel() > 4
    ps.untie(m, "2.weight")
    assert type(m[2]) is nn.Linear and m[2].weight.unique().numel() <= 4
    assert [g.members for g in ps.find_ties(m)] == [("0.weight",)]


def test_set_and_get_codebook():
    m = mlp()
    labels = (m[2].weight > 0).long()
    set_codebook(m, "2.weight", torch.tensor([-0.1, 0.1]), labels)
    c, lab = get_codebook(m, "2.weight")
    assert torch.equal(lab, labels) and c.requires_grad
    assert torch.equal(m[2].weight, torch.where(labels.bool(), 0.1, -0.1))
    set_codebook(m, "0.weight", torch.tensor([[5.0, 1.0]] * 4), torch.ones(64, 32, dtype=torch.long), zero=True)
    assert m[0].weight.unique().tolist() == [1.0]
    assert ps.plan(m).groups[0].options["granularity"] == 16
    with pytest.raises(ps.SharingError, match="not clustered"):
        get_codebook(m, "4.weight")


def test_bad_input_leaves_model_unchanged(unchanged):
    m = mlp()
    bad = [
        dict(bits=4, clusters=16), dict(), dict(bits=0), dict(bits=17), dict(clusters=1), dict(bits=2.0),
        dict(bits=4, granularity=7, min_numel=0), dict(bits=4, granularity="row"), dict(bits=4, init="random"),
        dict(bits=4, include="decoder.*"), dict(bits=4, exclude="nothing"), dict(bits=4, min_numel=10**9),
        dict(bits=4, prune=1.0), dict(bits=4, data=[torch.randn(2, 7)]), dict(bits=4, data=[[]]),
    ]
    for kwargs in bad:
        with unchanged(m), pytest.raises(ps.SharingError):
            ps.cluster(m, **kwargs)
    with unchanged(m), pytest.raises(ps.SharingError, match="does not divide the 64 output channels.*choose a group size"):
        ps.cluster(m, bits=2, granularity=5, include="2.weight", min_numel=0)
    with unchanged(m), pytest.raises(ps.SharingError, match="matches no parameter"):
        ps.cluster(m, bits=2, include="3.weight")
    ae = ps.tie(nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 40)), "0.weight", "1.weight", transpose=True)
    with unchanged(ae), pytest.raises(ps.SharingError, match="reads it transposed"):
        ps.cluster(ae, bits=2, min_numel=0)
    with unchanged(m), pytest.raises(ps.SharingError, match="labels must be in 0..1"):
        set_codebook(m, "2.weight", torch.tensor([0.0, 1.0]), torch.full((64, 64), 2))
    with unchanged(m), pytest.raises(ps.SharingError, match="shape"):
        set_codebook(m, "2.weight", torch.tensor([0.0, 1.0]), torch.zeros(64, 63, dtype=torch.long))


def test_apply_plan_and_check_on_bad_plans():
    m = ps.cluster(mlp(), bits=2, min_numel=1000)
    p = ps.plan(m)
    d = p.to_dict()
    d["groups"][0]["options"]["clusters"] = 3
    with pytest.raises(ps.SharingError, match="bits=2 but 3 clusters take 2 bits|centroid shape"):
        ps.apply_plan(mlp(), d)
    d = p.to_dict()
    d["groups"][0]["options"]["granularity"] = 5
    with pytest.raises(ps.SharingError, match="granularity 5"):
        ps.apply_plan(mlp(), d)
    # a differently clustered model does not match the plan; apply_plan re-clusters it
    other = ps.cluster(mlp(), bits=3, min_numel=1000)
    assert any("the plan says 4" in s for s in ps.check(other, p))
    ps.apply_plan(other, p)
    assert ps.check(other, p) == []


# ---- checkpoints ---------------------------------------------------------------------------------
def big() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))


def test_checkpoint_round_trip_is_bit_exact_and_small(tmp_path):
    m = ps.cluster(big(), bits=4)
    dense_path, path, z_path = tmp_path / "dense.safetensors", tmp_path / "c.safetensors", tmp_path / "z.safetensors"
    ps.save(big(), dense_path)
    ps.save(m, path)
    ps.save(m, z_path, compress=True)
    fresh = big()
    assert ps.load(fresh, path) == ps.LoadResult([], [])
    for a, b in zip(fresh.state_dict().values(), m.state_dict().values()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    x = torch.randn(8, 256)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)
    dense, clustered, entropy = (os.path.getsize(p) for p in (dense_path, path, z_path))
    assert clustered * 7.5 <= dense, (dense, clustered)
    assert entropy <= clustered
    print(f"\nfile sizes: dense {dense:,} B, 4-bit clustered {clustered:,} B ({dense / clustered:.2f}x), "
          f"entropy-coded {entropy:,} B ({dense / entropy:.2f}x)")
    # the file holds packed labels: 4 bits per weight
    ck = ps.read(path)
    assert ck.tensors["0.parametrizations.weight.original.labels"].numel() == 256 * 512 // 2
    # pruned + clustered weights entropy-code much smaller
    mp = ps.cluster(big(), bits=4, prune=0.8)
    ps.save(mp, tmp_path / "p.safetensors", compress=True)
    assert os.path.getsize(tmp_path / "p.safetensors") < 0.75 * entropy
    fresh = big()
    ps.load(fresh, tmp_path / "p.safetensors")
    torch.testing.assert_close(fresh(x), mp(x), rtol=0, atol=0)


def test_load_rejects_corrupt_labels_and_leaves_model_unchanged(tmp_path, unchanged):
    import safetensors.torch as st

    m = ps.cluster(big(), bits=3)  # 3 bits hold 0..7; 8 clusters
    path = tmp_path / "c.safetensors"
    ps.save(m, path)
    tensors = st.load_file(path)
    meta = ps.read(path)
    name = "0.parametrizations.weight.original.labels"
    tensors[name] = tensors[name][:-1].clone()
    from paramshare.checkpoint import FORMAT_KEY, FORMAT_VERSION, PLAN_KEY

    st.save_file(tensors, tmp_path / "bad.safetensors", metadata={FORMAT_KEY: str(FORMAT_VERSION), PLAN_KEY: meta.plan.to_json()})
    fresh = big()
    with unchanged(fresh), pytest.raises(ps.CheckpointError, match="labels"):
        ps.load(fresh, tmp_path / "bad.safetensors")


# ---- paramshare compress -----------------------------------------------------------------------
def test_compress_command(tmp_path):
    import safetensors.torch as st

    m = big()
    src, dst = tmp_path / "w.safetensors", tmp_path / "c.safetensors"
    st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, src)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "src"), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-m", "paramshare.cli", "compress", str(src), str(dst), "--bits", "4", "--entropy"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "0.weight" in out.stdout and "2.weight" in out.stdout and "rel. error" in out.stdout
    assert "smaller" in out.stdout
    fresh = big()
    ps.load(fresh, dst)
    assert fresh[0].weight.unique().numel() <= 16
    rel = (fresh[0].weight - m[0].weight).norm() / m[0].weight.norm()
    assert 0 < rel < 0.2
    assert os.path.getsize(dst) * 7 < os.path.getsize(src)
    bad = subprocess.run(
        [sys.executable, "-m", "paramshare.cli", "compress", str(src), str(dst), "--bits", "4", "--granularity", "7"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert bad.returncode == 2 and "does not divide" in bad.stderr



def test_compress_command_reports_unreadable_input(tmp_path, capsys):
    from paramshare.cli import main

    assert main(["compress", str(tmp_path / "nope.safetensors"), str(tmp_path / "out.safetensors")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_compress_file_function(tmp_path):
    import safetensors.torch as st

    from paramshare.cluster.compress import compress_file

    t = {"emb.weight": torch.randn(300, 16), "emb2.weight": torch.randn(2, 8), "norm.weight": torch.ones(4096)}
    st.save_file(t, tmp_path / "w.safetensors")
    info = compress_file(tmp_path / "w.safetensors", tmp_path / "c.safetensors", bits=2, min_numel=1000)
    assert [r["name"] for r in info["rows"]] == ["emb.weight"]  # 2-D and large enough
    r = info["rows"][0]
    assert r["bits_per_weight"] == pytest.approx(2 + 4 * 32 / 4800) and 0 < r["rel_error"] < 1
    ck = ps.read(tmp_path / "c.safetensors")
    assert torch.equal(ck.tensors["norm.weight"], t["norm.weight"])
    with pytest.raises(ps.SharingError, match="no tensor"):
        compress_file(tmp_path / "w.safetensors", tmp_path / "d.safetensors", bits=2, min_numel=10**6)
    with pytest.raises(ps.SharingError, match="already has a sharing plan"):
        compress_file(tmp_path / "c.safetensors", tmp_path / "d.safetensors", bits=2)
