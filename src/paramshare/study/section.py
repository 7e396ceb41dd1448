"""What an experiment hands back: a table, findings and figure specifications.

Experiments never draw or format; the runner renders every :class:`Section` the same way
(terminal summary, ``report.md``, ``results.json``, PNG plots).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

__all__ = ["Column", "Series", "Figure", "Section", "fmt_value"]


@dataclass
class Column:
    """A table column: ``key`` into each row, a header, and a format.

    Formats: ``"str"``, ``"int"`` (thousands separators), ``"pct"`` (0.943 -> 94.3%),
    ``"pct_pm"`` (a ``[mean, std]`` pair -> 94.3 +- 0.4%; std None for one seed), ``"pts"`` (a signed difference
    in percentage points), ``"f3"``/``"f4"`` (fixed decimals), ``"x"`` (a ratio, 6.3x).
    """

    key: str
    header: str
    fmt: str = "str"


def seeds_words(n: int) -> str:
    """``"one seed"`` or ``"3 seeds"``: how many seeds a figure rests on, in words."""
    return "one seed" if n == 1 else f"{n} seeds"


def mean_over(n: int) -> str:
    """``"one seed"`` or ``"mean over 3 seeds"``: what a figure averages."""
    return "one seed" if n == 1 else f"mean over {seeds_words(n)}"


def fmt_value(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt == "int":
        return f"{int(value):,}"
    if fmt == "pct":
        return f"{100 * value:.1f}%"
    if fmt == "pct_pm":
        mean, std = value
        return f"{100 * mean:.1f}%" if std is None else f"{100 * mean:.1f} +- {100 * std:.1f}%"
    if fmt == "pts":
        return f"{100 * value:+.1f} pts"
    if fmt == "f3":
        return f"{value:.3f}"
    if fmt == "f4":
        return f"{value:.4f}"
    if fmt == "x":
        return f"{value:.1f}x"
    return str(value)


@dataclass
class Series:
    """One line, set of points or group of bars in a figure."""

    label: str
    x: list
    y: list
    err: list | None = None  # symmetric error bars (e.g. std over seeds)
    point_labels: list | None = None  # text next to each point
    marker: str = "o"
    linestyle: str = "-"  # "" for points only
    filled: bool = True
    color: int | None = None  # index into the palette; None: next colour
    label_offset: tuple = (5, 4)  # where point labels go, in points from the point


@dataclass
class Figure:
    """A plot: ``kind`` is ``"lines"`` (x-y series) or ``"bars"`` (groups of bars over categories)."""

    file: str
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    kind: str = "lines"
    logx: bool = False
    xticks: list | None = None  # x positions to label (e.g. the measured sizes on a log axis); None: automatic
    categories: list[str] | None = None  # bar groups (kind="bars")
    ylim: tuple | None = None
    yfmt: str = "pct"  # "pct": y in [0, 1] shown as percent; "plain"
    hlines: list[tuple] = field(default_factory=list)  # (y, label) or (y, label, "left")
    arrows: list[tuple] = field(default_factory=list)  # (x0, y0, x1, y1): thin arrows between points
    note: str = ""  # small text under the plot (e.g. "quick run: 1000 steps")


@dataclass
class Section:
    """One experiment's outcome."""

    name: str
    title: str
    question: str
    columns: list[Column]
    rows: list[dict]
    findings: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str = ""  # why the experiment did not run (e.g. a capability not installed)

    def table_cells(self) -> tuple[list[str], list[list[str]], str]:
        """(headers, rows of strings, alignment) for rendering."""
        headers = [c.header for c in self.columns]
        cells = [[fmt_value(r.get(c.key), c.fmt) for c in self.columns] for r in self.rows]
        align = "".join("l" if c.fmt == "str" else "r" for c in self.columns)
        return headers, cells, align

    def to_dict(self) -> dict:
        return {
            "title": self.title,
            "question": self.question,
            "columns": [asdict(c) for c in self.columns],
            "rows": self.rows,
            "findings": self.findings,
            "figures": [f.file for f in self.figures],
            "notes": self.notes,
            "seconds": self.seconds,
            "skipped": self.skipped,
        }
