"""What sharing buys a model, in exact numbers and as a table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ._format import human_bytes, render_table, shorten
from ._index import ModelIndex
from .kinds._common import fmt_shape
from .plans import GroupStats, TieGroup, get_kind
from .tying import _find

__all__ = ["report", "SharingReport", "GroupRow"]


@dataclass(frozen=True)
class GroupRow:
    """One tie group with its counts."""

    group: TieGroup
    stats: GroupStats


@dataclass(frozen=True)
class SharingReport:
    """Parameters a model uses against parameters it stores.

    Attributes:
        total_params: elements of every used parameter, each use counted (what an untied
            model with the same forward would store).
        unique_params: elements of stored parameters, each stored tensor once.
        total_bytes, unique_bytes: the same in bytes; ``unique_bytes`` also counts what
            kinds store outside parameters (e.g. a codebook's indices), which
            ``unique_params`` does not.
        groups: the tie groups (as :func:`paramshare.find_ties` gives them).
        rows: per-group counts.
    Buffers are not counted.
    """

    total_params: int
    unique_params: int
    total_bytes: int
    unique_bytes: int
    groups: tuple[TieGroup, ...]
    rows: tuple[GroupRow, ...]

    @property
    def saved_bytes(self) -> int:
        """Bytes sharing saves: ``total_bytes - unique_bytes``."""
        return self.total_bytes - self.unique_bytes

    @property
    def saved_params(self) -> int:
        return self.total_params - self.unique_params

    @property
    def ratio(self) -> float:
        """``total_bytes / unique_bytes`` (equal to the parameter ratio when one dtype is used)."""
        return self.total_bytes / self.unique_bytes if self.unique_bytes else math.inf

    def to_dict(self) -> dict:
        return {
            "total_params": self.total_params,
            "unique_params": self.unique_params,
            "total_bytes": self.total_bytes,
            "unique_bytes": self.unique_bytes,
            "saved_bytes": self.saved_bytes,
            "ratio": self.ratio,
            "groups": [
                dict(r.group.to_dict(), uses=r.stats.uses, used_numel=r.stats.used_numel,
                     stored_numel=r.stats.stored_numel, stored_bytes=r.stats.stored_bytes,
                     saved_bytes=r.stats.saved_bytes, detail=r.stats.detail)
                for r in self.rows
            ],
        }

    def table(self, max_rows: int = 20) -> str:
        """The report as a plain-text table (``str(report)`` shows it)."""
        n = len(self.rows)
        head = f"Sharing report: {n} tie group{'s' if n != 1 else ''}"
        parts = [head]
        if self.rows:
            rows = []
            for r in self.rows[:max_rows]:
                g, s = r.group, r.stats
                members = g.members[0] if len(g.members) == 1 else f"{g.members[0]} (+{len(g.members) - 1} more)"
                if g.kind == "alias":
                    members = ", ".join(g.members) if len(g.members) <= 2 else f"{g.members[1]} (+{len(g.members) - 2} more)"
                rows.append([
                    g.kind, shorten(g.source, 36), shorten(members, 44),
                    fmt_shape(g.shape) if g.shape is not None else "-", s.uses,
                    human_bytes(s.saved_bytes), s.detail,
                ])
            headers, align = ["kind", "stored as", "used by", "shape", "uses", "saved", "note"], "lllrrrl"
            if not any(r[-1] for r in rows):
                headers, align, rows = headers[:-1], align[:-1], [r[:-1] for r in rows]
            parts.append(render_table(headers, rows, align=align))
            if n > max_rows:
                parts.append(f"... {n - max_rows} more groups (report.rows has them all)")
        ratio = "inf" if math.isinf(self.ratio) else f"{self.ratio:.2f}x"
        parts.append(render_table(
            ["", "parameters", "bytes"],
            [["used (each use counted)", f"{self.total_params:,}", human_bytes(self.total_bytes)],
             ["stored", f"{self.unique_params:,}", human_bytes(self.unique_bytes)],
             ["saved by sharing", f"{self.saved_params:,}", f"{human_bytes(self.saved_bytes)} ({ratio})"]],
            align="lrr",
        ))
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()


def report(model: nn.Module) -> SharingReport:
    """Count what sharing saves in ``model``: exact, for every kind, buffers excluded.

    Args:
        model: any ``nn.Module``.

    Returns:
        A :class:`SharingReport`; ``print`` it for a table.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> stack = ps.share_layers(nn.ModuleList(nn.Linear(64, 64) for _ in range(4)), unique=1, strategy="all")
        >>> r = ps.report(stack)
        >>> r.total_params, r.unique_params, r.ratio
        (16640, 4160, 4.0)
    """
    index = ModelIndex(model)
    total_params = total_bytes = 0
    with torch.no_grad():
        for use in index.uses.values():
            v = use.value()
            total_params += v.numel()
            total_bytes += v.numel() * v.element_size()
    unique_params, unique_bytes = index.stored_bytes()
    groups = _find(index)
    rows = []
    for g in groups:
        kind = get_kind(g.kind)
        rows.append(GroupRow(g, kind.stats(index, g)))
        unique_bytes += kind.extra_bytes(index, g)
    return SharingReport(total_params, unique_params, total_bytes, unique_bytes, tuple(groups), tuple(rows))
