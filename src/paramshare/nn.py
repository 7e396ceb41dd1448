"""``paramshare.nn``: ready-made modules whose parameter sharing is built in.

Seed modules (shared weights by construction, counted honestly by :func:`paramshare.report`):
``Siamese``, ``TiedAutoencoder``, ``LocallyConnected1d`` (the unshared peer of ``Conv1d``),
``Recurrent`` (one cell applied at every step), ``SharedConv1dClassifier`` (the study's CNN).
Other capabilities re-export their modules from here with one import line each at the end.
"""

from __future__ import annotations
from .hashing import HashedLinear  # noqa: E402,F401
from .multitask import MultiTask  # noqa: E402,F401
from .dynamic import DynamicLinear  # noqa: E402,F401
