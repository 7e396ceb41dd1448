"""Checkpoints: ps.save/ps.load against safetensors' save_model/load_model and torch.save/torch.load.

Two models, side by side in one run, the contenders alternating in every round (medians):

* all-MiniLM-L6-v2 (real weights, no ties): the overhead of carrying a plan;
* a 12-block byte-level transformer (d=256, vocabulary 256) whose blocks share one set of
  weights (``share_layers(unique=1)``) and whose output layer is tied to the embeddings: what a sharing-aware file saves, and
  whether ties come back when the file is loaded into a freshly built, untied model.

``ps.save`` fsyncs the file (durable, atomic); ``save_model`` and ``torch.save`` do not, so
the table also shows ``save_model`` followed by an fsync, the peer with the same durability.

Then ``paramshare inspect`` timings: the MiniLM file, with and without ``--near``, and a
synthetic 100 MB file of 100 same-shape matrices (the worst case for the near search) with
planted near duplicates.

Run: ``.venv/bin/python benchmarks/checkpoint.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, minilm_dir  # noqa: E402

import paramshare as ps  # noqa: E402


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.n1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff(self.n2(x))


class SharedTransformer(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 256, blocks: int = 12, shared: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
        self.head = nn.Linear(d, vocab, bias=False)
        if shared:
            ps.tie(self, "embed.weight", "head.weight")
            ps.share_layers(self.blocks, unique=1, strategy="all")

    def forward(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def measure(contenders: dict, rounds: int) -> dict[str, float]:
    """Median seconds per contender, alternating them in every round.

    Every call starts with no dirty pages (``os.sync()`` before it, not timed): otherwise the
    disk is still writing back what the previous contender left unsynced (``save_model`` and
    ``torch.save`` do not sync) while the next one runs, and whoever syncs pays for it.
    """
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            os.sync()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(title: str, med: dict[str, float], peer: str) -> None:
    print(f"\n{title}")
    print(f"  {'contender':44s} {'median s':>9s} {'vs ' + peer:>18s}")
    for k, v in med.items():
        print(f"  {k:44s} {v:9.4f} {v / med[peer]:17.2f}x")


def bench_model(name: str, model: nn.Module, fresh_factory, untied_factory, run, folder: Path, rounds: int) -> None:
    import safetensors.torch as st

    header(f"{name}: save / load")
    p_ps, p_st, p_pt = folder / f"{name}.ps.safetensors", folder / f"{name}.st.safetensors", folder / f"{name}.pt"
    saves = {
        "ps.save": lambda: ps.save(model, p_ps),
        "safetensors.save_model": lambda: st.save_model(model, p_st),
        "safetensors.save_model + fsync": lambda: (st.save_model(model, p_st), fsync_file(p_st)),
        "torch.save(state_dict)": lambda: torch.save(model.state_dict(), p_pt),
    }
    report(f"save ({rounds} rounds)", measure(saves, rounds), "safetensors.save_model")

    target_ps, target_st, target_pt = fresh_factory(), fresh_factory(), fresh_factory()
    loads = {
        "ps.load": lambda: ps.load(target_ps, p_ps),
        "safetensors.load_model": lambda: st.load_model(target_st, p_st),
        "torch.load(weights_only) + load_state_dict": lambda: target_pt.load_state_dict(torch.load(p_pt, weights_only=True)),
    }
    report(f"load into a model built like the saved one ({rounds} rounds)", measure(loads, rounds), "safetensors.load_model")

    sizes = {"ps.save": p_ps.stat().st_size, "safetensors.save_model": p_st.stat().st_size, "torch.save": p_pt.stat().st_size}
    r = ps.report(model)
    params = {id(p) for p in model.parameters()}
    persistent = {id(t): t for t in model.state_dict(keep_vars=True).values() if id(t) not in params}
    unique = r.unique_bytes + sum(t.numel() * t.element_size() for t in persistent.values())
    ck = ps.read(p_ps)
    untied = untied_factory()
    p_untied = folder / f"{name}.untied.safetensors"
    ps.save(untied, p_untied)
    print("\nfile sizes")
    print(f"  unique bytes (stored tensors, each once)   {unique:>12,}")
    print(f"  ps.save                                    {sizes['ps.save']:>12,}  = unique + header {ck.header_bytes:,}"
          f"  ({'equal' if sizes['ps.save'] == unique + ck.header_bytes else 'DIFFERENT'})")
    print(f"  safetensors.save_model                     {sizes['safetensors.save_model']:>12,}"
          f"  ps - st = {sizes['ps.save'] - sizes['safetensors.save_model']:+,} bytes (headers: ps carries the plan, with shorter offsets)")
    print(f"  torch.save(state_dict)                     {sizes['torch.save']:>12,}")
    print(f"  ps.save of the same model untied           {p_untied.stat().st_size:>12,}"
          f"  shared / untied = {sizes['ps.save'] / p_untied.stat().st_size:.4f} (1/{p_untied.stat().st_size / sizes['ps.save']:.2f})")

    # ties after loading into a freshly built, untied model
    out = {}
    for label, loader in {
        "ps.load": lambda m: ps.load(m, p_ps),
        "safetensors.load_model": lambda m: st.load_model(m, p_st, strict=False),
        "torch load_state_dict": lambda m: m.load_state_dict(torch.load(p_pt, weights_only=True), strict=False),
    }.items():
        m = untied_factory()
        t0 = time.perf_counter()
        loader(m)
        dt = time.perf_counter() - t0
        same_ties = ps.find_ties(m) == ps.find_ties(model)
        with torch.no_grad():
            same_out = torch.equal(run(m), run(model))
        out[label] = (dt, same_ties, same_out, ps.report(m).unique_bytes)
    print("\nload into a freshly built UNTIED model (one run each)")
    print(f"  {'loader':30s} {'seconds':>8s} {'ties restored':>14s} {'same outputs':>13s} {'stored bytes after':>19s}")
    for k, (dt, t, o, ub) in out.items():
        print(f"  {k:30s} {dt:8.3f} {str(t):>14s} {str(o):>13s} {ub:>19,}")


def bench_inspect(folder: Path, quick: bool) -> None:
    from paramshare._cli_inspect import inspect_file

    header("paramshare inspect")
    f = minilm_dir() / "model.safetensors"
    rows = []
    for near in (None, 0.9):
        t0 = time.perf_counter()
        info = inspect_file(f, near=near)
        rows.append((f"MiniLM {f.stat().st_size / 1e6:.0f} MB" + (f", --near {near}" if near else ""), time.perf_counter() - t0,
                     len(info["near_duplicates"] or [])))
    n, side = (25, 512) if quick else (100, 512)
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(side, side, generator=g) for i in range(n)}
    planted = [(1, 2), (10, 11), (20, 21)]
    for a, b in planted:
        tensors[f"layer{b}.weight"] = tensors[f"layer{a}.weight"] + 0.2 * torch.randn(side, side, generator=g)
    import safetensors.torch as st

    big = folder / "synthetic.safetensors"
    st.save_file(tensors, big)
    for near in (None, 0.95):
        t0 = time.perf_counter()
        info = inspect_file(big, near=near)
        found = {frozenset((d["a"], d["b"])) for d in info["near_duplicates"] or []}
        rows.append((f"synthetic {big.stat().st_size / 1e6:.0f} MB, {n} x {side}x{side}" + (f", --near {near}" if near else ""),
                     time.perf_counter() - t0, len(found)))
        if near:
            want = {frozenset((f"layer{a}.weight", f"layer{b}.weight")) for a, b in planted}
            print(f"  planted near pairs found: {len(found & want)}/{len(want)}, others listed: {len(found - want)}")
    print(f"  {'file':52s} {'seconds':>8s} {'near pairs':>11s}")
    for label, dt, k in rows:
        print(f"  {label:52s} {dt:8.2f} {k:>11d}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds, smaller synthetic file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rounds = 3 if args.quick else 25
    from transformers import AutoConfig, AutoModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cfg = AutoConfig.from_pretrained(minilm_dir())
        minilm = AutoModel.from_pretrained(minilm_dir()).eval()
        enc = {"input_ids": torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))}
        bench_model(
            "MiniLM", minilm, lambda: AutoModel.from_config(cfg).eval(), lambda: AutoModel.from_config(cfg).eval(),
            lambda m: m(**enc).last_hidden_state, folder, rounds,
        )
        torch.manual_seed(0)
        shared = SharedTransformer().eval()
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        bench_model(
            "SharedTransformer12", shared, lambda: SharedTransformer().eval(), lambda: SharedTransformer(shared=False).eval(),
            lambda m: m(tokens), folder, rounds * 4,  # milliseconds a call: more rounds steady the median
        )
        bench_inspect(folder, args.quick)


if __name__ == "__main__":
    main()
