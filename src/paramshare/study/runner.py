"""Run the study: experiments -> jobs -> results -> report.md, results.json, PNG plots."""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .._format import render_table
from .context import PUBLISHED_STEPS, StudyContext
from .data import DATASETS, load_dataset
from .experiments import EXPERIMENTS
from .jobs import StudyError, default_workers, run_jobs
from .progress import Progress
from .section import Section

__all__ = ["run_study", "StudyResult", "DEFAULT_OUT", "RESULTS_FORMAT", "RESULTS_VERSION"]

DEFAULT_OUT = "paramshare-study"
RESULTS_FORMAT = "paramshare.study"
RESULTS_VERSION = 1
_OWN_FILES = ("report.md", "results.json")


@dataclass
class StudyResult:
    """What a study run produced.

    Attributes:
        out: the output folder.
        sections: one :class:`~paramshare.study.section.Section` per experiment.
        results: the content of ``results.json``.
        files: the files written, relative to ``out``.
        seconds: wall time of the whole run.
    """

    out: Path
    sections: list[Section]
    results: dict
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        """The readable summary the command prints: one table and its findings per experiment."""
        r = self.results
        lines = [_headline(r), ""]
        for i, s in enumerate(self.sections, 1):
            lines.append(f"{i}. {s.title}")
            if s.skipped:
                lines += [f"   skipped: {s.skipped}", ""]
                continue
            headers, cells, align = s.table_cells()
            lines += ["   " + ln for ln in render_table(headers, cells, align=align).splitlines()]
            lines += [f"   * {f}" for f in s.findings]
            lines.append("")
        pngs = [f for f in self.files if f.endswith(".png")]
        lines.append(f"Wrote report.md, results.json and {len(pngs)} plots to {self.out}{os.sep} in {self.seconds:.0f} s.")
        return "\n".join(lines)


def _headline(r: dict) -> str:
    d, c = r["dataset"], r["config"]
    if c["steps_override"] is not None:
        budget = f"step budget scaled to {c['steps_override']} baseline steps (published: {PUBLISHED_STEPS})"
    elif c["quick"]:
        budget = f"quick run: fewer training steps than the published {PUBLISHED_STEPS} and fewer seeds"
    else:
        budget = f"full run: the published {PUBLISHED_STEPS} steps for the baselines"
    return f"paramshare study on {d['name']} ({d['train']} train / {d['test']} test), {budget}, seed {c['seed']}"


def _atomic_write(path: Path, data: bytes) -> None:
    from .plots import file_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _prepare_out(out: Path, force: bool) -> None:
    """Make sure ``out`` can take the study's files; with ``force``, remove a previous study's files."""
    if out.exists() and not out.is_dir():
        raise StudyError(f"--out {str(out)!r} is a file, not a folder; choose a folder (it is created if missing)")
    if out.is_dir():
        entries = [p for p in out.iterdir()]
        if entries and not force:
            raise StudyError(
                f"--out {str(out)!r} is not empty ({len(entries)} entries); pass --force to overwrite the study's "
                "files in it, or choose another folder"
            )
        old = out / "results.json"
        if force and old.is_file():
            try:
                listed = json.loads(old.read_text()).get("files", [])
            except (OSError, ValueError, AttributeError):
                listed = []
            for name in listed:
                p = out / str(name)
                if isinstance(name, str) and p.parent == out and p.is_file():
                    p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise StudyError(f"cannot write to --out {str(out)!r}; choose a folder you can write to")


def _validate(data: str, seed, steps, experiments, workers) -> list[str]:
    if data not in DATASETS:
        raise StudyError(f"unknown dataset {data!r}; choose one of {', '.join(DATASETS)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise StudyError(f"seed must be a non-negative integer, got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise StudyError(f"steps must be a positive integer, got {steps!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise StudyError(f"workers must be a positive integer, got {workers!r}")
    names = list(EXPERIMENTS) if experiments is None else list(experiments)
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        raise StudyError(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    return [n for n in EXPERIMENTS if n in names]  # report order


def run_study(
    out: str | os.PathLike = DEFAULT_OUT,
    *,
    quick: bool = False,
    seed: int = 0,
    data: str = "mnist1d",
    steps: int | None = None,
    experiments: list[str] | None = None,
    workers: int | None = None,
    force: bool = False,
    progress: bool = False,
) -> StudyResult:
    """Run the study and write ``report.md``, ``results.json`` and PNG plots to ``out``.

    Args:
        out: output folder (created if missing; must be empty unless ``force``).
        quick: fewer steps and seeds (about a minute on two cores).
        seed: base seed; the same seed gives the same numbers.
        data: ``"mnist1d"`` (default), ``"digits"`` or ``"mnist"``.
        steps: train the baselines for this many steps and scale every other budget with it
            (for smoke runs); None uses the quick or full budgets.
        experiments: names from :data:`paramshare.study.experiments.EXPERIMENTS` (default: all).
        workers: processes to run training jobs in (default: the usable CPUs, at most 2).
        force: write into a non-empty ``out``, replacing a previous study's files.
        progress: draw a progress bar on stderr.

    Returns:
        A :class:`StudyResult`; ``print(result.summary())`` shows the tables.

    Raises:
        StudyError: bad arguments, an output folder in the way, a failed run.

    Example:
        >>> from paramshare.study import run_study
        >>> r = run_study("/tmp/ps-study", experiments=["baselines"], steps=30, force=True)  # doctest: +SKIP
        >>> r.results["experiments"]["baselines"]["rows"][0]["model"]  # doctest: +SKIP
        'Logistic regression'
    """
    t0 = time.perf_counter()
    names = _validate(data, seed, steps, experiments, workers)
    out = Path(out)
    _prepare_out(out, force)
    workers = workers or default_workers()
    modules = {n: importlib.import_module(EXPERIMENTS[n]) for n in names}
    with Progress(progress) as bar:
        bar.set_label(f"preparing {data}")
        dataset = load_dataset(data)
        ctx = StudyContext(dataset, quick=quick, seed=seed, steps_override=steps)
        skipped, jobs = {}, {}
        for n, mod in modules.items():
            why = mod.available(ctx) if hasattr(mod, "available") else None
            if why:
                skipped[n] = why
                continue
            jobs[n] = mod.jobs(ctx)
        distinct = {j.key: j for js in jobs.values() for j in js}
        bar.add(sum(j.cost for j in distinct.values()), runs=len(distinct))
        bar.set_label("training")
        results = run_jobs(
            distinct.values(), dataset, workers=workers,
            on_done=lambda j: bar.advance(j.cost, label=f"done: {j.label}" if j.label else None),
        )
        bar.set_label("writing the report")
        sections: list[Section] = []
        for n, mod in modules.items():
            if n in skipped:
                sections.append(Section(n, getattr(mod, "TITLE", n), getattr(mod, "QUESTION", ""), [], [], skipped=skipped[n]))
                continue
            s = mod.summarize(ctx, results)
            s.name = n
            s.seconds = sum(results[j.key].get("seconds", 0.0) for j in {j.key: j for j in jobs[n]}.values())
            sections.append(s)
        files = _write_outputs(out, ctx, sections, results, distinct, names, workers, t0)
    seconds = time.perf_counter() - t0
    final = json.loads((out / "results.json").read_text())
    return StudyResult(out, sections, final, files, seconds)


def _write_outputs(out: Path, ctx: StudyContext, sections, results, distinct, names, workers, t0) -> list[str]:
    from .plots import draw
    from .render import markdown

    note = ""
    if ctx.reduced:
        note = "quick run: fewer steps than published" if ctx.steps_override is None else "smoke run: tiny step budget"
    figures = [f for s in sections for f in s.figures]
    for f in figures:
        if note and not f.note:
            f.note = note
    files = [f.file for f in figures]
    import torch

    from .. import __version__

    files = ["report.md", "results.json"] + files
    doc = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "paramshare": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {
            "quick": ctx.quick,
            "seed": ctx.seed,
            "data": ctx.data.name,
            "steps_override": ctx.steps_override,
            "experiments": names,
            "workers": workers,
            "published_steps": PUBLISHED_STEPS,
            "command": "paramshare study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None,
        },
        "dataset": ctx.data.meta(),
        "experiments": {s.name: s.to_dict() for s in sections},
        "runs": [
            {"fn": j.fn, "args": j.kwargs, "result": results[k]} for k, j in sorted(distinct.items())
        ],
        "files": files,
        "wall_seconds": 0.0,
    }
    doc["wall_seconds"] = round(time.perf_counter() - t0, 2)
    _atomic_write(out / "report.md", markdown(doc, sections).encode())
    _atomic_write(out / "results.json", (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode())
    for f in figures:  # the numbers are on disk first: a plot that fails to draw loses no results
        draw(f, out)
    return files
