"""Dynamic weight sharing: a linear layer whose weight is mixed per input from a shared bank."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .errors import SharingError

__all__ = ["DynamicLinear"]


def _positive(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SharingError(f"{name} must be a positive integer, got {value!r}")
    return value


class DynamicLinear(nn.Module):
    """A linear layer whose weight depends on its input: a router mixes T shared templates.

    For an input ``x`` (features last), a small router gives mixing weights
    ``p = softmax(router(x))`` over T templates, and the layer computes
    ``y = x @ W(x).T + b(x)`` with ``W(x) = sum_t p_t W_t`` and ``b(x) = sum_t p_t b_t``
    (conditionally parameterised layers, as in CondConv). The bank of templates is the shared
    storage: every input uses it, each in its own mixture, for ``T * out * in`` weights plus a
    ``T * in`` router. Each position of a sequence is routed on its own.

    The forward never builds ``W(x)`` per input: it applies all T templates at once and
    mixes their outputs, which is the same linear map (:meth:`weight_for` builds ``W(x)``
    when you want to look at it).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        templates: T, the number of weight templates in the bank.
        bias: whether each template has its own bias (mixed like the weights).
        device, dtype: where and how to create the parameters.

    Raises:
        SharingError: a size or ``templates`` that is not a positive integer.

    Example:
        >>> import torch, paramshare as ps
        >>> layer = ps.nn.DynamicLinear(16, 8, templates=4)
        >>> x = torch.randn(5, 16)
        >>> layer(x).shape, layer.weight_for(x).shape  # one 8x16 weight per input
        (torch.Size([5, 8]), torch.Size([5, 8, 16]))
        >>> y = torch.einsum("noi,ni->no", layer.weight_for(x), x) + layer.bias_for(x)
        >>> torch.allclose(layer(x), y, atol=1e-6)
        True
    """

    def __init__(self, in_features: int, out_features: int, templates: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = _positive(in_features, "in_features")
        self.out_features = _positive(out_features, "out_features")
        self.num_templates = _positive(templates, "templates")
        if not isinstance(bias, bool):
            raise SharingError(f"bias must be True or False, got {bias!r}")
        kw = {"device": device, "dtype": dtype}
        self.templates = nn.Parameter(torch.empty(templates, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(templates, out_features, **kw)) if bias else None
        self.router = nn.Linear(in_features, templates, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise each template (and bias) as ``nn.Linear`` initialises its weight."""
        for t in range(self.num_templates):
            nn.init.kaiming_uniform_(self.templates[t], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.router.reset_parameters()

    def mixing(self, x: torch.Tensor) -> torch.Tensor:
        """The router's mixing weights ``(..., T)`` for input ``x`` ``(..., in_features)``; rows sum to 1."""
        return torch.softmax(self.router(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.mixing(x)
        t, o, i = self.templates.shape
        h = F.linear(x, self.templates.reshape(t * o, i)).unflatten(-1, (t, o))  # (..., T, out)
        y = (p.unsqueeze(-2) @ h).squeeze(-2)
        if self.bias is not None:
            y = y + p @ self.bias
        return y

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight each input uses: ``(..., out_features, in_features)``."""
        return torch.tensordot(self.mixing(x), self.templates, dims=1)

    def bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The bias each input uses: ``(..., out_features)`` (None without bias)."""
        return None if self.bias is None else self.mixing(x) @ self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"templates={self.num_templates}, bias={self.bias is not None}")
