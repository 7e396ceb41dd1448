"""The ``rows`` kind: the slices of a weight matrix are a few shared vectors, or nothing.

A weight ``W`` of shape ``(out, in)`` is split into slices along ``dim``: with ``dim=1`` the
columns ``W[:, j]`` (one per input feature of an ``nn.Linear``: the rows of the ``in x out``
layout used in the GrOWL paper), with ``dim=0`` the rows ``W[i, :]`` (one per output unit).
Each slice either reads one of ``k`` shared vectors (``labels[j] = c`` reads ``vectors[c]``)
or is pruned (``labels[j] = -1``): it is zero and stored as nothing. Only the ``(k, L)``
table of vectors is a parameter; gradients of tied slices add up in their vector.

The labels are the structure of the tie, so the plan carries them (``options["labels"]``,
``options["dim"]``): ``apply_plan`` on a fresh model reproduces the exact tying, and ``check``
compares them. In the module they are a Python tuple (with a per-device index tensor built
on first use), so ``to_empty``, ``load_state_dict(assign=True)``, ``deepcopy``, pickling and
dtype or device moves never lose or corrupt them. Checkpoints store them next to the vectors,
``labels + 1`` bit-packed at ``ceil(log2(k + 1))`` bits each (:meth:`Rows.stored`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._index import ModelIndex, Use
from .._parametrize import Transposed, remove_derived, set_derived, set_plain
from ..cluster.bits import bits_for, pack_bits, packed_size, unpack_bits
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import fmt_shape
from ._derived import host_path, own_parametrization

__all__ = ["SharedRows", "Rows"]


class SharedRows(nn.Module):
    """Parametrization: a weight whose slices along ``dim`` read shared vectors (or are zero).

    ``forward(vectors)`` returns the full weight: slice ``j`` is ``vectors[labels[j]]``, or
    zero when ``labels[j] == -1``. Assigning the weight (``module.weight = value``) sets each
    vector to the mean of the slices that read it (the closest tied weight in least squares).

    Args:
        labels: one integer per slice, in ``-1 .. k-1``.
        dim: 0 (slices are rows ``W[i, :]``) or 1 (slices are columns ``W[:, j]``).

    Example:
        >>> import torch
        >>> p = SharedRows([0, -1, 0, 1], dim=1)
        >>> p(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([[1., 0., 1., 3.],
                [2., 0., 2., 4.]])
    """

    def __init__(self, labels: Sequence[int], dim: int):
        super().__init__()
        self.labels = tuple(int(v) for v in labels)
        self.dim = int(dim)
        self._index: dict[torch.device, torch.Tensor] = {}

    @property
    def k(self) -> int:
        return max(self.labels, default=-1) + 1

    def index(self, device: torch.device) -> torch.Tensor:
        """``labels + 1`` as an index tensor on ``device`` (row 0 of the table is the zero row)."""
        idx = self._index.get(device)
        if idx is None:
            idx = torch.tensor([v + 1 for v in self.labels], dtype=torch.long, device=device)
            self._index[device] = idx
        return idx

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        table = torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])
        w = table.index_select(0, self.index(vectors.device))
        return w if self.dim == 0 else w.t()

    @torch.no_grad()
    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return mean_vectors(value, self.labels, self.dim, self.k)

    def extra_repr(self) -> str:
        n = len(self.labels)
        pruned = sum(1 for v in self.labels if v < 0)
        return f"dim={self.dim}, slices={n}, vectors={self.k}, pruned={pruned}"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = {}
        return state


def mean_vectors(value: torch.Tensor, labels: Sequence[int], dim: int, k: int) -> torch.Tensor:
    """The ``(k, L)`` table whose vector ``c`` is the mean of the slices labelled ``c``."""
    slices = value if dim == 0 else value.t()
    keep = [j for j, v in enumerate(labels) if v >= 0]
    out = slices.new_zeros(k, slices.shape[1])
    if not keep or k == 0:
        return out
    counts = [0] * k
    for j in keep:
        counts[labels[j]] += 1
    dev = slices.device
    keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
    lab_t = torch.tensor([labels[j] for j in keep], dtype=torch.long, device=dev)
    acc_dtype = torch.float64 if slices.dtype == torch.float64 else torch.float32
    acc = torch.zeros(k, slices.shape[1], dtype=acc_dtype, device=dev)
    acc.index_add_(0, lab_t, slices.index_select(0, keep_t).to(acc_dtype))
    acc /= torch.tensor(counts, dtype=acc_dtype, device=dev).clamp_min(1).unsqueeze(1)
    return acc.to(slices.dtype)


def _shared_rows(use: Use | None) -> SharedRows | None:
    return own_parametrization(use, SharedRows)


def _options(group: TieGroup) -> tuple[int | None, list[int] | None, list[str]]:
    """(dim, labels, problems) read from a group's options."""
    problems = []
    dim = group.options.get("dim")
    labels = group.options.get("labels")
    if isinstance(dim, bool) or dim not in (0, 1):
        problems.append(f"rows group of {group.source!r} needs options['dim'] 0 or 1, got {dim!r}")
        dim = None
    if not isinstance(labels, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        problems.append(f"rows group of {group.source!r} needs options['labels'], a list of integers")
        labels = None
    else:
        labels = list(labels)
    return dim, labels, problems


@register_kind
class Rows(Kind):
    """Kind ``rows``: slices of a matrix stored as ``k`` shared vectors plus per-slice labels."""

    name = "rows"
    priority = 60

    # ---- reading the model -----------------------------------------------------------------
    def find(self, index: ModelIndex) -> list[TieGroup]:
        groups = []
        for name, use in index.derived_uses.items():
            p = _shared_rows(use)
            if p is None:
                continue
            vectors = use.plist.original
            groups.append(
                TieGroup(
                    self.name,
                    index.canonical(vectors),
                    (name,),
                    tuple(vectors.shape),
                    {"dim": p.dim, "labels": list(p.labels)},
                )
            )
        return groups

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        dim, labels, problems = _options(group)
        if len(group.members) != 1:
            return problems + [f"a rows group backs exactly one weight, got members {list(group.members)}"]
        member = group.members[0]
        use = index.uses.get(member)
        if use is None:
            from ..errors import did_you_mean

            return problems + [f"rows member {member!r} does not exist in the model" + did_you_mean(member, index.uses, "parameter")]
        want_source = host_path(member)
        if group.source != want_source:
            problems.append(f"a rows group of {member!r} is stored as {want_source!r}, but the plan says {group.source!r}")
        plist = use.plist
        if plist is not None and not (len(plist) == 1 and isinstance(plist[0], (Transposed, SharedRows))):
            names = ", ".join(type(m).__name__ for m in plist)
            problems.append(
                f"{member!r} is computed by other parametrizations ({names}); untie it with ps.untie first"
            )
            return problems
        with torch.no_grad():
            value = use.value()
        if value.dim() != 2:
            return problems + [f"rows sharing needs a matrix, but {member!r} has shape {fmt_shape(value.shape)}"]
        if not value.is_floating_point():
            problems.append(f"rows sharing needs a floating-point weight, but {member!r} is {value.dtype}")
        if group.shape is None or len(group.shape) != 2:
            return problems + [f"rows group of {member!r} needs a 2-D shape (vectors, length), got {group.shape!r}"]
        k, length = group.shape
        if dim is None or labels is None:
            return problems
        n = value.shape[dim]
        if len(labels) != n:
            problems.append(
                f"rows group of {member!r} has {len(labels)} labels but the weight {fmt_shape(value.shape)} "
                f"has {n} slices along dim {dim}"
            )
        if value.shape[1 - dim] != length:
            problems.append(
                f"rows group of {member!r} stores vectors of length {length} but the slices of "
                f"{fmt_shape(value.shape)} along dim {dim} have length {value.shape[1 - dim]}"
            )
        bad = sorted({v for v in labels if not -1 <= v < k})
        if bad:
            problems.append(f"rows group of {member!r} has labels {bad[:8]} outside -1..{k - 1}")
        unused = sorted(set(range(k)) - set(labels))
        if unused and not bad:
            problems.append(f"rows group of {member!r} never uses vectors {unused[:8]} of its {k}; renumber the labels")
        return problems

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        member = group.members[0]
        use = index.uses[member]
        dim, labels = int(group.options["dim"]), [int(v) for v in group.options["labels"]]
        k = int(group.shape[0])
        current = _shared_rows(use)
        if (
            current is not None
            and current.dim == dim
            and list(current.labels) == labels
            and isinstance(use.plist.original, nn.Parameter)
            and tuple(use.plist.original.shape) == tuple(group.shape)
        ):
            return
        with torch.no_grad():
            value = use.value().detach()
            vectors = mean_vectors(value, labels, dim, k)
        old, _ = use.backing()
        if old is None:
            old = use.plist.original
        requires_grad = bool(getattr(old, "requires_grad", True))
        set_derived(use.module, use.attr, SharedRows(labels, dim), nn.Parameter(vectors, requires_grad=requires_grad))

    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        member = group.members[0] if group.members else "?"
        use = index.uses.get(member)
        if use is None:
            return [f"missing parameter {member!r}"]
        p = _shared_rows(use)
        if p is None:
            return [f"{member!r} no longer reads shared rows; re-tie with ps.apply_plan(model, plan)"]
        problems = []
        dim, labels, _ = _options(group)
        vectors = use.plist.original
        if index.stored_param(group.source) is not vectors:
            problems.append(f"{member!r} reads shared rows that are not stored as {group.source!r}")
        if group.shape is not None and tuple(vectors.shape) != tuple(group.shape):
            problems.append(
                f"{group.source!r} has shape {fmt_shape(vectors.shape)} but the plan says {fmt_shape(group.shape)}"
            )
        if dim is not None and p.dim != dim:
            problems.append(f"{member!r} shares slices along dim {p.dim} but the plan says dim {dim}")
        if labels is not None and list(p.labels) != labels:
            diff = sum(1 for a, b in zip(p.labels, labels) if a != b) + abs(len(p.labels) - len(labels))
            problems.append(
                f"{member!r} ties its slices differently from the plan ({diff} of {len(labels)} labels differ); "
                "re-tie with ps.apply_plan(model, plan)"
            )
        return problems

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        use = index.uses[group.members[0]]
        p = _shared_rows(use)
        vectors = use.plist.original
        es = vectors.element_size()
        n = len(p.labels)
        k, length = vectors.shape
        pruned = sum(1 for v in p.labels if v < 0)
        used = n * length
        stored = k * length
        extra = self.extra_bytes(index, group)
        what = "rows" if p.dim == 0 else "columns"
        return GroupStats(
            uses=1,
            used_numel=used,
            stored_numel=stored,
            stored_bytes=stored * es,
            saved_bytes=used * es - stored * es - extra,
            detail=f"{n} {what}: {k} shared vector{'s' if k != 1 else ''}, {pruned} pruned",
        )

    def untie(self, index: ModelIndex, group: TieGroup, names: set[str]) -> None:
        for name in names:
            use = index.uses.get(name)
            if _shared_rows(use) is None:
                continue
            with torch.no_grad():
                value = use.value().detach().clone(memory_format=torch.contiguous_format)
            requires_grad = use.plist.original.requires_grad
            remove_derived(use.module, use.attr)
            set_plain(use.module, use.attr, nn.Parameter(value, requires_grad=requires_grad))

    def extra_bytes(self, index: ModelIndex, group: TieGroup) -> int:
        """The labels in their file form: ``labels + 1`` packed at ``bits_for(k + 1)`` bits each."""
        p = _shared_rows(index.uses.get(group.members[0]))
        if p is None:
            return 0
        return packed_size(len(p.labels), bits_for(p.k + 1))

    # ---- checkpoints -----------------------------------------------------------------------
    def stored(self, index: ModelIndex, group: TieGroup) -> dict[str, torch.Tensor]:
        """The vectors under ``group.source``; ``labels + 1`` bit-packed under ``group.source + '.labels'``."""
        use = index.uses[group.members[0]]
        p = _shared_rows(use)
        vectors = use.plist.original
        shifted = torch.tensor([v + 1 for v in p.labels], dtype=torch.int64)
        return {group.source: vectors, group.source + ".labels": pack_bits(shifted, bits_for(p.k + 1))}

    def owned(self, index: ModelIndex, group: TieGroup) -> list[torch.Tensor]:
        use = index.uses[group.members[0]]
        return [use.plist.original]

    def restore(self, index: ModelIndex, group: TieGroup, tensors: Mapping[str, torch.Tensor], apply: bool) -> list[str]:
        problems = []
        use = index.uses.get(group.members[0])
        p = _shared_rows(use)
        if p is None:
            return [f"{group.members[0]!r} does not read shared rows; apply the checkpoint's plan first"]
        vectors = use.plist.original
        t = tensors.get(group.source)
        if t is None:
            problems.append(f"the file has no tensor {group.source!r} for the rows group of {group.members[0]!r}")
        elif tuple(t.shape) != tuple(vectors.shape):
            problems.append(
                f"tensor {group.source!r} has shape {fmt_shape(t.shape)} in the file but {fmt_shape(vectors.shape)} in the model"
            )
        key = group.source + ".labels"
        lab = tensors.get(key)
        if lab is None:
            problems.append(f"the file has no tensor {key!r} for the rows group of {group.members[0]!r}")
        elif (
            lab.dtype != torch.uint8
            or lab.dim() != 1
            or lab.numel() != packed_size(len(p.labels), bits_for(p.k + 1))
            or (unpack_bits(lab, bits_for(p.k + 1), len(p.labels)) - 1).tolist() != list(p.labels)
        ):
            problems.append(
                f"tensor {key!r} in the file does not match how {group.members[0]!r} ties its slices in the model; "
                "apply the checkpoint's plan first"
            )
        if apply and not problems:
            with torch.no_grad():
                vectors.copy_(t.to(device=vectors.device, dtype=vectors.dtype))
        return problems
