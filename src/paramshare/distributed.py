"""Training shared models with ``torch.distributed``: FSDP2 units that keep ties whole, and tie checks.

Sharing and data-parallel training meet in three places:

* **FSDP2** (``torch.distributed.fsdp.fully_shard``) shards each unit's parameters separately, so
  every tensor that several modules use (an alias, a transposed read, a codebook's centroids...)
  must sit in one unit. Size- or type-based wrapping splits tied embeddings and shared layers,
  and PyTorch rejects the model at its first forward ("Parameter ... is shared with a parameter
  already managed by another FSDP group"). :func:`fsdp_groups` computes units that keep every
  tie group whole and :func:`shard` applies them.
* **DDP** needs nothing from paramshare for hard ties: it all-reduces each stored parameter once.
  A module used several times per step (a Siamese encoder, an ALBERT layer) works as is; with
  activation checkpointing use ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``
  (reentrant checkpointing re-runs the module inside backward and DDP then sees a parameter
  become ready twice), or construct DDP with ``static_graph=True``.
* **Every rank must hold the same ties and values.** :func:`check_ties` is a collective that
  compares them across ranks.

``torch.distributed.fsdp`` costs about a second to import, so this module imports it only
inside :func:`shard`; ``import paramshare`` stays fast.

Launch a script that uses these with ``torchrun --nproc_per_node=2 script.py``
(see ``examples/train_fsdp.py``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._index import ModelIndex
from .errors import SharingError, did_you_mean
from .plans import get_kind
from .tying import _find

__all__ = [
    "fsdp_groups",
    "shard",
    "check_ties",
    "is_sharded",
    "gathered",
    "save",
    "load",
    "load_full_state_dict",
]


# ---- which modules form an FSDP unit -------------------------------------------------------
def _is_internal(name: str) -> bool:
    """Whether a module path lies inside a ``torch.nn.utils.parametrize`` container."""
    parts = name.split(".")
    return "parametrizations" in parts


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    """The parameterised children of the model's largest ``nn.ModuleList`` (most children)."""
    from torch.nn.utils.parametrize import ParametrizationList

    best: tuple[int, int, int] | None = None
    best_list: nn.ModuleList | None = None
    for pos, (name, m) in enumerate(model.named_modules()):
        if not isinstance(m, nn.ModuleList) or isinstance(m, ParametrizationList) or _is_internal(name):
            continue
        children = [c for c in m.children() if _has_params(c)]
        if not children:
            continue
        key = (len(children), sum(p.numel() for p in m.parameters()), -pos)
        if best is None or key > best:
            best, best_list = key, m
    if best_list is None:
        return []
    return [c for c in best_list.children() if _has_params(c)]


def _resolve_blocks(model: nn.Module, blocks) -> list[nn.Module]:
    """Block modules from ``blocks`` (None, a module type, a name, or a list of them)."""
    if blocks is None:
        return _default_blocks(model)
    if isinstance(blocks, (str, type)):
        blocks = [blocks]
    if not isinstance(blocks, Iterable):
        raise SharingError(
            f"blocks must be module types or module names (or a list of them), got {type(blocks).__name__}"
        )
    blocks = list(blocks)
    named = [(n, m) for n, m in model.named_modules() if not _is_internal(n)]
    by_name = dict(named)
    found: list[nn.Module] = []
    for b in blocks:
        if isinstance(b, str):
            if b == "":
                raise SharingError(
                    "blocks cannot name the root module ''; the root is always the last FSDP unit"
                )
            m = by_name.get(b)
            if m is None:
                raise SharingError(
                    f"blocks names a module that does not exist: {b!r}"
                    + did_you_mean(b, [n for n, _ in named if n], "module")
                )
            found.append(m)
        elif isinstance(b, type) and issubclass(b, nn.Module):
            ms = [m for n, m in named if n and isinstance(m, b)]
            if not ms:
                types = sorted({type(m).__name__ for n, m in named if n})
                raise SharingError(
                    f"blocks names the module type {b.__name__}, but the model has no module of that type; "
                    f"its module types are {', '.join(types)}"
                )
            found += [m for m in ms if _has_params(m)]
        else:
            raise SharingError(f"blocks entries must be module types or module names, got {b!r} ({type(b).__name__})")
    seen: set[int] = set()
    out = []
    for m in found:
        if id(m) not in seen and m is not model:
            seen.add(id(m))
            out.append(m)
    return out


class _Tree:
    """Module objects of a model with their first names, model order and containment."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.name: dict[int, str] = {}
        self.pre: dict[int, int] = {}
        for i, (n, m) in enumerate(model.named_modules()):
            self.name.setdefault(id(m), n)
            self.pre.setdefault(id(m), i)
        self.post: dict[int, int] = {}
        self._desc: dict[int, set[int]] = {}
        counter = [0]
        visited: set[int] = set()

        def walk(m: nn.Module):
            visited.add(id(m))
            for c in m.children():
                if id(c) not in visited:
                    walk(c)
            self.post[id(m)] = counter[0]
            counter[0] += 1

        walk(model)

    def descendants(self, m: nn.Module) -> set[int]:
        """ids of the modules strictly below ``m`` (through any path)."""
        got = self._desc.get(id(m))
        if got is None:
            got = set()
            stack = list(m.children())
            while stack:
                c = stack.pop()
                if id(c) in got:
                    continue
                got.add(id(c))
                stack.extend(c.children())
            self._desc[id(m)] = got
        return got


def _normalise(tree: _Tree, mods: Iterable[nn.Module]) -> tuple[nn.Module, ...]:
    """Drop modules that lie below another module of the same unit; keep model order."""
    mods = list({id(m): m for m in mods}.values())
    keep = [m for m in mods if not any(m is not o and id(m) in tree.descendants(o) for o in mods)]
    return tuple(sorted(keep, key=lambda m: tree.pre[id(m)]))


def _order(tree: _Tree, units: list[tuple[nn.Module, ...]]):
    """Units ordered so that no unit comes after one containing it; or a cycle to merge."""
    n = len(units)
    below = [set().union(*(tree.descendants(m) for m in u)) for u in units]
    ids = [{id(m) for m in u} for u in units]
    # before[j] = units that must be applied before unit j (those inside it)
    before = [{i for i in range(n) if i != j and ids[i] & below[j]} for j in range(n)]
    key = [min(tree.post[id(m)] for m in u) for u in units]
    done: list[int] = []
    left = set(range(n))
    while left:
        ready = [j for j in left if not (before[j] & left)]
        if not ready:
            # a cycle: follow "must come before" links from any unit until one repeats
            j = min(left)
            path: list[int] = []
            while j not in path:
                path.append(j)
                j = min(before[j] & left)
            return None, path[path.index(j):]
        j = min(ready, key=lambda i: key[i])
        done.append(j)
        left.remove(j)
    return [units[j] for j in done], None


def _simulate(tree: _Tree, units: list[tuple[nn.Module, ...]]) -> dict[int, set[int]]:
    """Which units manage each module (indices into ``units``; ``len(units)`` is the root).

    Mirrors ``fully_shard``: a unit manages the modules reachable from its own without
    entering another unit's modules; the root manages the rest. A module reachable along
    two paths (one object registered twice) can be managed by two units, which FSDP rejects
    when it holds parameters.
    """
    unit_of = {id(m): i for i, u in enumerate(units) for m in u}
    manager: dict[int, set[int]] = {}
    for i, u in enumerate([*units, (tree.model,)]):
        visited: set[int] = set()
        stack = list(reversed(u))
        while stack:
            m = stack.pop()
            if id(m) in visited:
                continue
            if id(m) in unit_of and unit_of[id(m)] != i:
                continue
            visited.add(id(m))
            manager.setdefault(id(m), set()).add(i)
            stack.extend(reversed(list(m.children())))
    return manager


def _constraints(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """Sets of modules that must share one FSDP unit, each with the reason.

    A stored tensor registered in several modules (an alias, a transposed read, any tensor a
    parametrization shares), and every tie group of every kind (its members' modules and the
    modules holding the tensors it owns).
    """
    out: list[tuple[str, list[nn.Module]]] = []
    holders: dict[int, list[nn.Module]] = {}
    names: dict[int, str] = {}
    params: set[int] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is None:
                continue
            holders.setdefault(id(t), []).append(m)
            names.setdefault(id(t), f"{mname}.{attr}" if mname else attr)
            if attr in m._parameters:
                params.add(id(t))
    # FSDP2 shards parameters; a buffer shared by several blocks (a rotary cache, say) is no
    # reason to merge them unless a tie group owns it (below)
    for key, mods in holders.items():
        if key in params and len({id(m) for m in mods}) > 1:
            out.append((f"tensor {names[key]!r}", mods))
    index = ModelIndex(model)
    for group in _find(index):
        mods = [index.uses[mem].module for mem in group.members if mem in index.uses]
        try:
            owned = get_kind(group.kind).owned(index, group)
        except Exception:  # a kind that cannot list its tensors on this model: members suffice
            owned = []
        for t in owned:
            if t is not None:
                mods += holders.get(id(t), [])
        if len({id(m) for m in mods}) > 1:
            out.append((f"{group.kind} group of {group.source!r}", mods))
    return out


def _plan_units(model: nn.Module, blocks) -> tuple[_Tree, list[tuple[nn.Module, ...]]]:
    tree = _Tree(model)
    units = [_normalise(tree, [b]) for b in _resolve_blocks(model, blocks)]
    units = [u for u in units if u]
    constraints = _constraints(model)
    while True:
        ordered, cycle = _order(tree, units)
        if cycle is not None:
            merged = _normalise(tree, [m for i in cycle for m in units[i]])
            units = [u for i, u in enumerate(units) if i not in cycle] + [merged]
            continue
        units = ordered
        manager = _simulate(tree, units)
        root = len(units)
        change = None
        for _, mods in constraints:
            owners = sorted(set().union(*(manager.get(id(m), set()) for m in mods)))
            if len(owners) > 1:
                change = owners
                break
        if change is None:
            for m in tree.model.modules():
                owners = manager.get(id(m), set())
                if len(owners) > 1 and m._parameters:
                    change = sorted(owners)
                    break
        if change is None:
            return tree, units
        if root in change:
            units = [u for i, u in enumerate(units) if i not in change]
        else:
            merged = _normalise(tree, [m for i in change for m in units[i]])
            units = [u for i, u in enumerate(units) if i not in change] + [merged]


def fsdp_groups(model: nn.Module, blocks=None) -> list[list[str]]:
    """The module names to pass to each ``fully_shard`` call so that no tie is split.

    One group per block, merged wherever a tie group spans blocks, so that every tie group
    (of any kind) and every tensor registered in several modules lives in exactly one FSDP
    unit; innermost first, the root (named ``""``) last, alone.

    The rules, applied until nothing changes:

    1. Blocks: ``blocks`` as given (module types: every module of that type; names: those
       modules), else the children of the model's largest ``nn.ModuleList`` (the one with most
       children). Blocks without parameters are skipped; a block inside another block is a
       unit of its own (applied first).
    2. Each unit manages the modules reachable from it without entering another unit, the
       root everything else, as ``fully_shard`` does.
    3. Where a tie spans units, they merge into one unit (``fully_shard([a, b])``); a module
       that contains another of its unit absorbs it; a tie that reaches the root folds those
       blocks into the root.

    Deterministic: groups are ordered by model order, children before parents, and the names
    in a group follow model order. The model is not changed.

    Args:
        model: the model to shard (plain, not yet sharded).
        blocks: ``None``, a module type, a module name, or a list of types and names.

    Returns:
        A list of groups, each a list of dotted module names; the last is ``[""]``.

    Raises:
        SharingError: ``blocks`` names a module or type the model does not have, or the root.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embed = nn.Embedding(10, 4)
        ...         self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        ...         self.head = nn.Linear(4, 10)
        >>> net = Net()
        >>> ps.distributed.fsdp_groups(net)
        [['layers.0'], ['layers.1'], ['layers.2'], ['layers.3'], ['']]
        >>> _ = ps.share_layers(net.layers, unique=2)  # layers 0 and 2, 1 and 3 share
        >>> ps.distributed.fsdp_groups(net)
        [['layers.0', 'layers.2'], ['layers.1', 'layers.3'], ['']]
    """
    if not isinstance(model, nn.Module):
        raise SharingError(f"fsdp_groups needs an nn.Module, got {type(model).__name__}")
    tree, units = _plan_units(model, blocks)
    return [[tree.name[id(m)] for m in u] for u in units] + [[""]]


# ---- process group helpers -----------------------------------------------------------------
def _require_process_group(what: str):
    import torch.distributed as dist

    if not dist.is_available():
        raise SharingError(f"{what} needs torch.distributed, which this PyTorch build does not include")
    if not dist.is_initialized():
        raise SharingError(
            f"{what} needs an initialised process group: call torch.distributed.init_process_group(...) "
            "on every rank first (torchrun --nproc_per_node=N script.py sets up the environment)"
        )
    return dist


def _dtensor_cls():
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to the model or any of its modules.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> ps.distributed.is_sharded(nn.Linear(2, 2))
        False
    """
    if "torch.distributed.fsdp" not in sys.modules:
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _default_mesh(dist):
    from torch.distributed.device_mesh import init_device_mesh

    backend = str(dist.get_backend())
    device = "cuda" if "nccl" in backend and torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (dist.get_world_size(),))


def shard(model: nn.Module, mesh=None, blocks=None, **fully_shard_kwargs: Any) -> nn.Module:
    """Apply FSDP2 (``fully_shard``) to a tied model, one call per group of :func:`fsdp_groups`.

    Multi-module groups are sharded together (``fully_shard([a, b])``), the root last. Ties
    survive: tied tensors are sharded once and every use reads the same unsharded tensor in
    forward. Parameters stored non-contiguously are made contiguous first (the same objects
    and values), as FSDP2 requires.

    Tie the model (or ``ps.apply_plan`` it) *before* sharding: sharding fixes which tensors
    are shared, and ``ps.apply_plan`` on a sharded model is not supported. A model built on the
    meta device can be sharded first and materialised afterwards with
    ``model.to_empty(device=...)``: the ties survive that (``ps.check`` says so), whereas
    ``to_empty`` on an unsharded model unties aliases (re-tie with ``ps.apply_plan``, then shard).

    Args:
        model: the model, tied, on the meta device or on the mesh's device (changed in place).
        mesh: a 1-D ``DeviceMesh`` over all ranks (2-D for HSDP); default: a 1-D mesh over
            the world, on CPU for gloo and CUDA for NCCL.
        blocks: which modules form units, as for :func:`fsdp_groups`.
        **fully_shard_kwargs: passed to every ``fully_shard`` call (``reshard_after_forward``,
            ``mp_policy``, ``offload_policy``, ...).

    Returns:
        ``model`` (now an ``FSDPModule``).

    Raises:
        SharingError: no initialised process group, a mesh that does not cover the world,
            unknown keyword arguments, bad ``blocks``, a model that is already sharded. The model
            is unchanged.

    Example (run on every rank, e.g. under ``torchrun --nproc_per_node=2``):
        >>> import torch.distributed as dist, paramshare as ps  # doctest: +SKIP
        >>> dist.init_process_group("gloo")  # doctest: +SKIP
        >>> model = ps.distributed.shard(ps.tie(build(), "embed.weight", "head.weight"))  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise SharingError(f"shard needs an nn.Module, got {type(model).__name__}")
    dist = _require_process_group("ps.distributed.shard")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    allowed = [p for p in inspect.signature(fully_shard).parameters if p not in ("module", "mesh")]
    unknown = sorted(set(fully_shard_kwargs) - set(allowed))
    if unknown:
        raise SharingError(
            f"unknown fully_shard arguments {unknown}; fully_shard accepts {', '.join(allowed)}"
        )
    if is_sharded(model):
        raise SharingError(
            "the model is already sharded (fully_shard was applied to it or to one of its modules); "
            "build a fresh model and call ps.distributed.shard once"
        )
    world = dist.get_world_size()
    if mesh is None:
        groups = fsdp_groups(model, blocks)
        mesh = _default_mesh(dist)
    else:
        if not isinstance(mesh, DeviceMesh):
            raise SharingError(f"mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
        if mesh.ndim not in (1, 2):
            raise SharingError(f"mesh must be 1-D (FSDP) or 2-D (HSDP), got {mesh.ndim}-D with shape {tuple(mesh.shape)}")
        if mesh.size() != world:
            raise SharingError(
                f"the mesh covers {mesh.size()} ranks (shape {tuple(mesh.shape)}) but the world has {world}; "
                f"pass a mesh over all ranks, e.g. init_device_mesh({mesh.device_type!r}, ({world},)), or mesh=None"
            )
        groups = fsdp_groups(model, blocks)
    ignored = {id(p) for p in (fully_shard_kwargs.get("ignored_params") or ())}
    scalars = [n for n, p in model.named_parameters() if p.dim() == 0 and id(p) not in ignored]
    if scalars:
        raise SharingError(
            f"FSDP2 cannot shard 0-dimensional parameters: {', '.join(map(repr, scalars[:6]))}; "
            "make them 1-D (shape (1,)) or pass them in ignored_params"
        )
    # FSDP2 shards contiguous parameters only; a kind may store a strided view (a fitted bank
    # of templates, say). Same objects, same values, contiguous memory: every tie holds.
    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    for names in groups:
        mods = [model.get_submodule(n) for n in names]
        fully_shard(mods if len(mods) > 1 else mods[0], mesh=mesh, **fully_shard_kwargs)
    return model


# ---- ties and values across ranks ----------------------------------------------------------
def _unwrap(model: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def _digest(t: torch.Tensor) -> str:
    # a copy: exporting a tensor's own storage to numpy makes it non-resizable, and FSDP2
    # resizes the storage of unsharded parameters when it reshards
    data = t.detach().to("cpu", copy=True).contiguous().reshape(-1)
    return hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()


def _local_summary(model: nn.Module) -> dict:
    """What this rank holds: its tie groups, and a digest of every stored tensor's local values."""
    DTensor = _dtensor_cls()
    index = ModelIndex(model)
    groups = _find(index)
    # compared in full (shapes and options too: a codebook's labels, a hash seed), shown short
    plan_lines = {json.dumps(g.to_dict(), sort_keys=True): str(g) for g in groups}
    tensors: list[tuple[str, torch.Tensor]] = list(index.unique_params())
    seen = {id(t) for _, t in tensors}
    for g in groups:
        try:
            owned = get_kind(g.kind).owned(index, g)
        except Exception:
            owned = []
        for i, t in enumerate(owned):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append((f"{g.source} ({g.kind} tensor {i})", t))
    values: dict[str, tuple] = {}
    local_problems: list[str] = []
    for name, t in tensors:
        key: tuple = ()
        local = t
        if DTensor is not None and isinstance(t, DTensor):
            coord = t.device_mesh.get_coordinate()
            if coord is None:
                continue
            # ranks with the same coordinate on every sharded mesh dimension hold the same data
            key = tuple(c if p.is_shard() else None for c, p in zip(coord, t.placements))
            local = t.to_local()
        if local.device.type == "meta":
            local_problems.append(
                f"{name!r} is on the meta device and has no values; materialise the model "
                "(model.to_empty(device=...)) and load or initialise its weights first"
            )
            continue
        values[name] = (key, tuple(t.shape), str(t.dtype), _digest(local))
    return {"plan": plan_lines, "values": values, "problems": local_problems}


def _short(group_json: str, limit: int = 160) -> str:
    d = json.loads(group_json)
    text = json.dumps({k: d[k] for k in ("shape", "options") if k in d}, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_ties(model: nn.Module, max_names: int = 8) -> list[str]:
    """Collective: whether every rank holds the same ties and the same stored values.

    Every rank must call it (it gathers a small summary from each). It compares each rank
    with rank 0: the tie groups (every kind), and a digest of each stored tensor (parameters
    and the tensors sharing kinds keep), bit for bit. Under FSDP2 each rank holds a shard, so
    values are compared only among ranks that hold the same shard (replicas under HSDP).
    A DDP-wrapped model is unwrapped. Buffers outside sharing (e.g. BatchNorm statistics) are
    not compared.

    Args:
        model: the model on this rank (plain, DDP-wrapped or FSDP2-sharded).
        max_names: at most this many tensor names are listed per rank.

    Returns:
        The problems, the same list on every rank (``[]`` when all ranks agree).

    Raises:
        SharingError: no initialised process group.

    Example (on every rank):
        >>> problems = ps.distributed.check_ties(ddp_model)  # doctest: +SKIP
        >>> assert problems == [], "\\n".join(problems)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise SharingError(f"check_ties needs an nn.Module, got {type(model).__name__}")
    dist = _require_process_group("ps.distributed.check_ties")
    mine = _local_summary(_unwrap(model))
    world = dist.get_world_size()
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    problems: list[str] = []
    for r, s in enumerate(everyone):
        problems += [f"rank {r}: {p}" for p in s["problems"]]
    ref_plan = everyone[0]["plan"]
    for r in range(1, world):
        mine_plan = everyone[r]["plan"]
        if set(mine_plan) != set(ref_plan):
            gone = {ref_plan[k]: k for k in set(ref_plan) - set(mine_plan)}
            new = {mine_plan[k]: k for k in set(mine_plan) - set(ref_plan)}
            both = sorted(set(gone) & set(new))  # same members, other shape or options
            only0 = sorted(set(gone) - set(new))
            only_r = sorted(set(new) - set(gone))
            msg = f"rank {r}'s ties differ from rank 0's"
            for shown in both:
                msg += (
                    f"; {shown} has another shape or options on rank {r}: "
                    f"{_short(new[shown])} (rank 0: {_short(gone[shown])})"
                )
            if only0:
                msg += f"; only rank 0 has: {'; '.join(only0)}"
            if only_r:
                msg += f"; only rank {r} has: {'; '.join(only_r)}"
            problems.append(msg + "; build and tie the model the same way on every rank (or ps.apply_plan the same plan)")
    # values: compare each tensor among the ranks that hold the same data
    by_key: dict[tuple, dict[int, tuple]] = {}
    for r, s in enumerate(everyone):
        for name, (key, shape, dtype, digest) in s["values"].items():
            by_key.setdefault((name, key), {})[r] = (shape, dtype, digest)
    differing: dict[int, list[tuple[str, int]]] = {}
    for (name, _), per_rank in by_key.items():
        ranks = sorted(per_rank)
        first = per_rank[ranks[0]]
        for r in ranks[1:]:
            if per_rank[r] != first:
                differing.setdefault(r, []).append((name, ranks[0]))
    for r in sorted(differing):
        items = differing[r]
        base = sorted({b for _, b in items})
        shown = ", ".join(repr(n) for n, _ in items[:max_names])
        more = f", ... ({len(items)} in all)" if len(items) > max_names else ""
        problems.append(
            f"rank {r}'s values differ from rank {base[0]}'s in {shown}{more}; ranks drift apart when they start "
            "from different weights or step different gradients (wrap the model in DDP or shard it, and load "
            "checkpoints on every rank)"
        )
    return problems


# ---- state of a sharded model ---------------------------------------------------------------
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
    """Collective: load a full state dict into an FSDP2-sharded model; every rank keeps its shard.

    Every rank must pass the full state dict (e.g. ``state_dict()`` of the same model built
    unsharded, as after meta-device init and ``to_empty``). Tied entries may appear under each
    of their names, as ``state_dict()`` lists them. A model that is not sharded loads it with
    ``load_state_dict``.

    Args:
        model: the sharded (or plain, or DDP-wrapped) model.
        state: the full state dict: names as ``model.state_dict()`` has them, full shapes.
        strict: as for ``load_state_dict``.

    Returns:
        ``model``.

    Raises:
        SharingError: a sharded model without an initialised process group.
        RuntimeError: missing, unexpected or mis-shaped entries (from PyTorch).

    Example (on every rank):
        >>> ps.distributed.load_full_state_dict(sharded, torch.load("full.pt", weights_only=True))  # doctest: +SKIP
    """
    model = _unwrap(model)
    if not is_sharded(model):
        model.load_state_dict(state, strict=strict)
        return model
    _require_process_group("ps.distributed.load_full_state_dict")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    return model


# ---- checkpoints of sharded models ---------------------------------------------------------
_GATHERED: set[int] = set()  # ids of models inside :func:`gathered` on this process


def gathers(model: nn.Module) -> bool:
    """Whether ``ps.save``/``ps.load`` hand ``model`` to :func:`save`/:func:`load` of this module.

    True for an FSDP2-sharded model, except inside :class:`gathered` (where its tensors are
    whole already). ``paramshare.checkpoint`` asks this first thing; it costs nothing while
    ``torch.distributed.fsdp`` has not been imported.

    Args:
        model: any module.

    Returns:
        bool.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> ps.distributed.gathers(nn.Linear(2, 2))
        False
    """
    return is_sharded(model) and id(model) not in _GATHERED


class gathered:
    """Collective context manager: every FSDP2 unit of the model unsharded, resharded on exit.

    Inside it the model's parameters are plain copies of the full tensors (ties intact: every
    use reads the same copy), so anything that reads a model works on it (``ps.save``,
    ``ps.report``, a forward pass). Writes to them are not kept: FSDP2 keeps its shards. Every
    rank must enter it, and holds the whole model twice while inside.

    Raises:
        SharingError: the model is not sharded at its root, or no process group.

    Example (on every rank):
        >>> with ps.distributed.gathered(sharded):  # doctest: +SKIP
        ...     print(ps.report(sharded))
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.fsdp import FSDPModule

        model = _unwrap(model)
        _require_process_group("ps.distributed.gathered")
        if not isinstance(model, FSDPModule):
            raise SharingError(
                f"the model's root ({type(model).__name__}) is not sharded; shard it with ps.distributed.shard(model)"
            )
        self.model = model
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self) -> nn.Module:
        # the root's lazy initialisation (normally done by the first forward) must come first
        self.model._get_fsdp_state()._lazy_init()
        for m in self.units:
            m.unshard()
        # FSDP2 reshards a unit whenever state_dict()/load_state_dict() runs on one of its
        # modules (a pre-hook); inside this context the full tensors must stay, so those hooks
        # are set aside until exit
        self._hidden = []
        for m in self.units:
            for group in m._get_fsdp_state()._fsdp_param_groups:
                for handles in (
                    getattr(group, "_module_to_pre_save_state_dict_hook_handle", {}),
                    getattr(group, "_module_to_pre_load_state_dict_hook_handle", {}),
                ):
                    for mod, handle in handles.items():
                        for hooks in (mod._state_dict_pre_hooks, mod._load_state_dict_pre_hooks):
                            if handle.id in hooks:
                                self._hidden.append((hooks, handle.id, hooks.pop(handle.id)))
        # the modules read copies of the full tensors (one copy per tensor, so ties hold):
        # FSDP2 frees the storage of its unsharded tensors on exit, which fails once anything
        # (a file writer, numpy) has exported that storage
        self._swapped = []
        copies: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for mod in self.model.modules():
                for key, p in list(mod._parameters.items()):
                    if p is None:
                        continue
                    if id(p) not in copies:
                        copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                    self._swapped.append((mod._parameters, key, p))
                    mod._parameters[key] = copies[id(p)]
        _GATHERED.add(id(self.model))
        return self.model

    def __exit__(self, *exc) -> bool:
        _GATHERED.discard(id(self.model))
        for params, key, p in reversed(self._swapped):
            params[key] = p
        for hooks, key, fn in self._hidden:
            hooks[key] = fn
        for m in self.units:
            m.reshard()
        return False


def _agree(dist, error: BaseException | None, what: str) -> None:
    """Raise on every rank if any rank failed (the failing rank re-raises its own error)."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(everyone) if e is not None]
    if failed:
        from .errors import CheckpointError

        r, e = failed[0]
        raise CheckpointError(f"{what} failed on rank {r}: {e}")


def save(model: nn.Module, path, metadata=None, compress: bool = False) -> None:
    """Collective ``ps.save``: rank 0 writes the full checkpoint, the other ranks wait.

    A sharded model is gathered first (every rank takes part); a DDP model is unwrapped.
    ``ps.save`` does the same for a sharded model on its own, so this is only needed to have
    rank 0 alone write a replicated (DDP or plain) model. The file is exactly what ``ps.save``
    writes for the same model unsharded: ties, plan and stored tensors, once each.

    Args:
        model, path, metadata, compress: as for :func:`paramshare.save`.

    Raises:
        CheckpointError: as ``ps.save``, on every rank when any rank fails.
        SharingError: no initialised process group.

    Example (on every rank):
        >>> ps.distributed.save(ddp_model, "model.safetensors")  # doctest: +SKIP
    """
    from .checkpoint import save as _save

    dist = _require_process_group("ps.distributed.save")
    model = _unwrap(model)
    error = None
    if is_sharded(model):
        with gathered(model):
            if dist.get_rank() == 0:
                try:
                    _save(model, path, metadata=metadata, compress=compress)
                except Exception as e:
                    error = e
    elif dist.get_rank() == 0:
        try:
            _save(model, path, metadata=metadata, compress=compress)
        except Exception as e:
            error = e
    _agree(dist, error, "saving")


def load(model: nn.Module, path, strict: bool = True):
    """Collective ``ps.load``: every rank reads the file and loads it into its model.

    A sharded model must already have the file's ties (tie it, or ``ps.apply_plan`` the file's
    plan, before sharding: sharding fixes which tensors are shared). It is gathered, the file is
    loaded into the full tensors with ``ps.load``, and every rank keeps its shard. A DDP model is
    unwrapped. ``ps.load`` does the same for a sharded model on its own.

    Args:
        model, path, strict: as for :func:`paramshare.load`.

    Returns:
        ``ps.load``'s ``LoadResult``.

    Raises:
        CheckpointError: as ``ps.load``; a sharded model whose ties differ from the file's.
            Raised on every rank when any rank fails; the model is then unchanged.
        SharingError: no initialised process group.

    Example (on every rank):
        >>> ps.distributed.load(sharded, "model.safetensors")  # doctest: +SKIP
    """
    from .checkpoint import _parse, load as _load
    from .errors import CheckpointError
    from .tying import check

    dist = _require_process_group("ps.distributed.load")
    model = _unwrap(model)
    if not is_sharded(model):
        error = result = None
        try:
            result = _load(model, path, strict=strict)
        except Exception as e:
            error = e
        _agree(dist, error, "loading")
        return result
    error = result = state = None
    plan = None
    try:
        plan = _parse(path).plan  # the header only: None for a file without a plan
    except Exception as e:
        error = e
    if plan is not None:
        problems = [p for p in check(model, plan) if not p.startswith("the model has a tie the plan does not")]
        if problems:
            error = CheckpointError(
                f"cannot load {str(path)!r} into the sharded model: its ties differ from the file's:\n  - "
                + "\n  - ".join(problems)
                + "\nsharding fixes which tensors are shared: build the model, ps.apply_plan(model, ps.read(path).plan), "
                "then ps.distributed.shard(model) and load"
            )
    _agree(dist, error, "loading")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with gathered(model):
        try:
            result = _load(model, path, strict=strict)
            state = {k: v.detach().clone() for k, v in _plain_state_dict(model).items()}
        except Exception as e:
            error = e
    _agree(dist, error, "loading")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))
    return result


def _plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict names -> the (unsharded) tensors, read straight from the modules."""
    out: dict[str, torch.Tensor] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        pre = mname + "." if mname else ""
        for k, p in m._parameters.items():
            if p is not None:
                out[pre + k] = p
        for k, b in m._buffers.items():
            if b is not None and k not in m._non_persistent_buffers_set:
                out[pre + k] = b
    return out
