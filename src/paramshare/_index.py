"""A read-only index of a model: which parameters it uses and which tensors back them.

A *use* is a module attribute that a forward pass reads as a parameter, named by its dotted
path as in ``named_parameters`` (``"dec.weight"``), whether it is a plain ``nn.Parameter``
or computed by a parametrization. A *stored tensor* is an ``nn.Parameter`` (or a buffer that
a sharing kind keeps) that actually holds memory. Every kind, the report and the checkpoints
read the model through this index, so the rules for naming and deduplication live here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._parametrize import Transposed, attr_order, is_derived, is_parametrized, parametrization_of
from .errors import SharingError, did_you_mean

__all__ = ["Use", "ModelIndex", "storage_key", "storage_span"]


@dataclass
class Use:
    """One used parameter: ``module.attr`` reached at dotted path ``name``."""

    name: str
    module: nn.Module
    module_name: str
    attr: str

    @property
    def plist(self) -> nn.Module | None:
        """The ``ParametrizationList`` computing this use, or None for a plain parameter."""
        return parametrization_of(self.module, self.attr)

    @property
    def derived(self) -> bool:
        return self.plist is not None

    @property
    def param(self) -> nn.Parameter | None:
        """The plain ``nn.Parameter`` of this use (None when derived)."""
        p = self.module._parameters.get(self.attr)
        if p is None or is_parametrized(self.module, self.attr):
            return None
        return p

    def value(self) -> torch.Tensor:
        """The tensor the module uses (computed for derived uses)."""
        return getattr(self.module, self.attr)

    def backing(self) -> tuple[nn.Parameter | None, bool]:
        """(stored parameter, transposed) for plain and transposed uses; (None, False) otherwise."""
        plist = self.plist
        if plist is None:
            return self.module._parameters.get(self.attr), False
        if is_derived(self.module, self.attr, Transposed):
            return plist.original, True
        return None, False


def storage_key(t: torch.Tensor):
    """A key equal for tensors that share storage (works on meta tensors too)."""
    try:
        return (t.device.type, t.untyped_storage()._cdata)
    except Exception:  # tensor subclasses without storage (e.g. DTensor): identity only
        return ("id", id(t))


def storage_span(t: torch.Tensor) -> tuple[object, int, int]:
    """(storage key, first byte, end byte) of the bytes a tensor covers in its storage."""
    es = t.element_size()
    start = t.storage_offset() * es if t.numel() else 0
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    return storage_key(t), start, start + extent * es


def _walk(module: nn.Module, prefix: str = "", inside: bool = False):
    """(name, module, inside) for every registration path, as ``named_modules(remove_duplicate=False)``.

    ``inside`` is True within a parametrization's internals (``parametrizations.<attr>...``):
    their tensors are stored there but no forward pass reads them as module attributes.
    """
    yield prefix[:-1], module, inside
    skip = "parametrizations" if is_parametrized(module) else None
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, prefix + name + ".", inside or name == skip)


def _plain_state(module: nn.Module) -> bool:
    """Whether ``module.state_dict`` would hold exactly its parameters and persistent buffers."""
    cls = type(module)
    return (
        cls.state_dict is nn.Module.state_dict
        and cls._save_to_state_dict is nn.Module._save_to_state_dict
        and cls.get_extra_state is nn.Module.get_extra_state
        and not module._state_dict_hooks
        and not module._state_dict_pre_hooks
    )


def _plain_traversal(modules) -> bool:
    """Whether every module lists its children and parameters the way ``nn.Module`` does."""
    base_modules, base_params = nn.Module.named_modules, nn.Module.named_parameters
    return all(type(m).named_modules is base_modules and type(m).named_parameters is base_params for m in modules)


class ModelIndex:
    """Snapshot of a model's uses and stored tensors; rebuild it after changing the model."""

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise SharingError(f"expected an nn.Module, got {type(model).__name__}")
        self.model = model
        self.uses: dict[str, Use] = {}
        #: the uses computed by a parametrization when the index was built (what the derived
        #: kinds look through; usually a handful among many plain parameters)
        self.derived_uses: dict[str, Use] = {}
        self.modules: dict[str, nn.Module] = {}
        self.param_paths: dict[str, nn.Parameter] = {}
        walked = self._walked = []
        for mname, module, inside in _walk(model):
            dot = mname + "." if mname else ""
            walked.append((dot, module))
            for attr, p in module._parameters.items():
                if p is not None:
                    self.param_paths[dot + attr] = p
            if inside:
                continue
            self.modules.setdefault(mname, module)
            parametrized = is_parametrized(module)
            for attr in attr_order(module):
                if attr in module._parameters and module._parameters[attr] is None:
                    continue
                use = self.uses[dot + attr] = Use(dot + attr, module, mname, attr)
                if parametrized and is_parametrized(module, attr):
                    self.derived_uses[dot + attr] = use
        if not _plain_traversal(m for _, m in walked):  # a module with its own traversal: ask it
            self.param_paths = dict(model.named_parameters(remove_duplicate=False))
        self._positions: dict[str, int] | None = None
        self._canonical: dict[int, str] = {}
        for name, use in self.uses.items():
            p = use.param
            if p is not None:
                self._canonical.setdefault(id(p), name)
        for name, p in self.param_paths.items():
            self._canonical.setdefault(id(p), name)

    # ---- lookups -------------------------------------------------------------------------
    def use(self, name: str, what: str = "parameter") -> Use:
        """The use called ``name``; a SharingError with close names when there is none."""
        if not isinstance(name, str):
            raise SharingError(f"parameter names are strings, got {name!r} ({type(name).__name__})")
        u = self.uses.get(name)
        if u is not None:
            return u
        if name in self.param_paths:
            raise SharingError(
                f"{name!r} is the stored tensor of a parametrization, not a parameter the model uses; "
                f"name the used parameter instead" + did_you_mean(name, self.uses, "parameter")
            )
        bufs = dict(self.model.named_buffers())
        if name in bufs:
            raise SharingError(f"{name!r} is a buffer, not a parameter; only parameters can be tied")
        raise SharingError(f"unknown {what} {name!r}" + did_you_mean(name, self.uses, "parameter"))

    def module(self, name: str) -> nn.Module:
        """The submodule at dotted path ``name`` (``""`` is the model)."""
        if not isinstance(name, str):
            raise SharingError(f"module names are strings, got {name!r} ({type(name).__name__})")
        m = self.modules.get(name)
        if m is None:
            raise SharingError(f"unknown module {name!r}" + did_you_mean(name, [n for n in self.modules if n], "module"))
        return m

    def stored_param(self, name: str) -> nn.Parameter | None:
        """The stored parameter named ``name`` (a plain use or a raw ``named_parameters`` path)."""
        u = self.uses.get(name)
        if u is not None:
            return u.param
        return self.param_paths.get(name)

    def canonical(self, param: torch.Tensor) -> str:
        """The name a stored parameter goes by: its first plain use, else its first path."""
        return self._canonical.get(id(param), "?")

    def uses_in(self, module_name: str) -> dict[str, Use]:
        """Uses below a module, keyed by their name relative to it."""
        if module_name == "":
            return dict(self.uses)
        pre = module_name + "."
        return {n[len(pre):]: u for n, u in self.uses.items() if n.startswith(pre)}

    def position(self, name: str) -> int:
        """Order of a name among the uses (unknown names last), for deterministic sorting."""
        if self._positions is None:
            self._positions = {n: i for i, n in enumerate(self.uses)}
        return self._positions.get(name, len(self._positions))

    # ---- storage -------------------------------------------------------------------------
    def state_entries(self) -> dict[str, object]:
        """``model.state_dict(keep_vars=True)`` (names and the tensors themselves).

        Read from the walk when no module customises its state dict (hooks, extra state, its
        own ``state_dict``); otherwise torch's ``state_dict`` is asked.
        """
        if not all(_plain_state(m) for _, m in self._walked):
            return self.model.state_dict(keep_vars=True)
        out: dict[str, object] = {}
        for dot, m in self._walked:
            for name, p in m._parameters.items():
                if p is not None:
                    out[dot + name] = p
            skip = m._non_persistent_buffers_set
            for name, b in m._buffers.items():
                if b is not None and name not in skip:
                    out[dot + name] = b
        return out

    def unique_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every distinct stored parameter once, by canonical name, in model order."""
        seen: set[int] = set()
        out = []
        for name, p in self.param_paths.items():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out.append((self.canonical(p), p))
        return out

    def stored_bytes(self) -> tuple[int, int]:
        """(elements, bytes) of parameter storage, overlapping views counted once."""
        spans: dict[object, list[tuple[int, int, int]]] = {}
        for _, p in self.unique_params():
            key, a, b = storage_span(p)
            spans.setdefault(key, []).append((a, b, p.element_size()))
        numel = nbytes = 0
        for items in spans.values():
            items.sort()
            cur_a, cur_b, es = items[0]
            for a, b, e in items[1:]:
                if a < cur_b:
                    cur_b = max(cur_b, b)
                else:
                    nbytes += cur_b - cur_a
                    numel += (cur_b - cur_a) // es
                    cur_a, cur_b, es = a, b, e
            nbytes += cur_b - cur_a
            numel += (cur_b - cur_a) // es
        return numel, nbytes
