"""Checks shared by the kinds whose uses point at a stored ``nn.Parameter``."""

from __future__ import annotations

import torch

from .._index import ModelIndex, Use, storage_key
from .._parametrize import Transposed
from ..errors import did_you_mean


def fmt_shape(shape) -> str:
    """``(3, 4)``; ``(3,)`` for one dimension, as Python prints tuples."""
    return str(tuple(int(s) for s in shape))


def view_key(t: torch.Tensor):
    """Equal for tensors that are the same view of the same storage."""
    return (storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def source_param(index: ModelIndex, name: str, kind: str, problems: list[str]):
    """The stored parameter called ``name`` or None, appending a problem when it is unusable."""
    use = index.uses.get(name)
    if use is not None and use.derived:
        problems.append(
            f"{kind} source {name!r} is computed by a parametrization "
            f"({type(use.plist[0]).__name__}); a source must be a plain parameter"
        )
        return None
    p = index.stored_param(name)
    if p is None:
        problems.append(f"{kind} source {name!r} does not exist in the model" + did_you_mean(name, index.uses, "parameter"))
    return p


def target_problems(index: ModelIndex, name: str, kind: str) -> tuple[Use | None, list[str]]:
    """The use called ``name`` and why it cannot be re-pointed (foreign parametrizations)."""
    use = index.uses.get(name)
    if use is None:
        return None, [f"{kind} member {name!r} does not exist in the model" + did_you_mean(name, index.uses, "parameter")]
    plist = use.plist
    if plist is not None and not (len(plist) == 1 and isinstance(plist[0], Transposed)):
        names = ", ".join(type(m).__name__ for m in plist)
        return use, [
            f"{name!r} is computed by other parametrizations ({names}); remove them first "
            f"(torch.nn.utils.parametrize.remove_parametrizations) or untie it with ps.untie"
        ]
    return use, []


def compat_problems(name: str, value: torch.Tensor, src_name: str, src: torch.Tensor, want_shape) -> list[str]:
    """Shape, dtype and device problems of pointing ``name`` at ``src``."""
    out = []
    if tuple(value.shape) != tuple(want_shape):
        out.append(
            f"{name!r} has shape {fmt_shape(value.shape)} but {src_name!r} gives {fmt_shape(want_shape)}"
        )
    if value.dtype != src.dtype:
        out.append(
            f"{name!r} is {value.dtype} but {src_name!r} is {src.dtype}; convert the model to one dtype first "
            f"(e.g. model.to({src.dtype}))"
        )
    if value.device != src.device:
        out.append(
            f"{name!r} is on {value.device} but {src_name!r} is on {src.device}; move the model to one device first"
        )
    return out


def plan_shape_problem(group, src: torch.Tensor) -> list[str]:
    if group.shape is not None and tuple(src.shape) != tuple(group.shape):
        return [f"{group.source!r} has shape {fmt_shape(src.shape)} but the plan says {fmt_shape(group.shape)}"]
    return []
