"""The README's Python examples run as written (in order, sharing one namespace)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    """Python code blocks, except those right after a ``<!-- not tested -->`` line."""
    blocks = []
    for m in re.finditer(r"(<!-- not tested -->\s*)?```python\n(.*?)```", text, re.S):
        if not m.group(1):
            blocks.append(m.group(2))
    return blocks


def test_readme_python_examples_run(tmp_path):
    blocks = python_blocks(README.read_text())
    assert blocks, "the README has Python examples"
    namespace: dict = {"__name__": "readme"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"README.md block {i + 1}", "exec"), namespace)
    finally:
        os.chdir(cwd)
