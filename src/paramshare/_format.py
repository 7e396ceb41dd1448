"""Plain-text formatting shared by reports and the command line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["human_bytes", "render_table", "shorten"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``; exact bytes below 1 KiB; a sign for negative values."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{int(n)} B" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def shorten(text: str, width: int) -> str:
    """Cut ``text`` to ``width`` characters with an ellipsis in the middle."""
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep // 2 + keep % 2] + "..." + text[len(text) - keep // 2 :]


def render_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one ``l`` or ``r`` per column (numbers right by default)."""
    cells = [[str(c) for c in r] for r in rows]
    if align is None:
        align = "".join(
            "r" if rows and all(isinstance(r[i], (int, float)) for r in rows) else "l" for i in range(len(headers))
        )
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        out = []
        for v, w, a in zip(values, widths, align):
            out.append(v.rjust(w) if a == "r" else v.ljust(w))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in cells])
