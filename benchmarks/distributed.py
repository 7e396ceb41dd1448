"""Distributed training of shared models: what DDP sends, and what ``ps.distributed.shard`` costs.

Two processes, gloo, on this machine (the script starts them itself).

1. DDP all-reduce bytes per step for a 12-block model (d=128, blocks d -> 4d -> d): blocks
   independent, ``ps.share_layers(unique=3)`` and ``unique=1``. A communication hook counts
   the bytes of every gradient bucket. Ideal: the stored (unique) parameter bytes, as
   ``ps.report`` counts them. Goal: bytes / ideal <= 1.05 (communication proportional to
   unique parameters).
2. FSDP2 step time of the ``unique=3`` model sharded with ``ps.distributed.shard`` against the
   same model sharded by hand (``fully_shard([blocks i, i+3, i+6, i+9])`` written out), and,
   for reference, the simplest hand fix (one unit: ``fully_shard(model)`` only). Contenders
   alternate within one run; medians. Goal: shard / by-hand <= 1.10.

Usage: python benchmarks/distributed.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import paramshare as ps  # noqa: E402

BLOCKS, UNIQUE = 12, 3


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = nn.Linear(d, 4 * d)
        self.b = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.b(F.gelu(self.a(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int, unique: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(32, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(BLOCKS))
        self.out = nn.Linear(d, 10)
        if unique is not None:
            ps.share_layers(self.blocks, unique=unique, strategy="cycle")

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def batch(rank: int, n: int, seq: int):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, seq, 32, generator=g), torch.randint(0, 10, (n, seq), generator=g)


def step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x).reshape(-1, 10), y.reshape(-1))
    loss.backward()
    opt.step()


def ddp_bytes(rank: int, d: int, n: int, seq: int) -> list[tuple[str, int, int, int]]:
    """(name, bytes all-reduced per step, ideal bytes, parameters used) per model."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    rows = []
    x, y = batch(rank, n, seq)
    for name, unique in (("independent", None), (f"share_layers(unique={UNIQUE})", UNIQUE), ("share_layers(unique=1)", 1)):
        model = Net(d, unique)
        r = ps.report(model)
        ddp = DDP(model)
        counted = {"bytes": 0}

        def hook(state, bucket):
            buf = bucket.buffer()
            counted["bytes"] += buf.numel() * buf.element_size()
            return allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, hook)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        step(ddp, opt, x, y)  # the first step builds the buckets
        counted["bytes"] = 0
        steps = 3
        for _ in range(steps):
            step(ddp, opt, x, y)
        problems = ps.distributed.check_ties(ddp)
        assert problems == [], problems
        rows.append((name, counted["bytes"] // steps, r.unique_bytes, r.total_params))
        dist.barrier()
    return rows


def fsdp_times(rank: int, d: int, n: int, seq: int, reps: int, steps: int) -> dict[str, list[float]]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x, y = batch(rank, n, seq)

    def by_shard():
        m = Net(d, UNIQUE)
        return ps.distributed.shard(m, mesh=mesh)

    def by_hand():
        m = Net(d, UNIQUE)
        for i in range(UNIQUE):
            fully_shard([m.blocks[j] for j in range(i, BLOCKS, UNIQUE)], mesh=mesh)
        fully_shard(m, mesh=mesh)
        return m

    def root_only():
        m = Net(d, UNIQUE)
        fully_shard(m, mesh=mesh)
        return m

    contenders = {"ps.distributed.shard": by_shard(), "by hand (same groups)": by_hand(), "by hand (one unit)": root_only()}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in contenders.items()}
    for k, m in contenders.items():  # warm up: lazy init, allocator
        step(m, opts[k], x, y)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(reps):
        for k, m in contenders.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m, opts[k], x, y)
            dist.barrier()
            times[k].append((time.perf_counter() - t0) / steps)
    for k, m in contenders.items():
        problems = ps.distributed.check_ties(m)
        assert problems == [], (k, problems)
    return times


def worker(rank: int, world: int, port: int, args) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    d, n, seq = (64, 4, 16) if args.quick else (128, 8, 64)
    reps, steps = (3, 2) if args.quick else (7, 5)
    rows = ddp_bytes(rank, d, n, seq)
    times = fsdp_times(rank, d, n, seq, reps, steps)
    if rank == 0:
        print(f"\n=== DDP: bytes all-reduced per step (2 ranks, gloo, {BLOCKS} blocks, d={d}) ===")
        untied = rows[0][1]
        print(f"{'model':28s} {'params used':>12s} {'all-reduced':>12s} {'ideal':>12s} {'/ideal':>7s} {'/independent':>13s}")
        for name, sent, ideal, used in rows:
            print(f"{name:28s} {used:12,d} {sent:12,d} {ideal:12,d} {sent / ideal:7.3f} {sent / untied:13.3f}")
        print(f"\n=== FSDP2 step time, share_layers(unique={UNIQUE}) (2 ranks, gloo, median of {reps} x {steps} steps) ===")
        base = statistics.median(times["by hand (same groups)"])
        for k, ts in times.items():
            med = statistics.median(ts)
            print(f"{k:28s} {med * 1e3:9.2f} ms/step   ratio to by hand (same groups): {med / base:.3f}")
        ratio = statistics.median(times["ps.distributed.shard"]) / base
        worst = max(sent / ideal for _, sent, ideal, _ in rows)
        print(f"\ngoals: bytes/ideal <= 1.05: {worst:.3f} {'met' if worst <= 1.05 else 'NOT met'}; "
              f"shard/by-hand <= 1.10: {ratio:.3f} {'met' if ratio <= 1.10 else 'NOT met'}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and fewer repetitions")
    args = parser.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    print(f"torch {torch.__version__}, 2 processes x 1 thread, python {sys.version.split()[0]}", flush=True)
    mp.spawn(worker, args=(2, port, args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
