"""Low-level mechanics: pointing a module attribute at a stored tensor.

Every kind installs itself through these few functions, so the rules live in one place:

* a plain use is an entry of ``module._parameters`` (an alias is the same ``nn.Parameter``
  object registered in several modules);
* a derived use (transpose, and the learned kinds) is a ``torch.nn.utils.parametrize``
  parametrization whose first module computes the used tensor. Its ``original`` is the
  stored tensor itself (for transpose: the source ``nn.Parameter`` object), so
  ``named_parameters()`` lists each stored tensor once and the optimizer steps it once.

PyTorch refuses to pickle parametrized modules; :func:`make_picklable` gives the injected
class a ``__reduce_ex__`` that rebuilds it, so ``pickle``/``torch.save(model)`` keep derived
ties (``copy.deepcopy`` already works).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = [
    "Transposed",
    "is_derived",
    "parametrization_of",
    "set_plain",
    "set_derived",
    "remove_derived",
    "make_picklable",
    "attr_order",
]


def _remember_order(module: nn.Module) -> None:
    """Record the module's parameter order before a parametrization takes an entry out."""
    if "_paramshare_order" not in module.__dict__:
        module.__dict__["_paramshare_order"] = tuple(module._parameters.keys())


def attr_order(module: nn.Module) -> list[str]:
    """The module's parameter names, plain and parametrized, in their original order.

    A parametrization removes its entry from ``_parameters``; the order recorded before that
    keeps ``find_ties`` and plans identical between a model that was re-tied several times
    and a fresh one given the same plan.
    """
    names = list(module._parameters)
    if is_parametrized(module):
        names += [a for a in module.parametrizations.keys() if a not in names]
    recorded = module.__dict__.get("_paramshare_order", ())
    if not recorded:
        return names
    rank = {n: i for i, n in enumerate(recorded)}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


class Transposed(nn.Module):
    """Parametrization that reads its stored tensor with the first two dimensions swapped.

    ``dec.weight`` becomes ``source.transpose(0, 1)``: a view, no copy; gradients flow into
    the source. Assigning ``dec.weight = value`` writes ``value`` transposed into the source.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).contiguous()


def is_parametrized(module: nn.Module, attr: str | None = None) -> bool:
    """``torch.nn.utils.parametrize.is_parametrized``, without its slow attribute lookup.

    torch's version calls ``getattr(module, "parametrizations", None)``, which for the many
    modules that have none goes through ``nn.Module.__getattr__`` and an AttributeError; the
    model index asks this of every module and attribute, so it looks in ``_modules`` directly.
    """
    plists = module.__dict__.get("parametrizations")
    if plists is None:
        plists = module._modules.get("parametrizations")
    if plists is None or not isinstance(plists, nn.ModuleDict):
        return False
    return len(plists) > 0 if attr is None else attr in plists


def parametrization_of(module: nn.Module, attr: str) -> nn.Module | None:
    """The ``ParametrizationList`` of ``module.attr``, or None when it is a plain tensor."""
    if is_parametrized(module, attr):
        return module.parametrizations[attr]
    return None


def is_derived(module: nn.Module, attr: str, cls: type) -> bool:
    """Whether ``module.attr`` is computed by exactly one parametrization of type ``cls``."""
    plist = parametrization_of(module, attr)
    return plist is not None and len(plist) == 1 and isinstance(plist[0], cls)


def remove_derived(module: nn.Module, attr: str) -> None:
    """Drop the parametrization of ``module.attr`` without touching its stored tensors.

    ``remove_parametrizations(leave_parametrized=True)`` would write into the original with
    ``set_``, which for a shared original corrupts every other use; this never writes.
    Afterwards ``module.attr`` is absent from ``_parameters`` until the caller sets it.
    """
    if not is_parametrized(module, attr):
        return
    own_class(module)
    delattr(module.__class__, attr)
    del module.parametrizations[attr]
    if not is_parametrized(module):
        delattr(module, "parametrizations")
        module.__class__ = module.__class__.__bases__[0]


def own_class(module: nn.Module) -> None:
    """Give a parametrized module a class of its own before its class attributes change.

    ``copy.deepcopy`` (and ``torch.nn.utils.parametrize`` itself) leave copies of a
    parametrized module sharing one injected class, which holds the properties of the
    parametrized attributes; adding or removing one on a copy would change every copy.
    """
    cls = module.__class__
    owner = cls.__dict__.get("_paramshare_owner")
    if not is_parametrized(module) or (owner is not None and owner() is module):
        return
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    namespace["_paramshare_owner"] = weakref.ref(module)
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def set_plain(module: nn.Module, attr: str, param: nn.Parameter) -> None:
    """Make ``module.attr`` the very ``param`` object (an alias when registered elsewhere too)."""
    remove_derived(module, attr)
    module._buffers.pop(attr, None)
    module._parameters[attr] = param
    if "_paramshare_order" in module.__dict__:
        order = attr_order(module)
        items = dict(module._parameters)
        module._parameters.clear()
        module._parameters.update((n, items[n]) for n in order if n in items)


def set_derived(module: nn.Module, attr: str, parametrization: nn.Module, original: torch.Tensor | None) -> None:
    """Make ``module.attr`` computed by ``parametrization`` from ``original``.

    ``original`` is registered as the ``ParametrizationList``'s ``original`` (the same object,
    never a copy). When it is None the parametrization holds its own stored tensors and
    ``original`` is an empty placeholder.
    """
    _remember_order(module)
    remove_derived(module, attr)
    # A placeholder on the meta device: registering never writes into a tensor that other
    # modules may share (register_parametrization calls ``set_`` on what it replaces).
    placeholder = nn.Parameter(torch.empty(0, device="meta"), requires_grad=False)
    module._buffers.pop(attr, None)
    module._parameters[attr] = placeholder
    own_class(module)  # registering adds a property to the class, which copies may share
    parametrize.register_parametrization(module, attr, _Placeholder(), unsafe=True)
    plist = module.parametrizations[attr]
    plist[0] = parametrization
    if original is None:
        original = torch.empty(0, device=_device_of(parametrization))
        plist._parameters.pop("original", None)
        plist.register_buffer("original", original)
    elif isinstance(original, nn.Parameter):
        plist._buffers.pop("original", None)
        plist._parameters["original"] = original
    else:
        plist._parameters.pop("original", None)
        plist.register_buffer("original", original)
    make_picklable(module)


class _Placeholder(nn.Module):
    """Stands in while a parametrization is registered; replaced at once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - never called
        return x


def _device_of(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _reduce_ex(self, protocol):
    base = parametrize.type_before_parametrizations(self)
    names = tuple(self.parametrizations.keys())
    state = dict(self.__dict__)
    return (_rebuild_parametrized, (base, names), state)


def _rebuild_parametrized(base: type, names: tuple[str, ...]) -> nn.Module:
    module = base.__new__(base)
    parametrize._inject_new_class(module)
    for name in names:
        parametrize._inject_property(module, name)
    module.__class__.__reduce_ex__ = _reduce_ex
    return module


def make_picklable(module: nn.Module) -> None:
    """Let ``pickle`` (and ``torch.save(model)``) handle a module parametrized by paramshare."""
    if is_parametrized(module):
        module.__class__.__reduce_ex__ = _reduce_ex
