"""The ``codebook`` kind: a weight is ``centroids[labels]``, a few shared values and small integers.

Weight clustering (Deep Compression, TF-MOT ``cluster_weights``, coremltools palettization):
every element of a weight reads one of ``k`` centroids. The centroids are the stored
``nn.Parameter`` (the ``original`` of a ``torch.nn.utils.parametrize`` parametrization, so
``named_parameters`` lists them once and an optimizer trains them: each centroid's gradient
is the sum of its members' gradients); the labels are a small-integer buffer of the weight's
shape (uint8 up to 256 clusters) inside the :class:`Codebook` parametrization.

Granularity: one codebook for the whole tensor (centroids of shape ``(k,)``), or one per
group of ``rows`` consecutive rows (output channels; centroids ``(out // rows, k)``).
With ``zero=True`` centroid 0 is pinned at exactly zero and receives no gradient: the
pruned weights of Deep Compression stay pruned while the other centroids train.

Several uses may read one codebook (a tied embedding and output layer clustered once):
they share the :class:`Codebook` module and the centroids ``nn.Parameter``.

A checkpoint stores the centroids under ``group.source`` and the labels bit-packed at
``ceil(log2 k)`` bits under ``group.source + ".labels"`` (:meth:`CodebookKind.stored`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .._format import human_bytes
from .._index import ModelIndex, Use
from .._parametrize import remove_derived, set_derived, set_plain
from ..cluster.bits import bits_for, pack_bits, packed_size, unpack_bits
from ..plans import GroupStats, Kind, TieGroup, register_kind
from ._common import fmt_shape

__all__ = ["Codebook", "CodebookKind", "labels_dtype", "centroids_path", "linear_fit"]


def labels_dtype(k: int) -> torch.dtype:
    """The in-memory dtype of labels ``0 .. k-1``: uint8 up to 256 clusters, then int16, int32."""
    if k <= 256:
        return torch.uint8
    if k <= 2**15:
        return torch.int16
    return torch.int32


def centroids_path(use_name: str) -> str:
    """Where the centroids of the clustered use ``use_name`` live: ``<module>.parametrizations.<attr>.original``."""
    mod, _, attr = use_name.rpartition(".")
    return f"{mod + '.' if mod else ''}parametrizations.{attr}.original"


class Codebook(nn.Module):
    """Parametrization: the weight is ``centroids[labels]``, one codebook per group of rows.

    ``forward(centroids)`` returns the dense weight; ``centroids`` has shape ``(k,)`` (one
    codebook) or ``(codebooks, k)`` where codebook ``b`` serves rows ``b*rows .. (b+1)*rows-1``
    of the weight. Assigning the weight (``module.weight = value``) sets every centroid to
    the mean of the values of its members (the least-squares fit for the fixed labels).

    Args:
        labels: an integer tensor of the weight's shape, values in ``0 .. k-1``.
        clusters: ``k``.
        rows: rows (dim 0) per codebook; None for one codebook for the whole tensor.
        zero: pin centroid 0 of every codebook at exactly zero (no gradient reaches it).
    """

    def __init__(self, labels: torch.Tensor, clusters: int, rows: int | None = None, zero: bool = False):
        super().__init__()
        self.clusters = int(clusters)
        self.rows = None if rows is None else int(rows)
        self.zero = bool(zero)
        self.shape = tuple(labels.shape)
        self.register_buffer("labels", labels.to(labels_dtype(self.clusters)))

    @property
    def codebooks(self) -> int:
        """How many codebooks (1 for a whole-tensor codebook)."""
        return 1 if self.rows is None else self.shape[0] // self.rows

    @property
    def centroid_shape(self) -> tuple[int, ...]:
        return (self.clusters,) if self.rows is None else (self.codebooks, self.clusters)

    @property
    def granularity(self):
        """``"tensor"`` or the number of rows per codebook, as :func:`paramshare.cluster` takes it."""
        return "tensor" if self.rows is None else self.rows

    def flat_index(self) -> torch.Tensor:
        """int64 indices into ``centroids.reshape(-1)``, of the weight's shape."""
        idx = self.labels.long()
        if self.rows is not None and self.codebooks > 1:
            offs = torch.arange(self.shape[0], device=idx.device) // self.rows * self.clusters
            idx = idx + offs.view((-1,) + (1,) * (len(self.shape) - 1))
        return idx

    def forward(self, centroids: torch.Tensor) -> torch.Tensor:
        c = centroids
        if self.zero:
            c = torch.cat((torch.zeros_like(c[..., :1]), c[..., 1:]), dim=-1)
        return c.reshape(-1)[self.flat_index()]

    @torch.no_grad()
    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        idx = self.flat_index().reshape(-1)
        n = self.codebooks * self.clusters
        v = value.detach().reshape(-1)
        sums = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, idx, v.double())
        counts = torch.bincount(idx, minlength=n).to(torch.float64)
        c = (sums / counts.clamp(min=1)).to(value.dtype).reshape(self.centroid_shape)
        if self.zero:
            c[..., 0] = 0
        return c

    def extra_repr(self) -> str:
        g = "tensor" if self.rows is None else f"rows={self.rows}"
        return f"clusters={self.clusters}, {g}, zero={self.zero}, shape={self.shape}"


def codebook_of(use: Use | None) -> Codebook | None:
    """The :class:`Codebook` computing ``use`` (None when it is something else)."""
    if use is None:
        return None
    plist = use.plist
    if plist is not None and len(plist) == 1 and isinstance(plist[0], Codebook):
        return plist[0]
    return None


@torch.no_grad()
def linear_fit(value: torch.Tensor, clusters: int, rows: int | None, zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids, labels) with evenly spaced centroids between each codebook's min and max.

    The cheap fit :meth:`CodebookKind.install` uses to give a weight the plan's codebook
    structure (``apply_plan`` on a dense model, ``ps.load`` before copying the file's
    values). Non-finite values are ignored; on the meta device only the shapes are made.
    """
    shape = tuple(value.shape)
    nb = 1 if rows is None else shape[0] // rows
    if value.is_meta:
        return (
            torch.zeros((clusters,) if rows is None else (nb, clusters), dtype=value.dtype, device="meta"),
            torch.zeros(shape, dtype=labels_dtype(clusters), device="meta"),
        )
    v = value.detach().reshape(nb, -1).double()
    finite = torch.isfinite(v)
    big = torch.finfo(torch.float64).max
    lo = torch.where(finite, v, big).amin(1, keepdim=True)
    hi = torch.where(finite, v, -big).amax(1, keepdim=True)
    empty = ~finite.any(1, keepdim=True)
    lo = torch.where(empty, 0.0, lo)
    hi = torch.where(empty, 0.0, hi)
    free = clusters - 1 if zero else clusters
    if free <= 1:
        grid = (lo + hi) / 2 if free == 1 else lo[:, :0]
    else:
        t = torch.linspace(0, 1, free, dtype=torch.float64, device=v.device)
        grid = lo + (hi - lo) * t
    c = torch.cat((torch.zeros_like(lo), grid), 1) if zero else grid
    vv = torch.where(finite, v, 0.0)
    labels = (vv.unsqueeze(-1) - c.unsqueeze(1)).abs().argmin(-1) if c.shape[1] <= 16 else _nearest_sorted(vv, c)
    cent = c.to(value.dtype)
    if rows is None:
        cent = cent.reshape(clusters)
    return cent, labels.reshape(shape).to(labels_dtype(clusters))


def _nearest_sorted(v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid per row for many centroids: sort, bucketize at midpoints, map back."""
    cs, order = c.sort(1)
    mids = (cs[:, 1:] + cs[:, :-1]) / 2
    pos = torch.searchsorted(mids.contiguous(), v.contiguous(), right=False)
    return order.gather(1, pos)


def _int_option(o, key):
    v = o.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@register_kind
class CodebookKind(Kind):
    """Weights read ``centroids[labels]``; see the module docstring."""

    name = "codebook"
    priority = 60

    # ---- describing --------------------------------------------------------------------------
    def _options(self, cb: Codebook) -> dict:
        return {
            "clusters": cb.clusters,
            "bits": bits_for(cb.clusters),
            "granularity": cb.granularity,
            "zero": cb.zero,
            "weight_shape": list(cb.shape),
        }

    def find(self, index: ModelIndex) -> list[TieGroup]:
        buckets: dict[int, list[str]] = {}
        first: dict[int, tuple[Use, Codebook]] = {}
        for name, use in index.derived_uses.items():
            cb = codebook_of(use)
            if cb is None:
                continue
            orig = use.plist.original
            buckets.setdefault(id(orig), []).append(name)
            first.setdefault(id(orig), (use, cb))
        groups = []
        for key, names in buckets.items():
            use, cb = first[key]
            orig = use.plist.original
            src = index.canonical(orig)
            if src == "?":
                src = centroids_path(names[0])
            groups.append(TieGroup(self.name, src, tuple(names), tuple(orig.shape), self._options(cb)))
        return groups

    def _plan_problems(self, group: TieGroup) -> list[str]:
        o = group.options
        where = f"codebook group of {group.source!r}"
        problems = []
        k = _int_option(o, "clusters")
        if k is None or not 1 <= k <= 2**16:
            problems.append(f"the {where} needs options.clusters, an integer from 1 to 65536, got {o.get('clusters')!r}")
            return problems
        if o.get("bits", bits_for(k)) != bits_for(k):
            problems.append(f"the {where} says bits={o.get('bits')!r} but {k} clusters take {bits_for(k)} bits")
        ws = o.get("weight_shape")
        if not isinstance(ws, (list, tuple)) or not ws or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in ws):
            problems.append(f"the {where} needs options.weight_shape, a list of positive sizes, got {ws!r}")
            return problems
        gran = o.get("granularity", "tensor")
        if gran != "tensor" and (not isinstance(gran, int) or isinstance(gran, bool) or gran < 1 or ws[0] % gran):
            problems.append(
                f"the {where} has granularity {gran!r}; expected 'tensor' or a number of rows dividing {ws[0]}"
            )
            return problems
        if not isinstance(o.get("zero", False), bool):
            problems.append(f"the {where} has options.zero={o.get('zero')!r}; expected true or false")
        want = (k,) if gran == "tensor" else (ws[0] // gran, k)
        if group.shape is not None and tuple(group.shape) != want:
            problems.append(f"the {where} has centroid shape {fmt_shape(group.shape)} but its options give {fmt_shape(want)}")
        if group.source != centroids_path(group.members[0]):
            problems.append(
                f"the {where} must name its centroids {centroids_path(group.members[0])!r} (the first member's), "
                f"got {group.source!r}"
            )
        return problems

    def _config(self, group: TieGroup) -> tuple[int, int | None, bool, tuple[int, ...]]:
        o = group.options
        gran = o.get("granularity", "tensor")
        return int(o["clusters"]), (None if gran == "tensor" else int(gran)), bool(o.get("zero", False)), tuple(o["weight_shape"])

    def _matches(self, cb: Codebook | None, group: TieGroup) -> bool:
        if cb is None:
            return False
        k, rows, zero, shape = self._config(group)
        return cb.clusters == k and cb.rows == rows and cb.zero == zero and cb.shape == shape

    # ---- installing ----------------------------------------------------------------------------
    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        problems = self._plan_problems(group)
        if problems:
            return problems
        k, rows, zero, shape = self._config(group)
        for m in group.members:
            use = index.uses.get(m)
            if use is None:
                from ..errors import did_you_mean

                problems.append(f"codebook member {m!r} does not exist in the model" + did_you_mean(m, index.uses, "parameter"))
                continue
            cb = codebook_of(use)
            plist = use.plist
            if plist is not None and cb is None:
                names = ", ".join(type(p).__name__ for p in plist)
                problems.append(
                    f"{m!r} is computed by other parametrizations ({names}); ps.untie it before making it a codebook member"
                )
                continue
            if plist is None and use.param is not None and self._transposed_elsewhere(index, use):
                problems.append(
                    f"{m!r} is read transposed by another parameter; untie that transposed tie first (ps.untie) "
                    "or keep this weight dense"
                )
            with torch.no_grad():
                if cb is not None and not self._matches(cb, group):
                    if not cb.labels.is_meta and cb.labels.numel() and int(cb.labels.max()) >= cb.clusters:
                        problems.append(
                            f"{m!r} reads a codebook whose labels are out of range (uninitialised memory?); "
                            "load its state before applying a different codebook plan"
                        )
                        continue
                value = use.value() if cb is None else torch.empty(cb.shape, dtype=plist.original.dtype, device="meta")
            if tuple(value.shape) != shape:
                problems.append(f"{m!r} has shape {fmt_shape(value.shape)} but the plan's codebook is for {fmt_shape(shape)}")
            elif not value.dtype.is_floating_point:
                problems.append(f"{m!r} is {value.dtype}; only floating-point weights can read a codebook")
        return problems

    @staticmethod
    def _transposed_elsewhere(index: ModelIndex, use: Use) -> bool:
        p = use.param
        for other in index.uses.values():
            if other is use or other.plist is None:
                continue
            q, t = other.backing()
            if t and q is p:
                return True
        return False

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        k, rows, zero, shape = self._config(group)
        uses = [index.uses[m] for m in group.members]
        cb = orig = None
        for u in uses:  # keep an existing codebook of the right configuration
            c = codebook_of(u)
            if self._matches(c, group):
                cb, orig = c, u.plist.original
                lab = cb.labels
                if not lab.is_meta and lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
                    with torch.no_grad():  # uninitialised memory (to_empty): valid labels, values to be loaded
                        lab.clamp_(0, k - 1)
                break
        if cb is None:
            u = uses[0]
            existing = codebook_of(u)
            with torch.no_grad():
                value = u.value().detach()
            if existing is not None:
                requires_grad = u.plist.original.requires_grad
            else:
                requires_grad = u.param.requires_grad if u.param is not None else True
            cent, labels = linear_fit(value, k, rows, zero)
            cb = Codebook(labels, k, rows, zero)
            orig = nn.Parameter(cent, requires_grad=requires_grad)
        for u in uses:
            if codebook_of(u) is cb and u.plist.original is orig:
                continue
            set_derived(u.module, u.attr, cb, orig)

    # ---- checking and counting -----------------------------------------------------------------
    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        problems = self._plan_problems(group)
        if problems:
            return problems
        k, rows, zero, shape = self._config(group)
        src = index.stored_param(group.source)
        ref_cb = None
        for m in group.members:
            use = index.uses.get(m)
            if use is None:
                problems.append(f"missing parameter {m!r}")
                continue
            cb = codebook_of(use)
            if cb is None:
                problems.append(f"{m!r} no longer reads a codebook; re-cluster it with ps.apply_plan(model, plan)")
                continue
            if not self._matches(cb, group):
                problems.append(
                    f"{m!r} reads a codebook of {cb.clusters} clusters, granularity {cb.granularity!r}, zero={cb.zero}, "
                    f"shape {fmt_shape(cb.shape)}; the plan says {k}, {group.options.get('granularity', 'tensor')!r}, "
                    f"zero={zero}, {fmt_shape(shape)}"
                )
                continue
            if use.plist.original is not src:
                problems.append(
                    f"{m!r} reads centroids that are not {group.source!r} (as after to_empty or "
                    "load_state_dict(assign=True)); re-tie with ps.apply_plan(model, plan)"
                )
            if ref_cb is None:
                ref_cb = cb
            elif cb is not ref_cb:
                problems.append(f"{m!r} reads other labels than {group.members[0]!r}; re-tie with ps.apply_plan(model, plan)")
            if tuple(use.plist.original.shape) != cb.centroid_shape:
                problems.append(
                    f"the centroids of {m!r} have shape {fmt_shape(use.plist.original.shape)}, expected {fmt_shape(cb.centroid_shape)}"
                )
            lab = cb.labels
            if lab.dtype.is_floating_point or tuple(lab.shape) != shape:
                problems.append(f"the labels of {m!r} are {lab.dtype} {fmt_shape(lab.shape)}; expected integers of shape {fmt_shape(shape)}")
            elif not lab.is_meta and lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= k):
                problems.append(
                    f"the labels of {m!r} hold values outside 0..{k - 1} (uninitialised memory after to_empty?); "
                    "load the model's state or a checkpoint"
                )
        return list(dict.fromkeys(problems))

    def _label_bytes(self, group: TieGroup) -> int:
        k, _, _, shape = self._config(group)
        return packed_size(math.prod(shape), bits_for(k))

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        k, _, _, shape = self._config(group)
        src = index.stored_param(group.source)
        n = math.prod(shape)
        es = src.element_size()
        cent_bytes = src.numel() * es
        stored = cent_bytes + self._label_bytes(group)
        uses = len(group.members)
        return GroupStats(
            uses=uses,
            used_numel=n * uses,
            stored_numel=src.numel(),
            stored_bytes=stored,
            saved_bytes=n * es * uses - stored,
            detail=f"{k} clusters, {8 * stored / n:.2f} bits/weight, {human_bytes(stored)} with the codebook",
        )

    def extra_bytes(self, index: ModelIndex, group: TieGroup) -> int:
        """The labels, counted at ``ceil(log2 k)`` bits each (as a checkpoint stores them)."""
        return self._label_bytes(group)

    # ---- untying -------------------------------------------------------------------------------
    def untie(self, index: ModelIndex, group: TieGroup, names: set[str]) -> None:
        """Each named member becomes its own dense parameter with its current values."""
        with torch.no_grad():
            values = []
            for m in group.members:
                if m in names:
                    u = index.uses[m]
                    values.append((u, u.value().detach().clone(), u.plist.original.requires_grad))
        for u, v, req in values:
            remove_derived(u.module, u.attr)
            set_plain(u.module, u.attr, nn.Parameter(v, requires_grad=req))

    # ---- checkpoints ---------------------------------------------------------------------------
    def stored(self, index: ModelIndex, group: TieGroup) -> dict[str, torch.Tensor]:
        """Centroids under ``group.source``; labels packed at ``ceil(log2 k)`` bits under ``source + '.labels'``."""
        use = index.uses[group.members[0]]
        cb = codebook_of(use)
        k = cb.clusters
        return {group.source: use.plist.original, group.source + ".labels": pack_bits(cb.labels, bits_for(k))}

    def owned(self, index: ModelIndex, group: TieGroup) -> list[torch.Tensor]:
        out = []
        for m in group.members:
            use = index.uses.get(m)
            cb = codebook_of(use)
            if cb is not None:
                out += [use.plist.original, cb.labels]
        return out

    def restore(self, index: ModelIndex, group: TieGroup, tensors: Mapping[str, torch.Tensor], apply: bool) -> list[str]:
        use = index.uses.get(group.members[0])
        cb = codebook_of(use)
        if cb is None:
            return [f"{group.members[0]!r} does not read a codebook; apply the checkpoint's plan first"]
        k = cb.clusters
        cent = use.plist.original
        problems = []
        c = tensors.get(group.source)
        lab_name = group.source + ".labels"
        p = tensors.get(lab_name)
        if c is None:
            problems.append(f"the file has no tensor {group.source!r} (the centroids of {group.members[0]!r})")
        elif tuple(c.shape) != tuple(cent.shape):
            problems.append(f"tensor {group.source!r} has shape {fmt_shape(c.shape)} in the file but {fmt_shape(cent.shape)} in the model")
        elif not c.dtype.is_floating_point:
            problems.append(f"tensor {group.source!r} is {c.dtype} in the file; centroids are floating point")
        labels = None
        n = math.prod(cb.shape)
        if p is None:
            problems.append(f"the file has no tensor {lab_name!r} (the packed labels of {group.members[0]!r})")
        elif p.dtype != torch.uint8 or p.dim() != 1 or p.numel() != packed_size(n, bits_for(k)):
            problems.append(
                f"tensor {lab_name!r} is {p.dtype} {fmt_shape(p.shape)} in the file; {n} labels at {bits_for(k)} bits "
                f"are uint8 ({packed_size(n, bits_for(k))},)"
            )
        else:
            labels = unpack_bits(p, bits_for(k), n)
            if n and int(labels.max()) >= k:
                problems.append(f"tensor {lab_name!r} holds label {int(labels.max())} but the codebook has {k} clusters; the file is corrupt")
        if apply and not problems:
            with torch.no_grad():
                cent.copy_(c.to(device=cent.device, dtype=cent.dtype))
                cb.labels.copy_(labels.view(cb.shape).to(device=cb.labels.device, dtype=cb.labels.dtype))
        return problems
