"""``paramshare study``: run the study and print its summary."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .data import DATASETS
    from .experiments import EXPERIMENTS
    from .runner import DEFAULT_OUT

    parser.add_argument("--quick", action="store_true",
                        help="fewer training steps and seeds: about a minute on two cores (the full study takes several)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for report.md, results.json and the PNG plots (default: ./{DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing a previous study's files")
    parser.add_argument("--seed", type=int, default=0, help="base seed; the same seed gives the same numbers (default 0)")
    parser.add_argument("--data", choices=DATASETS, default="mnist1d",
                        help="mnist1d (default: generated locally, 4000/1000), digits (sklearn 8x8) or mnist (5000 real images)")
    parser.add_argument("--only", metavar="NAMES", default=None,
                        help=f"comma-separated experiments to run (default all): {', '.join(EXPERIMENTS)}")
    parser.add_argument("--steps", type=int, default=None, metavar="N",
                        help="train the baselines for N steps and scale every other budget alike (smoke runs)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="training processes (default: usable CPUs, at most 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary; errors only")


def run(args: argparse.Namespace) -> int:
    from .jobs import StudyError
    from .runner import run_study

    experiments = None
    if args.only:
        experiments = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        result = run_study(
            args.out, quick=args.quick, seed=args.seed, data=args.data, steps=args.steps, experiments=experiments,
            workers=args.workers, force=args.force, progress=not args.quiet and sys.stderr.isatty(),
        )
    except StudyError as e:
        print(f"paramshare study: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(result.summary())
    return 0
