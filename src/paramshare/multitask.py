"""Hard sharing for multi-task learning: one trunk, one head per task (``ps.nn.MultiTask``)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .errors import SharingError, did_you_mean

__all__ = ["MultiTask"]


class MultiTask(nn.Module):
    """A shared trunk followed by one head per task: the trunk's parameters are stored once.

    The classic hard parameter sharing of multi-task learning: every task reads the same
    trunk, so what one task learns there the others use. Only the heads are per task.

    Args:
        trunk: the shared module (``x -> features``).
        heads: ``{task name: head module}`` (``features -> output``), at least one.

    Forward:
        ``model(x, "task")`` runs the trunk and that task's head; ``model(x)`` runs the trunk
        once and every head, returning ``{task: output}``; ``model({"a": xa, "b": xb})`` runs
        each task on its own input (tasks with different input distributions), returning
        ``{task: output}``.

    Raises:
        SharingError: no heads, a head or trunk that is not a module, a task name that is not
            a non-empty string, an unknown task in forward (with close names).

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> mt = ps.nn.MultiTask(nn.Sequential(nn.Linear(40, 32), nn.ReLU()),
        ...                      {"digits": nn.Linear(32, 10), "parity": nn.Linear(32, 2)})
        >>> mt(torch.randn(5, 40), "parity").shape
        torch.Size([5, 2])
        >>> {k: tuple(v.shape) for k, v in mt(torch.randn(5, 40)).items()}
        {'digits': (5, 10), 'parity': (5, 2)}
    """

    def __init__(self, trunk: nn.Module, heads: Mapping[str, nn.Module]):
        if not isinstance(trunk, nn.Module):
            raise SharingError(f"trunk must be an nn.Module, got {type(trunk).__name__}")
        if not isinstance(heads, Mapping) or not heads:
            raise SharingError(f"heads must be a non-empty dict {{task: module}}, got {heads!r}")
        for task, head in heads.items():
            if not isinstance(task, str) or not task or "." in task:
                raise SharingError(f"task names must be non-empty strings without '.', got {task!r}")
            if not isinstance(head, nn.Module):
                raise SharingError(f"the head of task {task!r} must be an nn.Module, got {type(head).__name__}")
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict(dict(heads))

    @property
    def tasks(self) -> list[str]:
        """The task names, in the order the heads were given."""
        return list(self.heads.keys())

    def _head(self, task) -> nn.Module:
        if not isinstance(task, str) or task not in self.heads:
            raise SharingError(f"unknown task {task!r}" + did_you_mean(str(task), self.tasks, "task"))
        return self.heads[task]

    def forward(self, x, task: str | None = None):
        """``x`` through the trunk and one head (``task``), every head (None), or per-task inputs (a dict)."""
        if isinstance(x, Mapping):
            if task is not None:
                raise SharingError("pass either a dict of per-task inputs or one input and a task, not both")
            heads = {t: self._head(t) for t in x}
            return {t: heads[t](self.trunk(xt)) for t, xt in x.items()}
        if task is not None:
            head = self._head(task)
            return head(self.trunk(x))
        features = self.trunk(x)
        return {t: head(features) for t, head in self.heads.items()}

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}"

