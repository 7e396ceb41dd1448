"""Real ``torch.distributed`` processes for tests/test_distributed.py.

The test process calls :func:`launch`, which starts ``world`` copies of this file as separate
Python processes (gloo, localhost, a free port; environment variables as ``torchrun`` sets
them) with a hard timeout. Each rank runs every scenario of one suite (``ddp`` or ``fsdp``),
each scenario catching its own exception, and writes its results to ``<outdir>/rank<r>.pt``
(tensors, strings, lists; read back with ``weights_only=True``). The test process computes the
single-process references with the same functions and compares.

One process start per suite keeps the whole distributed test file within its time budget.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import paramshare as ps

VOCAB, DIM, SEQ, BATCH, STEPS, LR = 16, 8, 5, 8, 3, 0.2
ROOT = Path(__file__).resolve().parents[1]


# ---- the models ----------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int = DIM):
        super().__init__()
        self.a = nn.Linear(d, 2 * d)
        self.b = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


class TinyLM(nn.Module):
    """Embedding, four residual blocks, a LayerNorm and an output layer."""

    def __init__(self, n_blocks: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(n_blocks))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


@dataclass
class DistCase:
    """One way of sharing the TinyLM: ``kind`` is the sharing kind it exercises."""

    name: str
    kind: str
    share: Callable[[nn.Module], nn.Module]

    def __str__(self) -> str:
        return self.name


def _layers_shared(m: nn.Module) -> nn.Module:
    ps.share_layers(m.blocks, unique=2)
    return m


def _template_share():
    from paramshare.bank import template_share

    return getattr(ps, "template_share", template_share)


def _relax():
    from paramshare.relaxed import relax

    return getattr(ps, "relax", relax)


def _hash_shared(m: nn.Module) -> nn.Module:
    ps.share_layers(m.blocks, unique=2)
    return ps.hash(m, 0.5, include="blocks.*")


CASES = [
    DistCase("alias-layers", "alias", _layers_shared),
    DistCase("alias-embed", "alias", lambda m: ps.tie(m, "embed.weight", "head.weight")),
    # blocks 0 and 2 read blocks.0.a.weight transposed: a tie across blocks through a parametrization
    DistCase("transpose", "transpose", lambda m: ps.tie(m, "blocks.0.a.weight", "blocks.0.b.weight", "blocks.2.b.weight", transpose=True)),
    # budgets shared by blocks 0/2 and 1/3 (hashing an aliased weight gives one budget)
    DistCase("hash", "hash", _hash_shared),
    # blocks' a.weight as mixtures of 2 templates that all four blocks share
    DistCase("bank", "bank", lambda m: (_template_share()(m.blocks, templates=2, params=("a.weight",)), m)[1]),
    # blocks 0/2 and 1/3 share a base weight; each use adds its own rank-2 delta
    DistCase("delta", "delta", lambda m: _relax()(_layers_shared(m), rank=2)),
    # blocks 0/2 and 1/3 share weights, each shared weight clustered once into 4 values
    DistCase("codebook", "codebook", lambda m: ps.cluster(_layers_shared(m), bits=2, include="blocks.*", min_numel=1)),
    # columns of blocks.1.a.weight: inputs 0, 1, 7 share one vector, 2 and 4 another, 5 and 6 a third; 3 pruned
    DistCase("rows", "rows", lambda m: (ps.tie_rows(m, "blocks.1.a.weight", [0, 0, 1, -1, 1, 2, 2, 0]), m)[1]),
]
BY_NAME = {c.name: c for c in CASES}


def build(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM()


def shared(case: str | DistCase, seed: int = 0) -> nn.Module:
    case = BY_NAME[case] if isinstance(case, str) else case
    return case.share(build(seed))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    return x, y


def local_batch(rank: int, world: int):
    x, y = data()
    n = BATCH // world
    return x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def train(model: nn.Module, x, y, steps: int = STEPS, params=None) -> list[float]:
    opt = torch.optim.SGD(model.parameters() if params is None else params, lr=LR, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def reference(case: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    """Single process, whole batch: the parameters every distributed run must reproduce."""
    m = shared(case)
    x, y = data()
    train(m, x, y, steps)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


class Siamese(nn.Module):
    """One encoder used twice per step; its last layers run under activation checkpointing."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        self.reentrant = reentrant

    def embed(self, x):
        from torch.utils.checkpoint import checkpoint

        h = self.enc[0](x)
        return checkpoint(self.enc[1:], h, use_reentrant=self.reentrant)

    def forward(self, a, b):
        return F.cosine_similarity(self.embed(a), self.embed(b))


def siamese_data():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 6, generator=g)
    target = torch.rand(BATCH, generator=g) * 2 - 1
    return a, b, target


def siamese_reference(steps: int = STEPS) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = Siamese(reentrant=False)
    a, b, t = siamese_data()
    _siamese_train(m, a, b, t, steps)
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _siamese_train(model, a, b, t, steps):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(a, b), t).backward()
        opt.step()


# ---- helpers inside a rank -----------------------------------------------------------------
def full_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored parameter, unsharded (collective for DTensors: same order on every rank)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if isinstance(p, DTensor) else p
        out[n] = t.detach().clone()
    return out


def naive_shard(model: nn.Module, mesh) -> None:
    """The wrapping PyTorch examples use: one unit per Linear/Embedding, then the root."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():  # as shard does: FSDP2 takes contiguous parameters only
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _params_ids(model):
    return [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]


# ---- suites --------------------------------------------------------------------------------
def suite_ddp(rank: int, world: int, outdir: Path, run) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y = local_batch(rank, world)
    for case in CASES:

        def ddp_train(case=case):
            m = shared(case)
            plan = ps.plan(m)
            d = DDP(m)
            losses = train(d, x, y)
            return {
                "params": {n: p.detach().clone() for n, p in m.named_parameters()},
                "check": ps.check(m, plan),
                "check_ties": ps.distributed.check_ties(d),
                "losses": losses,
            }

        run(f"ddp/{case}", ddp_train)

    def ddp_save_load():
        m = shared("transpose")
        d = DDP(m)
        train(d, x, y)
        path = outdir / "ddp.safetensors"
        ps.distributed.save(d, path)  # rank 0 writes, the others wait for it
        fresh = shared("transpose", seed=5)
        ps.distributed.load(DDP(fresh), path)  # every rank reads the file
        return {"params": {k: p.detach().clone() for k, p in m.named_parameters()},
                "loaded": {k: p.detach().clone() for k, p in fresh.named_parameters()}}

    run("ddp-save-load", ddp_save_load)

    a, b, t = siamese_data()
    n = BATCH // world
    sa, sb, st = a[rank * n : (rank + 1) * n], b[rank * n : (rank + 1) * n], t[rank * n : (rank + 1) * n]

    def siamese(reentrant: bool, static_graph: bool):
        torch.manual_seed(0)
        m = Siamese(reentrant)
        d = DDP(m, static_graph=static_graph)
        _siamese_train(d, sa, sb, st, STEPS)
        return {"params": {k: p.detach().clone() for k, p in m.named_parameters()}, "check_ties": ps.distributed.check_ties(d)}

    run("siamese/non-reentrant", lambda: siamese(False, False))
    run("siamese/reentrant-static-graph", lambda: siamese(True, True))

    # check_ties: a rank whose ties differ, a rank whose values differ
    def ties_differ():
        m = shared("alias-embed")
        if rank == 1:
            ps.untie(m, "head.weight")
        return {"problems": ps.distributed.check_ties(m)}

    def values_differ():
        m = shared("transpose")
        if rank == 1:
            with torch.no_grad():
                m.blocks[0].a.weight[0, 0] += 1e-3
        return {"problems": ps.distributed.check_ties(m)}

    def labels_differ():  # the same kind and members, other labels: only the options differ
        m = build()
        labels = [0, 0, 1, -1, 1, 2, 2, 0] if rank == 0 else [0, 1, 1, -1, 1, 2, 2, 0]
        ps.tie_rows(m, "blocks.1.a.weight", labels)
        return {"problems": ps.distributed.check_ties(m)}

    run("check_ties/ties-differ", ties_differ)
    run("check_ties/options-differ", labels_differ)
    run("check_ties/values-differ", values_differ)
    # the negative control last: reentrant checkpointing of a module used twice, plain DDP
    def reentrant_plain_ddp():
        try:
            siamese(True, False)
        except RuntimeError as e:  # what the negative control is about
            return {"error": str(e)}
        return {"error": ""}

    run("siamese/reentrant", reentrant_plain_ddp)


def suite_fsdp(rank: int, world: int, outdir: Path, run) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    x, y = local_batch(rank, world)
    probe = data()[0][:2]
    for case in CASES:
        trained = {}

        def fsdp_train(case=case):
            m = shared(case)
            plan = ps.plan(m)
            groups = ps.distributed.fsdp_groups(m)
            ps.distributed.shard(m, mesh=mesh)
            losses = train(m, x, y)
            trained["model"] = m
            with torch.no_grad():
                out = m(probe).detach().clone()
            return {
                "groups": groups,
                "params": full_params(m),
                "check": ps.check(m, plan),
                "check_ties": ps.distributed.check_ties(m),
                "losses": losses,
                "out": out,
            }

        run(f"fsdp/{case}", fsdp_train)

        def save_load(case=case):
            m = trained["model"]
            path = outdir / f"{case}.safetensors"
            ps.save(m, path)
            fresh = shared(case, seed=1)  # other initial values
            plan = ps.plan(fresh)
            ps.distributed.shard(fresh, mesh=mesh)
            with torch.no_grad():
                before = fresh(probe).detach().clone()
            ps.load(fresh, path)
            with torch.no_grad():
                after = fresh(probe).detach().clone()
                ref = m(probe).detach().clone()
            return {
                "before": before,
                "after": after,
                "ref": ref,
                "check": ps.check(fresh, plan),
                "params": full_params(fresh),
                "file_exists": path.exists(),
            }

        run(f"save_load/{case}", save_load)

        def meta_shard_first(case=case):
            plan = ps.plan(shared(case))
            with torch.device("meta"):
                m = shared(case)
            ps.distributed.shard(m, mesh=mesh)
            m.to_empty(device="cpu")
            after_to_empty = ps.check(m, plan)  # nothing to re-tie: apply_plan is for unsharded models
            ps.distributed.load_full_state_dict(m, shared(case).state_dict())
            losses = train(m, x, y)
            return {"after_to_empty": after_to_empty, "check": ps.check(m, plan), "params": full_params(m), "losses": losses}

        run(f"meta-shard-first/{case}", meta_shard_first)

        def meta_plain_first(case=case):
            plan = ps.plan(shared(case))
            with torch.device("meta"):
                m = shared(case)
            m.to_empty(device="cpu")
            after_to_empty = ps.check(m, plan)
            ps.apply_plan(m, plan)
            retied = ps.check(m, plan)
            m.load_state_dict(shared(case).state_dict())
            ps.distributed.shard(m, mesh=mesh)
            losses = train(m, x, y)
            return {"after_to_empty": after_to_empty, "retied": retied, "check": ps.check(m, plan),
                    "params": full_params(m), "losses": losses}

        run(f"meta-plain-first/{case}", meta_plain_first)

        def naive(case=case):
            m = shared(case)
            naive_shard(m, mesh)
            try:
                losses = train(m, x, y)
            except Exception as e:  # what the negative control is about: PyTorch rejects the split tie
                return {"error": f"{type(e).__name__}: {e}"}
            return {"error": "", "params": full_params(m), "losses": losses}

        run(f"naive/{case}", naive)

    # bad input: a mesh over one rank, unknown arguments, sharding twice; the model unchanged
    def bad_mesh():
        from torch.distributed.device_mesh import DeviceMesh

        small = DeviceMesh("cpu", torch.tensor([0]), _init_backend=False)
        m = shared("alias-layers")
        before = _params_ids(m)
        try:
            ps.distributed.shard(m, mesh=small)
            err = ""
        except ps.SharingError as e:
            err = str(e)
        return {"error": err, "unchanged": _params_ids(m) == before and not ps.distributed.is_sharded(m)}

    def bad_kwargs():
        m = shared("alias-layers")
        try:
            ps.distributed.shard(m, mesh=mesh, reshard_after_forwards=True)
            err = ""
        except ps.SharingError as e:
            err = str(e)
        return {"error": err, "unchanged": not ps.distributed.is_sharded(m)}

    def twice():
        m = ps.distributed.shard(shared("alias-layers"), mesh=mesh)
        try:
            ps.distributed.shard(m, mesh=mesh)
            err = ""
        except ps.SharingError as e:
            err = str(e)
        return {"error": err}

    def example():
        import importlib.util

        spec = importlib.util.spec_from_file_location("train_fsdp", ROOT / "examples" / "train_fsdp.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = mod.main(["--steps", "8", "--out", str(outdir / "example.safetensors")])
        return {**out, "first_loss_bound": math.log(mod.VOCAB)}

    def scalar_param():
        m = shared("alias-layers")
        m.register_parameter("temperature", nn.Parameter(torch.tensor(1.0)))
        try:
            ps.distributed.shard(m, mesh=mesh)
            err = ""
        except ps.SharingError as e:
            err = str(e)
        return {"error": err, "unchanged": not ps.distributed.is_sharded(m)}

    def load_into_untied():
        path = outdir / "alias-embed.safetensors"  # written by save_load/alias-embed
        m = ps.distributed.shard(build(seed=4), mesh=mesh)
        before = full_params(m)
        try:
            ps.load(m, path)
            err = ""
        except ps.CheckpointError as e:
            err = str(e)
        after = full_params(m)
        return {"error": err, "unchanged": all(torch.equal(before[k], after[k]) for k in before)}

    def load_missing():
        m = ps.distributed.shard(shared("alias-embed"), mesh=mesh)
        path = outdir / ("missing.safetensors" if rank == 1 else "alias-embed.safetensors")
        try:
            ps.load(m, path)  # only rank 1 lacks the file: every rank must fail, none may hang
            err = ""
        except ps.CheckpointError as e:
            err = str(e)
        return {"error": err}

    run("example/train_fsdp", example)
    run("bad/scalar", scalar_param)
    run("bad/load-untied", load_into_untied)
    run("bad/load-missing", load_missing)
    run("bad/mesh", bad_mesh)
    run("bad/kwargs", bad_kwargs)
    run("bad/twice", twice)


def suite_all(rank: int, world: int, outdir: Path, run) -> None:
    suite_ddp(rank, world, outdir, run)
    suite_fsdp(rank, world, outdir, run)


SUITES = {"ddp": suite_ddp, "fsdp": suite_fsdp, "all": suite_all}


def main(argv: list[str]) -> int:
    import datetime

    import torch.distributed as dist

    suite, outdir = argv[0], Path(argv[1])
    only = argv[2].split(",") if len(argv) > 2 and argv[2] else None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results: dict[str, dict] = {}

    def write() -> None:
        tmp = outdir / f".rank{rank}.pt.tmp"
        torch.save(results, tmp)
        os.replace(tmp, outdir / f"rank{rank}.pt")

    def run(name: str, fn) -> None:
        if only is not None and not any(name.startswith(o) for o in only):
            return
        print(f"scenario {name}", flush=True)  # the log shows where a hang happened
        t0 = time.perf_counter()
        try:
            r = dict(fn())
            r["ok"] = True
        except Exception:
            r = {"ok": False, "error": traceback.format_exc()}
        r["seconds"] = time.perf_counter() - t0
        results[name] = r
        write()  # after every scenario: a later hang keeps what finished
        dist.barrier()

    write()
    SUITES[suite](rank, world, outdir, run)
    dist.barrier()
    dist.destroy_process_group()
    return 0


# ---- the launcher (runs in the test process) ------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LaunchError(RuntimeError):
    pass


def launch(suite: str, outdir: Path, world: int = 2, timeout: float = 150.0, only: str = "") -> list[dict]:
    """Run a suite on ``world`` real processes; each rank's results. Kills every rank on timeout."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        port = free_port()
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs, logs = [], []
        for r in range(world):
            log = open(outdir / f"rank{r}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, __file__, suite, str(outdir), only],
                env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=log, stderr=subprocess.STDOUT,
            ))
        deadline = time.monotonic() + timeout
        timed_out = False
        try:
            for p in procs:
                left = deadline - time.monotonic()
                try:
                    p.wait(timeout=max(left, 0.1))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    break
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        text = "\n".join(f"--- rank {r} ---\n" + (outdir / f"rank{r}.log").read_text()[-4000:] for r in range(world))
        if timed_out:
            raise LaunchError(f"suite {suite!r} did not finish within {timeout:.0f} s (killed):\n{text}")
        if any(p.returncode for p in procs):
            if "address already in use" in text.lower() and attempt < 2:
                continue
            raise LaunchError(f"suite {suite!r} failed (exit codes {[p.returncode for p in procs]}):\n{text}")
        return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(world)]
    raise LaunchError("could not find a free port")  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
