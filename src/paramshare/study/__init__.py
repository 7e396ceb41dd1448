"""The study behind ``paramshare study``: what parameter sharing buys, measured on real data.

Experiments (one module each in :mod:`paramshare.study.experiments`) ask for training runs
(:class:`~paramshare.study.jobs.Job`), the runner trains each distinct run once (in worker
processes when there are several CPUs), and every experiment turns its results into a
table, findings and plots; the runner writes ``report.md``, ``results.json`` and PNGs.

Example:
    >>> from paramshare.study import run_study
    >>> result = run_study("study-out", quick=True, force=True)  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
"""

from .experiments import EXPERIMENTS
from .jobs import StudyError
from .runner import DEFAULT_OUT, StudyResult, run_study

__all__ = ["run_study", "StudyResult", "StudyError", "EXPERIMENTS", "DEFAULT_OUT"]
