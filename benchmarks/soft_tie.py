"""Soft-tie penalty speed: paramshare's fused penalty against a plain Python loop, in one run.

The model pair: two 24-block residual MLP stacks (each block two Linear layers) with an input
and an output layer: 100 parameter tensors per model. Measured, alternating the contenders
and taking medians:

1. penalty forward + backward over all 100 tensor pairs, ``ps.soft_tie`` against a Python loop
   of per-tensor terms (``(a - b).pow(2).sum()`` for l2; the matching expression for the
   other norms). Goal: ratio <= 0.5 for l2.
2. the overhead the penalty adds to a training step of the pair (forward, cross-entropy,
   backward, SGD step). Goal: <= 10%. Also shown: the penalty on every 4th step with 4 times
   the strength (lazy regularisation), what a small-batch run can do when the per-step cost
   matters.
3. the penalty under ``torch.compile`` (inductor): same value and gradients as eager.

Run: ``.venv/bin/python benchmarks/soft_tie.py`` (``--quick``: a narrow model, few repeats).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header  # noqa: E402

import paramshare as ps  # noqa: E402


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def stack(width: int, blocks: int = 24, d_in: int = 64, classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, width), *[Block(width) for _ in range(blocks)], nn.Linear(width, classes))


def loop_penalty(norm: str, pa, pb, strength: float, delta: float = 1.0):
    """The peer: one small expression per tensor pair, summed in Python."""
    total = 0.0
    for a, b in zip(pa, pb):
        if norm == "l2":
            term = (a - b).pow(2).sum()
        elif norm == "l1":
            term = (a - b).abs().sum()
        elif norm == "huber":
            term = F.huber_loss(a, b, reduction="sum", delta=delta)
        else:
            term = 1 - F.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        total = total + strength * term
    return total


def median_times(contenders: dict, repeat: int) -> dict[str, float]:
    """Median wall time of each callable, calls alternating between contenders."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm up
        fn()
        fn()
    gc.collect()
    for _ in range(repeat):
        for k, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def penalty_table(a, b, norms, repeat: int) -> dict[str, float]:
    """Time the fused penalty and the loop (forward + backward, grads from None) per norm."""
    pa, pb = list(a.parameters()), list(b.parameters())
    every = pa + pb

    def zero():
        for p in every:
            p.grad = None

    ratios = {}
    for norm in norms:
        soft = ps.soft_tie(a, b, norm=norm, strength=1e-3)
        zero()
        soft().backward()
        g_ps = [p.grad.clone() for p in every]
        zero()
        loop_penalty(norm, pa, pb, 1e-3).backward()
        same = all(torch.allclose(x, p.grad, rtol=1e-4, atol=1e-9) for x, p in zip(g_ps, every))
        v_ps, v_loop = soft().item(), loop_penalty(norm, pa, pb, 1e-3).item()

        def run_ps(soft=soft):
            zero()
            soft().backward()

        def run_loop(norm=norm):
            zero()
            loop_penalty(norm, pa, pb, 1e-3).backward()

        t = median_times({"ps": run_ps, "loop": run_loop}, repeat)
        ratios[norm] = t["ps"] / t["loop"]
        ok = "same value and gradients" if same and abs(v_ps - v_loop) <= 1e-4 * max(1.0, abs(v_loop)) else f"MISMATCH {v_ps} vs {v_loop}"
        yield norm, t, ratios[norm], ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="narrow models, few repeats (a smoke run)")
    ap.add_argument("--width", type=int, default=None, help="hidden width of the main model (default 256; 32 with --quick)")
    ap.add_argument("--repeat", type=int, default=None, help="timed repeats per contender (default 30; 5 with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    ap.add_argument("--threads", type=int, default=2, choices=(1, 2), help="torch threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    width = args.width or (32 if args.quick else 256)
    repeat = args.repeat or (5 if args.quick else 30)
    widths = (16, 32) if args.quick else (64, 128, 256, 512)
    batches = (64,) if args.quick else (64, 256, 1024)
    header("soft tying: fused penalty vs a Python loop")
    torch.manual_seed(0)
    a, b = stack(width), stack(width)
    pa, pb = list(a.parameters()), list(b.parameters())
    print(f"model pair: two 24-block residual MLP stacks, {len(pa)} tensors each; {repeat} repeats, medians, "
          "contenders alternating")

    # ---- 1. penalty forward + backward, every norm ----------------------------------------
    n_params = sum(p.numel() for p in pa)
    print(f"\n1. penalty forward + backward over the 100 tensor pairs, width {width} ({n_params:,} parameters per model)")
    print(f"{'norm':<8}{'paramshare':>12}{'python loop':>13}{'ratio':>8}  check")
    for norm, t, ratio, ok in penalty_table(a, b, ps.soft.NORMS, repeat):
        print(f"{norm:<8}{t['ps'] * 1e3:>10.2f}ms{t['loop'] * 1e3:>11.2f}ms{ratio:>8.2f}  {ok}", flush=True)

    # ---- 1b. l2 across model widths ---------------------------------------------------------
    print("\n1b. l2 penalty forward + backward across widths (same 100 tensors, larger or smaller)")
    print(f"{'width':>6}{'params/model':>14}{'paramshare':>12}{'python loop':>13}{'ratio':>8}  goal <= 0.5")
    for w in widths:
        torch.manual_seed(0)
        wa, wb = stack(w), stack(w)
        for _, t, ratio, ok in penalty_table(wa, wb, ("l2",), repeat):
            n = sum(p.numel() for p in wa.parameters())
            verdict = ("met" if ratio <= 0.5 else "NOT met") + ("" if ok.startswith("same") else f" ({ok})")
            print(f"{w:>6}{n:>14,}{t['ps'] * 1e3:>10.2f}ms{t['loop'] * 1e3:>11.2f}ms{ratio:>8.2f}  {verdict}", flush=True)

    # ---- 2. training-step overhead --------------------------------------------------------
    every = pa + pb
    opt = torch.optim.SGD(every, lr=1e-4)
    soft = ps.soft_tie(a, b, strength=1e-3)
    print(f"\n2. training step of the pair, width {width} (forward, cross-entropy, backward, SGD step)")
    lazy = ps.soft_tie(a, b, strength=4e-3)  # every 4th step, 4 times the strength
    print(f"{'batch':>6}{'no penalty':>12}{'+ ps.soft_tie':>15}{'+ python loop':>15}   goal <= 10%   {'every 4th step, 4x':>18}")
    for batch in batches:
        x = torch.randn(batch, 64)
        y = torch.randint(0, 10, (batch,))
        count = [0]

        def step(penalty, x=x, y=y, every=1):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(a(x), y) + F.cross_entropy(b(x), y)
            count[0] += 1
            if penalty is not None and count[0] % every == 0:
                loss = loss + penalty()
            loss.backward()
            opt.step()

        def lazy_steps():  # four steps: the mean cost of one
            for _ in range(4):
                step(lazy, every=4)

        t = median_times(
            {"none": lambda: step(None), "ps": lambda: step(soft), "loop": lambda: step(lambda: loop_penalty("l2", pa, pb, 1e-3)),
             "lazy": lazy_steps},
            max(5, repeat // 2),
        )
        t["lazy"] /= 4
        over_ps, over_loop, over_lazy = t["ps"] / t["none"] - 1, t["loop"] / t["none"] - 1, t["lazy"] / t["none"] - 1
        print(
            f"{batch:>6}{t['none'] * 1e3:>10.1f}ms{t['ps'] * 1e3:>9.1f}ms{over_ps * 100:>+5.0f}%{t['loop'] * 1e3:>9.1f}ms{over_loop * 100:>+5.0f}%"
            f"   {'met' if over_ps <= 0.10 else 'NOT met':<10}{t['lazy'] * 1e3:>12.1f}ms{over_lazy * 100:>+5.0f}%",
            flush=True,
        )
    print("   (every 4th step, 4x: the penalty added on one step in four with four times the strength, lazy\n"
          "    regularisation: the same mean pull for SGD; timed over four steps, shown per step)")

    # ---- 3. torch.compile ----------------------------------------------------------------
    if not args.no_compile and not args.quick:
        print("\n3. torch.compile (inductor, fullgraph) of the penalty")

        def zero():
            for p in every:
                p.grad = None

        for norm in ("l2", "cosine"):
            soft = ps.soft_tie(a, b, norm=norm, strength=1e-3)
            torch._dynamo.reset()
            compiled = torch.compile(soft, fullgraph=True)
            t0 = time.perf_counter()
            zero()
            v_c = compiled()
            v_c.backward()
            compile_s = time.perf_counter() - t0
            g_c = [p.grad.clone() for p in every]
            zero()
            v_e = soft()
            v_e.backward()
            same = torch.allclose(v_c, v_e, rtol=1e-5) and all(
                torch.allclose(x, p.grad, rtol=1e-4, atol=1e-9) for x, p in zip(g_c, every)
            )

            def run_c(compiled=compiled):
                zero()
                compiled().backward()

            def run_e(soft=soft):
                zero()
                soft().backward()

            tc = median_times({"compiled": run_c, "eager": run_e}, max(5, repeat // 3))
            print(
                f"{norm:<8} compiled in {compile_s:.1f}s; {'same value and gradients as eager' if same else 'MISMATCH'}; "
                f"compiled/eager time {tc['compiled'] / tc['eager']:.2f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
