"""The ``delta`` kind: a shared base weight plus a small low-rank delta per use.

Relaxed recursive sharing (Bae et al. 2024): every use of a shared weight reads
``base + B @ A`` with its own ``A`` ``(rank, prod(W.shape[1:]))`` and ``B`` ``(W.shape[0], rank)``.
Installed as a ``torch.nn.utils.parametrize`` parametrization (:class:`Delta`) whose
``original`` is the one base ``nn.Parameter``, so the base is stored and stepped once and
each use adds ``rank * (out + in)`` numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._index import ModelIndex
from .._parametrize import set_derived
from ..errors import did_you_mean
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import fmt_shape
from ._derived import dense, foreign_problem, host_path, materialize_uses, members_of, own_parametrization, requires_grad_of

__all__ = ["Delta", "delta_factors"]


class Delta(nn.Module):
    """Parametrization: ``base + (B @ A)`` reshaped to the base's shape.

    Args:
        A: ``(rank, prod(shape[1:]))``, becomes the parameter ``A``.
        B: ``(shape[0], rank)``, becomes the parameter ``B``.
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.A = A if isinstance(A, nn.Parameter) else nn.Parameter(dense(A))
        self.B = B if isinstance(B, nn.Parameter) else nn.Parameter(dense(B))

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + (self.B @ self.A).view(base.shape)

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


def delta_factors(
    residual: torch.Tensor | None, shape, rank: int, dtype=None, device=None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for a rank-``rank`` delta: the truncated SVD of ``residual`` (None: zero delta).

    Components the residual lacks (a zero residual, or rank beyond its rank) get ``B = 0`` and
    a small random ``A`` (LoRA's initialisation), so the delta starts exact yet trains.
    """
    out, inn = int(shape[0]), int(math.prod(shape[1:]))
    if residual is not None:
        dtype, device = residual.dtype, residual.device
    a = torch.empty(rank, inn, dtype=dtype, device=device)
    b = torch.zeros(out, rank, dtype=dtype, device=device)
    if a.device.type == "meta":
        return a, b
    bound = 1.0 / math.sqrt(inn)
    a.copy_(torch.rand(rank, inn, generator=generator, dtype=torch.float64).mul_(2 * bound).sub_(bound))
    if residual is None:
        return a, b
    r = residual.detach().to(torch.float64).reshape(out, inn)
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    k = min(rank, s.shape[0])
    tol = float(s.max()) * max(out, inn) * torch.finfo(residual.dtype).eps if s.numel() else 0.0
    live = int((s[:k] > tol).sum())
    if live:
        root = s[:live].sqrt()
        b[:, :live] = (u[:, :live] * root).to(dtype)
        a[:live] = (root[:, None] * vh[:live]).to(dtype)
    return a, b


@register_kind
class DeltaKind(Kind):
    name = "delta"
    priority = 60  # after alias: a delta's base may be an aliased parameter

    def find(self, index: ModelIndex) -> list[TieGroup]:
        buckets: dict[int, list[str]] = {}
        first: dict[int, tuple[Delta, torch.Tensor]] = {}
        for name, use in index.derived_uses.items():
            d = own_parametrization(use, Delta)
            if d is None:
                continue
            base = use.plist.original
            buckets.setdefault(id(base), []).append(name)
            first.setdefault(id(base), (d, base))
        return [
            TieGroup(self.name, index.canonical(first[k][1]), tuple(names), tuple(first[k][1].shape),
                     {"rank": first[k][0].rank})
            for k, names in buckets.items()
        ]

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        rank = group.options.get("rank")
        shape = group.shape
        if shape is None or len(shape) < 2:
            return [f"delta group of {group.source!r} needs a base of 2 or more dimensions, got shape {shape}"]
        full = min(shape[0], math.prod(shape[1:]))
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= full:
            return [f"delta group of {group.source!r} needs options.rank between 1 and {full}, got {rank!r}"]
        problems: list[str] = []
        base = index.stored_param(group.source)
        if group.source in group.members:
            problems.append(f"delta base {group.source!r} cannot also be one of its members")
        if base is None and group.source != host_path(group.members[0]):
            problems.append(
                f"delta base {group.source!r} does not exist in the model (a new delta group keeps it at "
                f"{host_path(group.members[0])!r})" + did_you_mean(group.source, index.param_paths, "parameter")
            )
        if base is not None and tuple(base.shape) != tuple(shape):
            problems.append(f"{group.source!r} has shape {fmt_shape(base.shape)} but the plan says {fmt_shape(shape)}")
        ref = base
        for m, use in zip(group.members, members_of(index, group)):
            if use is None:
                problems.append(f"delta member {m!r} does not exist in the model" + did_you_mean(m, index.uses, "parameter"))
                continue
            found = foreign_problem(use, self.name, Delta)
            problems += found
            if found:
                continue
            with torch.no_grad():
                v = use.value()
            if tuple(v.shape) != tuple(shape):
                problems.append(
                    f"{m!r} has shape {fmt_shape(v.shape)} but its delta base {group.source!r} has "
                    f"{fmt_shape(shape)}"
                )
            if ref is None:
                ref = v
            elif v.dtype != ref.dtype:
                problems.append(
                    f"{m!r} is {v.dtype} but the delta base of {group.source!r} is {ref.dtype}; "
                    "convert the model to one dtype first"
                )
            elif v.device != ref.device:
                problems.append(
                    f"{m!r} is on {v.device} but the delta base of {group.source!r} is on {ref.device}; "
                    "move the model to one device first"
                )
        return problems

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        rank = group.options["rank"]
        uses = members_of(index, group)
        base = index.stored_param(group.source)
        with torch.no_grad():
            if base is None:
                base = nn.Parameter(dense(uses[0].value().detach().clone()), requires_grad=requires_grad_of(uses[0]))
            for use in uses:
                d = own_parametrization(use, Delta)
                fits = d is not None and d.rank == rank and d.B.shape[0] == base.shape[0]
                if fits and d.A.shape[1] == math.prod(base.shape[1:]):
                    if use.plist.original is not base:
                        use.plist._buffers.pop("original", None)
                        use.plist._parameters["original"] = base
                    continue
                value = use.value().detach()
                residual = None if value.device.type == "meta" else value - base
                a, b = delta_factors(residual, base.shape, rank, dtype=base.dtype, device=base.device)
                set_derived(use.module, use.attr, Delta(a, b), base)

    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        base = index.stored_param(group.source)
        if base is None:
            return [f"missing delta base {group.source!r}"]
        problems = []
        if group.shape is not None and tuple(base.shape) != tuple(group.shape):
            problems.append(f"{group.source!r} has shape {fmt_shape(base.shape)} but the plan says {fmt_shape(group.shape)}")
        rank = group.options.get("rank")
        for m, use in zip(group.members, members_of(index, group)):
            if use is None:
                problems.append(f"missing parameter {m!r}")
                continue
            d = own_parametrization(use, Delta)
            if d is None:
                problems.append(f"{m!r} is no longer a delta on {group.source!r}; re-tie with ps.apply_plan(model, plan)")
            elif use.plist.original is not base:
                problems.append(
                    f"{m!r} adds its delta to a base that is not {group.source!r} "
                    "(as after to_empty or load_state_dict(assign=True)); re-tie with ps.apply_plan(model, plan)"
                )
            elif d.rank != rank:
                problems.append(f"{m!r} has a rank-{d.rank} delta but the plan says rank {rank}")
        return problems

    def _base_is_owned(self, index: ModelIndex, group: TieGroup) -> bool:
        """Whether the base counts as this group's storage (not when it is also a plain use)."""
        return group.source not in index.uses

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        base = index.stored_param(group.source)
        es = base.element_size()
        stored = base.numel() if self._base_is_owned(index, group) else 0
        for use in members_of(index, group):
            d = own_parametrization(use, Delta)
            if d is not None:
                stored += d.A.numel() + d.B.numel()
        k = len(group.members)
        n = base.numel()
        rank = group.options.get("rank")
        return GroupStats(uses=k, used_numel=n * k, stored_numel=stored, stored_bytes=stored * es,
                          saved_bytes=(n * k - stored) * es, detail=f"rank-{rank} deltas")

    def untie(self, index: ModelIndex, group: TieGroup, names: set[str]) -> None:
        materialize_uses([index.uses[m] for m in group.members if m in names and m in index.uses])

    # ---- checkpoints --------------------------------------------------------------------------
    def stored(self, index: ModelIndex, group: TieGroup) -> dict[str, torch.Tensor]:
        # the base always goes under the group's source name (an alias group that also holds it
        # stores the same tensor under the same canonical name)
        out = {group.source: index.stored_param(group.source)}
        for m, use in zip(group.members, members_of(index, group)):
            d = own_parametrization(use, Delta)
            if d is not None:
                out[host_path(m, "0.A")] = d.A
                out[host_path(m, "0.B")] = d.B
        return out

    def owned(self, index: ModelIndex, group: TieGroup) -> list[torch.Tensor]:
        return list(self.stored(index, group).values())
