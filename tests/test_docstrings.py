"""Every docstring example in the package runs and prints what it says."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil

import pytest

import paramshare

MODULES = ["paramshare"] + sorted(m.name for m in pkgutil.walk_packages(paramshare.__path__, "paramshare."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path):
    module = importlib.import_module(name)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # examples that write files write them here
    try:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    finally:
        os.chdir(cwd)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


def test_public_functions_have_examples():
    """Each public function of ``paramshare`` shows how it is used."""
    missing = []
    for name in paramshare.__all__:
        obj = getattr(paramshare, name)
        if inspect.isfunction(obj) and ">>>" not in (obj.__doc__ or ""):
            missing.append(name)
    assert not missing, f"public names without a docstring example: {missing}"
