"""Train a tied language model with FSDP2 on several processes, then save and reload it.

The model ties its embedding to its output layer and shares its 6 blocks as 2 distinct ones
(ALBERT-style, ``ps.share_layers``). It is built on the meta device (no memory), sharded with
``ps.distributed.shard`` (which keeps every tie inside one FSDP unit), materialised with
``to_empty``, initialised, trained on a next-token task, checked across ranks with
``ps.distributed.check_ties``, saved with ``ps.save`` (rank 0 writes one file, tied tensors once)
and loaded back into a freshly sharded model.

Run:
    torchrun --nproc_per_node=2 examples/train_fsdp.py
    python examples/train_fsdp.py              # one process, same code
Options: --steps N (default 60), --out PATH (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import paramshare as ps

VOCAB, DIM, BLOCKS, SEQ, BATCH = 64, 32, 6, 16, 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 4 * DIM)
        self.down = nn.Linear(4 * DIM, DIM)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        nn.init.normal_(self.embed.weight, std=DIM**-0.5)  # it is the output layer too: keep logits small
        ps.tie(self, "embed.weight", "head.weight")  # tied input and output embeddings
        ps.share_layers(self.blocks, unique=2)  # blocks 0,2,4 and 1,3,5 share weights

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h))


def batches(rank: int, world: int, step: int):
    """This rank's part of a batch of a task with structure: token t+1 = 3 * token t + 1 (mod VOCAB)."""
    g = torch.Generator().manual_seed(step * world + rank)
    start = torch.randint(0, VOCAB, (BATCH // world, 1), generator=g)
    seq = [start]
    for _ in range(SEQ):
        seq.append((3 * seq[-1] + 1) % VOCAB)
    seq = torch.cat(seq, 1)
    return seq[:, :-1], seq[:, 1:]


def setup() -> bool:
    """Join the process group torchrun describes, or make a one-process group. True if we made it."""
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ:  # plain `python examples/train_fsdp.py`
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train a tied model with FSDP2 (ps.distributed.shard).")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None, help="checkpoint path (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    made = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        # 1. build without memory, shard (ties stay in one unit each), materialise
        with torch.device("meta"):
            model = TiedLM()
        plan = ps.plan(model)
        say(f"FSDP units: {ps.distributed.fsdp_groups(model)}")
        ps.distributed.shard(model)
        model.to_empty(device="cpu")
        assert ps.check(model, plan) == [], "sharding first keeps the ties through to_empty"
        torch.manual_seed(0)
        ps.distributed.load_full_state_dict(model, TiedLM().state_dict())  # the same start on every rank

        # 2. train
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for step in range(args.steps):
            x, y = batches(rank, world, step)
            loss = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 10 == 0 or step == args.steps - 1:
                say(f"step {step:3d}  loss {loss.item():.3f}")
        problems = ps.distributed.check_ties(model)
        assert problems == [], problems
        say("check_ties: every rank holds the same ties and values")

        # 3. save (rank 0 writes, tied tensors once) and load into a fresh sharded model
        out = args.out
        tmp = None
        if out is None:
            tmp = tempfile.TemporaryDirectory() if rank == 0 else None
            name = [tmp.name if tmp else None]
            dist.broadcast_object_list(name)
            out = Path(name[0]) / "tied_lm.safetensors"
        with ps.distributed.gathered(model):  # every rank: the full tensors, for reading
            r = ps.report(model)
        say(f"parameters used {r.total_params:,}, stored {r.unique_params:,} ({r.ratio:.2f}x less)")
        ps.save(model, out)  # collective for a sharded model: gathered, rank 0 writes
        say(f"saved {out} ({out.stat().st_size:,} bytes)")
        fresh = TiedLM()
        ps.distributed.shard(fresh)
        ps.load(fresh, out)
        x, _ = batches(rank, world, 0)
        with torch.no_grad():
            same = torch.equal(model(x), fresh(x))
        say("reloaded model gives identical outputs:", same)
        dist.barrier()
        if tmp is not None:
            tmp.cleanup()
        return {"loss": float(loss.detach()), "reloaded_identical": same, "check_ties": problems}
    finally:
        if made:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
