"""``paramshare demo``: the hard-sharing API on a small model, in a few seconds."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=12, help="blocks in the stack (default 12)")
    parser.add_argument("--unique", type=int, default=3, help="distinct blocks kept by share_layers (default 3)")


def run(args: argparse.Namespace) -> int:
    import torch
    from torch import nn

    import paramshare as ps

    from .errors import SharingError

    torch.manual_seed(0)
    d, vocab = 64, 1000

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(
                nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                for _ in range(args.blocks)
            )
            self.head = nn.Linear(d, vocab, bias=False)

        def forward(self, tokens):
            x = self.embed(tokens)
            for b in self.blocks:
                x = x + b(x)
            return self.head(x)

    model = TinyLM()
    try:
        ps.tie(model, "embed.weight", "head.weight")
        ps.share_layers(model.blocks, unique=args.unique, strategy="cycle")
    except SharingError as e:
        print(f"paramshare demo: {e}")
        return 2
    print(f"A {args.blocks}-block language model: embeddings tied to the output layer, blocks shared")
    print(f"in a cycle of {args.unique} (ps.tie + ps.share_layers).\n")
    print(ps.report(model))
    plan = ps.plan(model)
    fresh = TinyLM()
    ps.apply_plan(fresh, plan)
    print(f"\nThe plan ({len(plan)} groups, {len(plan.to_json())} bytes of JSON) re-ties a freshly built model: "
          f"check() -> {ps.check(fresh, plan)}")
    broken = TinyLM()
    broken.load_state_dict(model.state_dict(), assign=True)
    problems = ps.check(broken, plan)
    print(f"load_state_dict(assign=True) leaves the ties broken; check() finds {len(problems)} problems, e.g.")
    print(f"  {problems[0]}")
    ps.apply_plan(broken, plan)
    print(f"after apply_plan: check() -> {ps.check(broken, plan)}")
    return 0
