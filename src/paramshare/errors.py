"""The exceptions paramshare raises for bad input."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["SharingError", "CheckpointError", "did_you_mean"]


class SharingError(ValueError):
    """A sharing request that cannot be carried out.

    Raised before anything is changed: when a paramshare call raises, the model is exactly
    as it was. The message names the problem, shows the values involved and says how to fix it.
    """


class CheckpointError(SharingError):
    """A checkpoint file that cannot be read, written or loaded into the model.

    The message names the file and the problem. Raised before the model is changed: a load
    that fails leaves the model exactly as it was; a save that fails leaves any existing
    file at the path intact.
    """


def did_you_mean(name: str, candidates: Iterable[str], what: str = "name") -> str:
    """A short hint naming the candidates closest to ``name`` (empty when none is close)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        # a suffix match catches a missing prefix ("weight" for "fc.weight")
        close = [c for c in candidates if c.endswith("." + name) or c.endswith(name)][:3]
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    if not candidates:
        return f"; the model has no {what}s"
    shown = ", ".join(repr(c) for c in candidates[:6])
    more = f", ... ({len(candidates)} in all)" if len(candidates) > 6 else ""
    return f"; the model's {what}s are {shown}{more}"
