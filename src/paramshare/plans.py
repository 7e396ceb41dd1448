"""The one idea: a SharingPlan of TieGroups, and the registry of sharing kinds.

A :class:`TieGroup` says that some used parameters (``members``) are backed by one stored
tensor (``source``), and how (``kind``). A :class:`SharingPlan` is every group of one model,
serialisable as JSON. Each kind is one :class:`Kind` subclass registered with
:func:`register_kind`; ``plan``, ``apply_plan``, ``check``, ``report`` and checkpoints call
kinds only through this interface, so a new kind is one new file in ``paramshare/kinds/``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .errors import SharingError

if TYPE_CHECKING:  # pragma: no cover
    from ._index import ModelIndex

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "TieGroup",
    "SharingPlan",
    "GroupStats",
    "Kind",
    "register_kind",
    "get_kind",
    "kind_names",
]

PLAN_FORMAT = "paramshare.plan"
PLAN_VERSION = 1


class FrozenDict(dict):
    """A read-only, hashable dict for a group's kind-specific options."""

    def _readonly(self, *args, **kwargs):
        raise TypeError("TieGroup options are read-only; build a new TieGroup with dataclasses.replace")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True, default=str))

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo):
        return self


@dataclass(frozen=True)
class TieGroup:
    """Used parameters backed by one stored tensor.

    Attributes:
        kind: the sharing kind's registered name (``"alias"``, ``"transpose"``, ...).
        source: the stored tensor's name (for ``alias``, one of the members).
        members: dotted names of the used parameters, in model order.
        shape: the stored tensor's shape, so ``check`` can see a shape change (None: unchecked).
        options: kind-specific settings (JSON values), e.g. a codebook's bit width.

    Example:
        >>> g = TieGroup("alias", "embed.weight", ("embed.weight", "head.weight"), (100, 16))
        >>> TieGroup.from_dict(g.to_dict()) == g
        True
    """

    kind: str
    source: str
    members: tuple[str, ...]
    shape: tuple[int, ...] | None = None
    options: Mapping[str, Any] = field(default_factory=FrozenDict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not isinstance(self.options, FrozenDict):
            object.__setattr__(self, "options", FrozenDict(self.options or {}))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "source": self.source, "members": list(self.members)}
        if self.shape is not None:
            d["shape"] = list(self.shape)
        if self.options:
            d["options"] = json.loads(json.dumps(dict(self.options)))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TieGroup:
        """Build a group from :meth:`to_dict` output, validating every field."""
        if not isinstance(d, Mapping):
            raise SharingError(f"a tie group must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"kind", "source", "members", "shape", "options"}
        if unknown:
            raise SharingError(f"tie group has unknown fields {sorted(unknown)}")
        kind = d.get("kind")
        if not isinstance(kind, str):
            raise SharingError(f"tie group needs a 'kind' string, got {kind!r}")
        get_kind(kind)  # raises for a kind this version does not know
        source = d.get("source")
        if not isinstance(source, str) or not source:
            raise SharingError(f"{kind} group needs a non-empty 'source' string, got {source!r}")
        members = d.get("members")
        if not isinstance(members, (list, tuple)) or not members or not all(isinstance(m, str) and m for m in members):
            raise SharingError(f"{kind} group of {source!r} needs 'members', a non-empty list of names, got {members!r}")
        if len(set(members)) != len(members):
            raise SharingError(f"{kind} group of {source!r} lists a member twice: {list(members)}")
        shape = d.get("shape")
        if shape is not None and (
            not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ):
            raise SharingError(f"{kind} group of {source!r} has an invalid shape {shape!r}")
        options = d.get("options", {})
        if not isinstance(options, Mapping):
            raise SharingError(f"{kind} group of {source!r} has options that are not an object: {options!r}")
        return cls(kind, source, tuple(members), None if shape is None else tuple(shape), FrozenDict(options))

    def __str__(self) -> str:
        return f"{self.kind}: {self.source} -> {', '.join(self.members)}"


@dataclass(frozen=True)
class SharingPlan:
    """All the tie groups of one model; JSON-serialisable, comparable, versioned.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        >>> p = ps.plan(ps.tie(m, "0.weight", "1.weight"))
        >>> SharingPlan.from_json(p.to_json()) == p
        True
    """

    groups: tuple[TieGroup, ...] = ()
    version: int = PLAN_VERSION

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))

    def __iter__(self) -> Iterator[TieGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __bool__(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "version": self.version, "groups": [g.to_dict() for g in self.groups]}

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SharingPlan:
        """Build a plan from :meth:`to_dict` output; a SharingError names what is wrong."""
        if not isinstance(d, Mapping):
            raise SharingError(f"a sharing plan must be a JSON object, got {type(d).__name__}")
        fmt = d.get("format", PLAN_FORMAT)
        if fmt != PLAN_FORMAT:
            raise SharingError(f"not a sharing plan: format is {fmt!r}, expected {PLAN_FORMAT!r}")
        version = d.get("version", PLAN_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise SharingError(f"sharing plan has an invalid version {version!r}")
        if version > PLAN_VERSION:
            raise SharingError(
                f"sharing plan version {version} is newer than this paramshare reads ({PLAN_VERSION}); upgrade paramshare"
            )
        groups = d.get("groups")
        if not isinstance(groups, (list, tuple)):
            raise SharingError(f"sharing plan needs a 'groups' list, got {type(groups).__name__}")
        return cls(tuple(TieGroup.from_dict(g) for g in groups), version)

    @classmethod
    def from_json(cls, text: str | bytes) -> SharingPlan:
        try:
            d = json.loads(text)
        except (ValueError, TypeError) as e:
            raise SharingError(f"sharing plan is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def __str__(self) -> str:
        if not self.groups:
            return "SharingPlan (no ties)"
        lines = [f"SharingPlan ({len(self.groups)} group{'s' if len(self.groups) != 1 else ''})"]
        lines += ["  " + str(g) for g in self.groups]
        return "\n".join(lines)


@dataclass(frozen=True)
class GroupStats:
    """What one tie group costs and saves, as the report shows it."""

    uses: int  # how many used parameters the group backs
    used_numel: int  # elements the members use, each use counted
    stored_numel: int  # elements the group adds to storage
    stored_bytes: int
    saved_bytes: int  # bytes the members would take untied, minus what the group stores
    detail: str = ""  # kind-specific note (e.g. "4 bits/weight")


class Kind:
    """One way for used parameters to be backed by stored tensors.

    Subclass, set ``name``, implement the methods and decorate with :func:`register_kind`.
    Methods receive a fresh :class:`~paramshare._index.ModelIndex` of the model.

    ``priority`` orders installation (lower first): kinds whose sources other kinds read
    (alias) install before them.
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 100
    #: uses of this kind point at a stored ``nn.Parameter`` (plain or transposed), so untying
    #: them is copying that parameter (handled together for all such kinds).
    shares_backing: ClassVar[bool] = False

    def find(self, index: ModelIndex) -> list[TieGroup]:
        """Groups of this kind present in the model, in model order."""
        raise NotImplementedError

    def validate(self, index: ModelIndex, group: TieGroup) -> list[str]:
        """Problems that would stop :meth:`install` (empty: install will succeed)."""
        raise NotImplementedError

    def install(self, index: ModelIndex, group: TieGroup) -> None:
        """Impose the group on the model (called only after ``validate`` returned [])."""
        raise NotImplementedError

    def check(self, index: ModelIndex, group: TieGroup) -> list[str]:
        """How the model differs from the group ([] when it matches)."""
        raise NotImplementedError

    def stats(self, index: ModelIndex, group: TieGroup) -> GroupStats:
        """Counts for the report."""
        raise NotImplementedError

    def untie(self, index: ModelIndex, group: TieGroup, names: set[str]) -> None:
        """Give each member in ``names`` plain, independent parameters with the same values."""
        raise NotImplementedError

    # ---- checkpoints: how the group's storage is written to and read from a file ----------
    def stored(self, index: ModelIndex, group: TieGroup) -> dict[str, torch.Tensor]:
        """The group's stored tensors in file form, keyed by deterministic file names.

        Names derive from ``group.source`` (the default stores the source parameter under its
        own name). A kind with a compact file form (packed codebook indices, say) returns it
        here and turns it back in :meth:`restore`.

        ``ps.save`` calls it on the live model for every group and writes exactly these
        tensors: whatever the model keeps under a member's parametrization
        (``<module>.parametrizations.<attr>.*``) and the tensors :meth:`owned` lists are
        written only through this hook, so include everything :meth:`restore` needs that
        the plan (shape, options) does not determine. Integer tensors are entropy-coded when
        the user passes ``compress=True``; :meth:`restore` always sees them decoded.
        """
        return {group.source: index.stored_param(group.source)}

    def owned(self, index: ModelIndex, group: TieGroup) -> list[torch.Tensor]:
        """The model's tensors (parameters and buffers) that :meth:`stored` covers.

        A checkpoint writes these only through :meth:`stored`, never under their own paths.
        Called only on a model where the group is installed (``check`` returns ``[]``), except
        that a kind keeping this default is also asked before installation.
        """
        return [index.stored_param(group.source)]

    def restore(self, index: ModelIndex, group: TieGroup, tensors: Mapping[str, torch.Tensor], apply: bool) -> list[str]:
        """Check a file's tensors for this group against the (installed) model; copy them in if ``apply``.

        Called with ``apply=False`` on every group before anything changes, so a bad file
        leaves the model as it was; returns the problems (missing tensor, shape or dtype).

        How ``ps.load`` calls it: when every group is already installed, on the model itself;
        otherwise the plan is installed on a trial copy of the model (real tensors in the
        modules that hold the group's members and source, meta tensors elsewhere) and
        ``apply=False`` runs there. Only when every group passes is the plan installed on
        the model and ``apply=True`` called, with ``torch.no_grad`` in effect. Look the
        group's tensors up by name (``tensors[name]``, ``tensors.get(name)``,
        ``name in tensors``): the names looked up with ``apply=False`` are the group's, and
        a file tensor that no group and no plain parameter or buffer looks up is reported
        as unexpected. ``tensors`` may be views of the file: copy, never keep them.
        """
        problems = []
        expected = self.stored(index, group)
        for name, mine in expected.items():
            t = tensors.get(name)
            if t is None:
                problems.append(f"the file has no tensor {name!r} for the {group.kind} group of {group.source!r}")
            elif tuple(t.shape) != tuple(mine.shape):
                problems.append(
                    f"tensor {name!r} has shape {tuple(t.shape)} in the file but {tuple(mine.shape)} in the model"
                )
        if apply and not problems:
            with torch.no_grad():
                for name, mine in expected.items():
                    mine.copy_(tensors[name].to(device=mine.device, dtype=mine.dtype))
        return problems

    def extra_bytes(self, index: ModelIndex, group: TieGroup) -> int:
        """Bytes the group stores outside ``model.parameters()`` (e.g. a codebook's index buffer)."""
        return 0


_REGISTRY: dict[str, Kind] = {}
_LOADED = False


def register_kind(cls: type[Kind]) -> type[Kind]:
    """Class decorator: register a sharing kind under ``cls.name``.

    A new kind is one module in ``paramshare/kinds/`` holding a :class:`Kind` subclass with
    this decorator (those modules are imported on first use); a kind defined elsewhere is
    registered when its module is imported.

    Example:
        >>> import paramshare as ps
        >>> @ps.register_kind
        ... class Mirror(ps.Kind):
        ...     name = "mirror"          # what plans and checkpoints call it
        >>> "mirror" in ps.kind_names()
        True
        >>> from paramshare.plans import _REGISTRY; del _REGISTRY["mirror"]   # undo the example
    """
    if not cls.name or not isinstance(cls.name, str):
        raise TypeError(f"{cls.__name__} needs a 'name'")
    if cls.name in _REGISTRY and type(_REGISTRY[cls.name]) is not cls:
        raise TypeError(f"sharing kind {cls.name!r} is already registered by {type(_REGISTRY[cls.name]).__name__}")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtin_kinds() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        importlib.import_module("paramshare.kinds")


def get_kind(name: str) -> Kind:
    """The registered kind called ``name``; a SharingError when this version has none.

    Example:
        >>> import paramshare as ps
        >>> type(ps.get_kind("transpose")).__name__
        'Transpose'
        >>> ps.get_kind("mirrored")
        Traceback (most recent call last):
        ...
        paramshare.errors.SharingError: unknown sharing kind 'mirrored'; this version of paramshare knows ...
    """
    _load_builtin_kinds()
    kind = _REGISTRY.get(name)
    if kind is None:
        raise SharingError(
            f"unknown sharing kind {name!r}; this version of paramshare knows {', '.join(kind_names())} "
            "(a plan from a newer paramshare needs that version)"
        )
    return kind


def kind_names() -> list[str]:
    """Names of the registered kinds, in installation order.

    Example:
        >>> import paramshare as ps
        >>> ps.kind_names()[:2]
        ['alias', 'transpose']
    """
    _load_builtin_kinds()
    return [k.name for k in sorted(_REGISTRY.values(), key=lambda k: (k.priority, k.name))]
