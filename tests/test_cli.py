"""The command line: --version, --help, demo; and a lean `import paramshare`."""

from __future__ import annotations

import subprocess
import sys

import paramshare as ps
from paramshare.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert ps.__version__ in capsys.readouterr().out
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: paramshare" in out and "demo" in out


def test_console_script_runs():
    exe = sys.executable.replace("python", "paramshare")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"paramshare {ps.__version__}"


def test_demo_prints_a_report(capsys):
    assert main(["demo", "--blocks", "4", "--unique", "2"]) == 0
    out = capsys.readouterr().out
    assert "Sharing report" in out and "check() -> []" in out


def test_demo_bad_input_exit_code(capsys):
    assert main(["demo", "--blocks", "4", "--unique", "3"]) == 2
    assert "does not divide" in capsys.readouterr().out


def test_import_is_lean():
    code = (
        "import sys, paramshare, paramshare.nn if False else None\n"
        "heavy = {'transformers', 'matplotlib', 'mnist1d', 'sklearn', 'scipy', 'mlxtend', 'coremltools', 'pandas'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    code = code.replace(", paramshare.nn if False else None", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
