"""The ``paramshare`` command: thin wrappers over the public API.

Each subcommand lives in its own module with ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` lists them and they are imported only when used, so ``paramshare --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

#: name -> (module, one-line help). A subcommand is one module and one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("paramshare._demo", "tie and share a small model, then print what sharing saved"),
    "study": ("paramshare.study.cli", "what sharing buys, measured on real data: tables, report.md and plots"),
    "inspect": ("paramshare._cli_inspect", "show what a weights file holds: sizes, plan, exact/transposed/near duplicates"),
    "dedupe": ("paramshare._cli_dedupe", "write a paramshare checkpoint of a weights file with its duplicates tied"),
    "compress": ("paramshare.cluster.compress", "cluster the weights of a safetensors file into a paramshare checkpoint (codebooks, packed labels)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paramshare",
        description="Parameter sharing and tying for PyTorch: hard ties that survive, soft ties, learned sharing.",
    )
    parser.add_argument("--version", action="version", version=f"paramshare {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``paramshare inspect f | head``): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
