"""Draw a :class:`~paramshare.study.section.Figure` as a PNG with matplotlib (no pyplot state)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from .section import Figure

__all__ = ["draw"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def draw(fig_spec: Figure, folder: Path) -> Path:
    """Render ``fig_spec`` to ``folder / fig_spec.file`` atomically; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import FuncFormatter

    fig = MplFigure(figsize=(7.5, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if fig_spec.kind == "bars":
        _bars(ax, fig_spec)
    else:
        _lines(ax, fig_spec)
    for x0, y0, x1, y1 in fig_spec.arrows:
        ax.annotate("", (x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "color": "0.6", "lw": 0.9,
                                                               "shrinkA": 5, "shrinkB": 5}, zorder=1)
    for y, label, *where in fig_spec.hlines:
        left = where == ["left"]
        ax.axhline(y, color="0.5", linestyle=":", linewidth=1, zorder=0.5)
        ax.annotate(label, (0.01 if left else 0.99, y), xycoords=("axes fraction", "data"), va="bottom",
                    ha="left" if left else "right", fontsize=8, color="0.35", zorder=5)
    ax.set_title(fig_spec.title, fontsize=12)
    ax.set_xlabel(fig_spec.xlabel)
    ax.set_ylabel(fig_spec.ylabel)
    if fig_spec.logx:
        ax.set_xscale("log")
        _log_ticks(ax)
    if fig_spec.xticks:
        ax.set_xticks(fig_spec.xticks)
    if fig_spec.ylim is not None:
        ax.set_ylim(*fig_spec.ylim)
    if fig_spec.yfmt == "pct":
        lo, hi = ax.get_ylim()
        digits = 1 if hi - lo < 0.06 else 0  # a narrow range needs decimals to tell its ticks apart
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.{digits}f}%"))
    ax.grid(True, which="major", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8.5, loc="best", framealpha=0.9)
    if fig_spec.note:
        fig.text(0.99, 0.01, fig_spec.note, ha="right", va="bottom", fontsize=7.5, color="0.4")
    fig.tight_layout(rect=(0, 0.03 if fig_spec.note else 0, 1, 1))
    path = Path(folder) / fig_spec.file
    fd, tmp = tempfile.mkstemp(prefix=f".{fig_spec.file}.", suffix=".tmp", dir=folder)
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_mode() -> int:
    """The mode a new file gets under the current umask (mkstemp would make it private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _human(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def _log_ticks(ax) -> None:
    """Readable ticks on a log x axis: 500, 1k, 2k, 5k, ... (every integer multiple on a narrow range)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    import math

    ax.autoscale_view()
    lo, hi = ax.get_xlim()
    lo = max(lo, 1e-12)

    def inside(subs) -> int:
        return sum(lo <= m * 10.0 ** e <= hi for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                   for m in subs)

    # the sparsest tick set that still labels at least four points of the range
    choices = ((1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0), (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0))
    subs = next((c for c in choices if inside(c) >= 4), choices[-1])
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _color(series, i: int) -> str:
    return PALETTE[(series.color if series.color is not None else i) % len(PALETTE)]


def _lines(ax, spec: Figure) -> None:
    ax.margins(x=0.07, y=0.08)
    for i, s in enumerate(spec.series):
        color = _color(s, i)
        face = color if s.filled else "white"
        if s.err is not None:
            ax.errorbar(s.x, s.y, yerr=s.err, label=s.label, color=color, marker=s.marker, linestyle=s.linestyle or "none",
                        markerfacecolor=face, capsize=3, markersize=6, linewidth=1.6)
        else:
            ax.plot(s.x, s.y, label=s.label, color=color, marker=s.marker, linestyle=s.linestyle or "none",
                    markerfacecolor=face, markersize=7, linewidth=1.6)
        if s.point_labels:
            for x, y, text in _merged_labels(s, spec):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=s.label_offset, fontsize=7.5, color=color,
                            ha="left" if s.label_offset[0] >= 0 else "right", va="bottom" if s.label_offset[1] >= 0 else "top")


def _merged_labels(s, spec: Figure) -> list[tuple[float, float, str]]:
    """A series' point labels, points that nearly coincide sharing one label ("CNN, GRU").

    Close means within 2% of the axis span on both axes (on a log axis, of the log span),
    so labels of such points would print over each other.
    """
    pts = [(x, y, t) for x, y, t in zip(s.x, s.y, s.point_labels) if t and x is not None and y is not None]
    if not pts:
        return []

    def pos(v, log):
        return math.log10(v) if log and v > 0 else v

    xs = [pos(p[0], spec.logx) for p in pts]
    ys = [p[1] for p in pts]
    if spec.ylim:
        y_span = spec.ylim[1] - spec.ylim[0]
    else:
        y_span = max(ys) - min(ys)
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = y_span or 1.0
    out: list[list] = []
    for (x, y, t), px in zip(pts, xs):
        for g in out:
            if abs(px - g[3]) <= 0.02 * x_span and abs(y - g[1]) <= 0.02 * y_span:
                g[2] += f", {t}"
                break
        else:
            out.append([x, y, t, px])
    return [(x, y, t) for x, y, t, _ in out]


def _bars(ax, spec: Figure) -> None:
    cats = spec.categories or []
    n = max(1, len(spec.series))
    width = 0.8 / n
    for i, s in enumerate(spec.series):
        xs = [c + (i - (n - 1) / 2) * width for c in range(len(cats))]
        ys = [float("nan") if v is None else v for v in s.y]
        color = _color(s, i)
        bars = ax.bar(xs, ys, width=width * 0.95, label=s.label, color=color if s.filled else "white",
                      edgecolor=color, linewidth=1.2, yerr=s.err, capsize=3 if s.err else 0)
        errs = s.err if s.err is not None else [None] * len(s.y)
        for b, v, e in zip(bars, s.y, errs):
            if v is not None:
                text = f"{100 * v:.0f}%" if spec.yfmt == "pct" else f"{v:.3g}"
                top = b.get_height() + (e if e is not None and not math.isnan(e) else 0.0)  # above the error bar
                ax.annotate(text, (b.get_x() + b.get_width() / 2, top), textcoords="offset points",
                            xytext=(0, 2), ha="center", va="bottom", fontsize=7.5)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats)
