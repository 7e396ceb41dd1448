"""``paramshare.nn``: ready-made modules whose parameter sharing is built in.

Seed patterns, each a plain ``nn.Module`` whose sharing :func:`paramshare.report`,
:func:`paramshare.plan` and :func:`paramshare.untie` see like any other tie:

* :class:`Siamese`: one encoder (the very same parameters) applied to two inputs.
* :class:`TiedAutoencoder`: the decoder's weights are the encoder's, transposed.
* :class:`Recurrent`: one block applied ``steps`` times (recurrence over depth).
* :class:`LocallyConnected1d`: a ``Conv1d`` whose filters are *not* shared across positions,
  the independent-parameter counterpart of a convolution.

Other capabilities re-export their modules at the end of this file, one import line each.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import SharingError
from .tying import tie

__all__ = ["LocallyConnected1d", "Siamese", "TiedAutoencoder", "Recurrent"]


def _positive_int(value, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SharingError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the very same ``nn.Parameter`` objects.

    Buffers and submodules are copied; parameters (parametrizations' stored tensors included)
    are aliases, so no parameter memory is allocated even for a moment.
    """
    memo = {id(p): p for p in module.parameters(recurse=True)}
    return copy.deepcopy(module, memo)


# ---- LocallyConnected1d -------------------------------------------------------------------
class LocallyConnected1d(nn.Module):
    """A 1-D convolution whose filters are not shared across positions.

    Each output position ``p`` has its own filter bank ``weight[p]`` (shaped like a
    ``Conv1d`` weight, ``(out_channels, in_channels, kernel_size)``) and its own bias
    ``bias[p]``. It sees the same receptive fields as ``nn.Conv1d`` with the same arguments,
    but stores ``output_length`` times the parameters: the independent-parameter counterpart
    of a convolution, which shares one filter bank over every position.
    :meth:`from_conv` unties a (trained) ``Conv1d`` into one with identical outputs.

    Input ``(batch, in_channels, input_length)`` or ``(in_channels, input_length)``; output
    ``(batch, out_channels, output_length)`` (or without the batch dimension), where
    ``output_length = (input_length + 2 * padding - kernel_size) // stride + 1``.
    Initialised as ``nn.Conv1d`` is: uniform in ``+-1/sqrt(in_channels * kernel_size)``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output (filters per position).
        kernel_size: width of each filter.
        input_length: length of the input sequence (fixed: every position has its own weights).
        stride: step between receptive fields.
        padding: zeros added at both ends of the input.
        bias: learn one bias per output position and channel.
        device, dtype: where and how to create the parameters.

    Raises:
        SharingError: a non-positive size, or a kernel longer than the padded input.

    Example:
        >>> import torch, paramshare as ps
        >>> lc = ps.nn.LocallyConnected1d(1, 25, kernel_size=5, input_length=40, stride=2, padding=1)
        >>> lc(torch.randn(8, 1, 40)).shape
        torch.Size([8, 25, 19])
        >>> ps.report(lc).unique_params  # 19 positions x (25*1*5 weights + 25 biases)
        2850
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_length: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_channels = _positive_int(in_channels, "in_channels")
        self.out_channels = _positive_int(out_channels, "out_channels")
        self.kernel_size = _positive_int(kernel_size, "kernel_size")
        self.input_length = _positive_int(input_length, "input_length")
        self.stride = _positive_int(stride, "stride")
        self.padding = _positive_int(padding, "padding", minimum=0)
        if not isinstance(bias, bool):
            raise SharingError(f"bias must be True or False, got {bias!r}")
        padded = input_length + 2 * padding
        if kernel_size > padded:
            raise SharingError(
                f"kernel_size {kernel_size} is longer than the padded input ({input_length} + 2*{padding} = {padded}); "
                "use a smaller kernel or more padding"
            )
        self.output_length = (padded - kernel_size) // stride + 1
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.output_length, out_channels, in_channels, kernel_size, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_length, out_channels, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the parameters as ``nn.Conv1d`` would for one position, independently per position."""
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[1] != self.in_channels or x.shape[2] != self.input_length:
            raise SharingError(
                f"LocallyConnected1d expects input (batch, {self.in_channels}, {self.input_length}) or "
                f"({self.in_channels}, {self.input_length}), got {tuple(x.shape)}"
            )
        if self.padding:
            x = F.pad(x, (self.padding, self.padding))
        patches = x.unfold(2, self.kernel_size, self.stride)  # (batch, in, positions, kernel)
        out = torch.einsum("bilk,loik->bol", patches, self.weight)
        if self.bias is not None:
            out = out + self.bias.t()
        return out.squeeze(0) if unbatched else out

    @classmethod
    def from_conv(cls, conv: nn.Conv1d, input_length: int) -> LocallyConnected1d:
        """Untie a ``Conv1d``: a locally connected layer with its filters copied to every position.

        The result computes exactly what ``conv`` computes on inputs of ``input_length``, but
        each position's copy of the filters can now change on its own (and its gradient is
        that position's share of the convolution's gradient, which sums over positions).

        Args:
            conv: an ``nn.Conv1d`` with ``groups=1``, ``dilation=1`` and zero padding.
            input_length: the length of the inputs it will see.

        Returns:
            A new :class:`LocallyConnected1d` on ``conv``'s device and dtype; ``conv`` is unchanged.

        Raises:
            SharingError: not a ``Conv1d``, or one with groups, dilation, a non-zero padding
                mode or asymmetric ``"same"`` padding, which this layer does not model.

        Example:
            >>> import torch, torch.nn as nn, paramshare as ps
            >>> conv = nn.Conv1d(3, 8, kernel_size=3, padding=1)
            >>> lc = ps.nn.LocallyConnected1d.from_conv(conv, input_length=20)
            >>> x = torch.randn(2, 3, 20)
            >>> torch.allclose(lc(x), conv(x), atol=1e-6)
            True
        """
        if not isinstance(conv, nn.Conv1d):
            raise SharingError(f"from_conv needs an nn.Conv1d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise SharingError(f"from_conv supports groups=1 only; this Conv1d has groups={conv.groups}")
        if tuple(conv.dilation) != (1,):
            raise SharingError(f"from_conv supports dilation=1 only; this Conv1d has dilation={conv.dilation[0]}")
        if conv.padding_mode != "zeros":
            raise SharingError(f"from_conv supports zero padding only; this Conv1d has padding_mode={conv.padding_mode!r}")
        k = conv.kernel_size[0]
        if conv.padding == "valid":
            padding = 0
        elif conv.padding == "same":
            if (k - 1) % 2:
                raise SharingError(
                    f"from_conv cannot model padding='same' with the even kernel_size {k} (its padding is asymmetric); "
                    "use an odd kernel or explicit padding"
                )
            padding = (k - 1) // 2
        else:
            padding = conv.padding[0]
        lc = cls(
            conv.in_channels, conv.out_channels, k, input_length, stride=conv.stride[0], padding=padding,
            bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            lc.weight.copy_(conv.weight.detach().unsqueeze(0).expand_as(lc.weight))
            if conv.bias is not None:
                lc.bias.copy_(conv.bias.detach().unsqueeze(0).expand_as(lc.bias))
        lc.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            lc.bias.requires_grad_(conv.bias.requires_grad)
        return lc

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"input_length={self.input_length}, output_length={self.output_length}, stride={self.stride}")
        if self.padding:
            s += f", padding={self.padding}"
        if self.bias is None:
            s += ", bias=False"
        return s


# ---- Siamese ------------------------------------------------------------------------------
class Siamese(nn.Module):
    """One encoder, the very same parameters, applied to both inputs of a pair.

    ``forward(x1, x2)`` returns ``head(encoder(x1), encoder(x2))``, or the pair of embeddings
    when there is no head. The second branch, ``twin``, is a copy of the encoder's structure
    whose parameters are the encoder's own ``nn.Parameter`` objects (an alias tie, which
    :func:`paramshare.report` counts and :func:`paramshare.untie` can undo); gradients from
    both branches sum into them. Buffers (e.g. BatchNorm running statistics) are kept per
    branch, as :func:`paramshare.tie_modules` does; prefer LayerNorm/GroupNorm in the encoder
    when the two branches must agree exactly in eval mode.

    Args:
        encoder: the module applied to each input.
        head: optional module called as ``head(e1, e2)`` on the two embeddings.
        shared: ``False`` builds the unshared ("pseudo-Siamese") baseline: the twin is an
            independent copy that starts from the same values.

    Raises:
        SharingError: ``encoder`` or ``head`` is not an ``nn.Module``; ``shared`` not a bool.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> enc = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 16))
        >>> net = ps.nn.Siamese(enc)
        >>> e1, e2 = net(torch.randn(4, 40), torch.randn(4, 40))
        >>> e1.shape, net.twin[0].weight is net.encoder[0].weight
        (torch.Size([4, 16]), True)
        >>> r = ps.report(net); r.total_params, r.unique_params  # used twice, stored once
        (3680, 1840)
    """

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None, shared: bool = True):
        super().__init__()
        if not isinstance(encoder, nn.Module):
            raise SharingError(f"Siamese needs an nn.Module encoder, got {type(encoder).__name__}")
        if head is not None and not isinstance(head, nn.Module):
            raise SharingError(f"the head must be an nn.Module (called as head(e1, e2)) or None, got {type(head).__name__}")
        if not isinstance(shared, bool):
            raise SharingError(f"shared must be True or False, got {shared!r}")
        if not any(True for _ in encoder.parameters()):
            raise SharingError("the encoder has no parameters to share")
        self.encoder = encoder
        self.twin = _shared_copy(encoder) if shared else copy.deepcopy(encoder)
        self.head = head

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's embedding of one input."""
        return self.encoder(x)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        e1, e2 = self.encoder(x1), self.twin(x2)
        if self.head is None:
            return e1, e2
        return self.head(e1, e2)


# ---- TiedAutoencoder ----------------------------------------------------------------------
class TiedAutoencoder(nn.Module):
    """A fully connected autoencoder whose decoder weights are the encoder's, transposed.

    ``sizes = [d_in, h_1, ..., code]`` builds ``encoder`` (Linear layers ``d_in -> h_1 -> ...
    -> code``) and the mirror ``decoder``; each decoder weight reads the matching encoder
    weight transposed (a :func:`paramshare.tie` with ``transpose=True``: a view, no copy), so
    the weights are stored once and gradients from both uses sum into them. Biases are not
    shared. An activation follows every layer except the code layer and the output layer.
    ``ps.untie(model)`` gives the untied autoencoder with the same values.

    Args:
        sizes: layer widths, input first, code last (at least two).
        activation: a module class or factory called with no arguments (``nn.ReLU``), or None.
        output_activation: the same for the output (``nn.Sigmoid`` for pixels in [0, 1]), or None.

    Raises:
        SharingError: fewer than two sizes, a non-positive size, an activation that does
            not build an ``nn.Module``.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> ae = ps.nn.TiedAutoencoder([40, 32, 8])
        >>> ae(torch.randn(5, 40)).shape, ae.encode(torch.randn(5, 40)).shape
        (torch.Size([5, 40]), torch.Size([5, 8]))
        >>> r = ps.report(ae); r.total_params, r.unique_params  # 40*32 + 32*8 weights stored once
        (3184, 1648)
    """

    def __init__(
        self,
        sizes,
        activation: Callable[[], nn.Module] | None = nn.ReLU,
        output_activation: Callable[[], nn.Module] | None = None,
    ):
        super().__init__()
        try:
            sizes = list(sizes)
        except TypeError:
            raise SharingError(f"sizes must be a list of layer widths like [784, 128, 32], got {sizes!r}") from None
        if len(sizes) < 2:
            raise SharingError(f"sizes needs at least an input and a code width, like [784, 32]; got {sizes!r}")
        for s in sizes:
            _positive_int(s, "every size")
        self.sizes = tuple(sizes)
        act = self._factory(activation, "activation")
        out_act = self._factory(output_activation, "output_activation")
        n = len(sizes) - 1
        enc: list[nn.Module] = []
        for i in range(n):
            enc.append(nn.Linear(sizes[i], sizes[i + 1]))
            if act is not None and i < n - 1:
                enc.append(act())
        dec: list[nn.Module] = []
        for i in reversed(range(n)):
            dec.append(nn.Linear(sizes[i + 1], sizes[i]))
            if i > 0 and act is not None:
                dec.append(act())
        if out_act is not None:
            dec.append(out_act())
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        enc_lin = [f"encoder.{i}" for i, m in enumerate(self.encoder) if isinstance(m, nn.Linear)]
        dec_lin = [f"decoder.{i}" for i, m in enumerate(self.decoder) if isinstance(m, nn.Linear)]
        for e, d in zip(enc_lin, reversed(dec_lin)):
            tie(self, f"{e}.weight", f"{d}.weight", transpose=True)

    @staticmethod
    def _factory(f, what: str):
        if f is None:
            return None
        if isinstance(f, nn.Module):
            raise SharingError(
                f"{what} must be a module class or factory (nn.ReLU), not an instance ({type(f).__name__}())"
            )
        if not callable(f):
            raise SharingError(f"{what} must be a module class or factory such as nn.ReLU, got {f!r}")
        probe = f()
        if not isinstance(probe, nn.Module):
            raise SharingError(f"{what}() must build an nn.Module, got {type(probe).__name__}")
        return f

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code of ``x`` (last dimension ``sizes[0]`` -> ``sizes[-1]``)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction from a code."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# ---- Recurrent ----------------------------------------------------------------------------
class Recurrent(nn.Module):
    """One block applied ``steps`` times: recurrence over depth (Universal Transformer style).

    ``forward(x, *args, **kwargs)`` computes ``x = block(x, *args, **kwargs)`` ``steps`` times.
    Each step is an entry of ``layers`` whose parameters are the block's own ``nn.Parameter``
    objects (alias ties): the model stores one block's parameters, gradients from all steps
    sum into them, and :func:`paramshare.report` shows the saving. Buffers (e.g. BatchNorm
    running statistics) are kept per step, as :func:`paramshare.share_layers` does.
    ``ps.untie(model)`` turns it into an unshared stack with the same values;
    ``ps.share_layers(model.layers, unique=M)`` into any sharing pattern in between.

    Args:
        block: the module applied at every step; its output is the next step's input.
        steps: how many times to apply it (>= 1).

    Raises:
        SharingError: ``block`` is not an ``nn.Module``, ``steps`` is not a positive integer.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> rec = ps.nn.Recurrent(nn.Sequential(nn.Linear(16, 16), nn.Tanh()), steps=6)
        >>> rec(torch.randn(3, 16)).shape
        torch.Size([3, 16])
        >>> r = ps.report(rec); r.total_params, r.unique_params, r.ratio
        (1632, 272, 6.0)
    """

    def __init__(self, block: nn.Module, steps: int):
        super().__init__()
        if not isinstance(block, nn.Module):
            raise SharingError(f"Recurrent needs an nn.Module block, got {type(block).__name__}")
        _positive_int(steps, "steps")
        self.layers = nn.ModuleList([block] + [_shared_copy(block) for _ in range(steps - 1)])

    @property
    def block(self) -> nn.Module:
        """The block (the first step; the others are structural copies sharing its parameters)."""
        return self.layers[0]

    @property
    def steps(self) -> int:
        return len(self.layers)

    def forward(self, x, *args, **kwargs):
        for layer in self.layers:
            x = layer(x, *args, **kwargs)
        return x

    def extra_repr(self) -> str:
        return f"steps={self.steps}"


# ---- modules of other capabilities, re-exported (one line each) -------------------------
from .hashing import HashedLinear  # noqa: E402,F401
from .multitask import MultiTask  # noqa: E402,F401
from .dynamic import DynamicLinear  # noqa: E402,F401
