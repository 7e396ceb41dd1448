"""HashedNets (Chen et al. 2015): a layer's weights drawn from a small shared budget by a hash.

Virtual weight ``(i, j)`` of a hashed weight is ``budget[h(i, j)] * sign(i, j)``: ``h`` and
``sign`` come from one deterministic 32-bit integer hash of ``(i, j)`` and a seed (see
:func:`signed_index`), computed on the fly at every forward pass. No index tensor is stored, so the
memory of a hashed weight is its budget; gradients reach the budget (each budget entry gets
the signed sum of its members' gradients).

Three ways in:

* :class:`HashedLinear` builds a hashed linear layer (train it from scratch, as HashedNets do);
* :func:`hash` replaces the weights of selected ``nn.Linear`` layers of any model in place,
  each by a budget initialised to the least-squares fit of its current weight;
* ``ps.apply_plan`` re-creates the hashing from a plan (the ``hash`` sharing kind,
  :mod:`paramshare.kinds.hash`).

Hashed weights are ``torch.nn.utils.parametrize`` parametrizations (:class:`HashedWeight`)
whose stored tensor (``<layer>.parametrizations.weight.original``) is the budget: modules keep
their class and forward, and ``layer.weight`` reads the virtual weight.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ._index import ModelIndex
from ._parametrize import is_derived, set_derived
from .errors import SharingError, did_you_mean

__all__ = ["HASH_NAME", "MAX_BUDGET", "HashedWeight", "HashedLinear", "hash", "hash_index", "signed_index", "project_to_budget"]

#: Name of the hash function, written into plans so that a future change is detected.
HASH_NAME = "xormul32-v1"

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # < 2**27: a 32-bit value times it stays below 2**59, exact in int64
_MUL = 0x7FEB352D  # odd and < 2**31: a 32-bit value times it stays below 2**63
_COL_SALT = 0x5BD1E995
#: Budgets up to 2**30 values: (32-bit hash) * (2 * budget) must stay below 2**63.
MAX_BUDGET = 1 << 30


def _mix32_int(x: int) -> int:
    """The 32-bit mixing function on a Python int (used for seeds and in tests)."""
    x &= _M32
    x ^= x >> 16
    x = (x * _MIX) & _M32
    x ^= x >> 16
    x = (x * _MIX) & _M32
    x ^= x >> 16
    return x


def _seed_offset(seed: int) -> int:
    return _mix32_int(_mix32_int(seed & _M32) ^ 0x9E3779B9 ^ ((seed >> 32) & _M32))


def _mix32(n: int, offset: int, device) -> torch.Tensor:
    """``mix32((k + offset) mod 2**32)`` for ``k`` in ``range(n)`` (int64, exact)."""
    x = torch.arange(n, dtype=torch.int64, device=device).add_(offset).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 16).mul_(_MIX).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    rows = shape[0] if shape else 1
    return rows, (math.prod(shape) // rows if rows else 0)


def signed_index(shape: Sequence[int], budget: int, seed: int = 0, device=None) -> torch.Tensor:
    """Positions of a hashed tensor's virtual weights in the signed budget ``cat([b, -b])``.

    Virtual weight ``(i, j)`` (``i`` the first dimension, ``j`` the flattened others) has
    ``x = r[i] ^ c[j]`` with ``r``/``c`` the row/column keys ``mix32(i + s)``/``mix32(j + s')``
    (seed-dependent offsets ``s``, ``s'``; ``mix32`` an xorshift-multiply mixer), then the
    multiplicative hash ``y = (x * A) mod 2**32`` and the position ``(y * 2 * budget) >> 32``
    in ``range(2 * budget)``: below ``budget`` reads ``+b[pos]``, above reads
    ``-b[pos - budget]``. Every operation is exact int64 arithmetic, so every device computes
    the same index; only two small key vectors and five elementwise passes are needed.

    Returns:
        An int64 tensor of ``shape``'s number of elements, flat.
    """
    rows, cols = _rows_cols(shape)
    off = _seed_offset(int(seed))
    r = _mix32(rows, off, device)
    c = _mix32(cols, off ^ _COL_SALT, device)
    x = torch.bitwise_xor(r.unsqueeze(1), c.unsqueeze(0)).view(-1)
    return x.mul_(_MUL).bitwise_and_(_M32).mul_(2 * int(budget)).bitwise_right_shift_(32)


def hash_index(shape: Sequence[int], budget: int, seed: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Budget positions and signs of the virtual weights of a hashed tensor of ``shape``.

    Virtual weight ``k`` (flat, row-major) is ``budget[index[k]]``, negated where
    ``negative[k]``; see :func:`signed_index` for the hash.

    Args:
        shape: the virtual tensor's shape.
        budget: number of stored weights (1 to 2**30).
        seed: any integer; different seeds give unrelated hashes.
        device: where to compute.

    Returns:
        ``(index, negative)``: an int64 tensor of positions in ``range(budget)`` and a bool tensor.

    Example:
        >>> idx, neg = hash_index((2, 3), 2, seed=0)
        >>> idx.tolist(), neg.tolist()
        ([0, 0, 0, 0, 1, 1], [False, False, False, True, False, False])
    """
    pos = signed_index(shape, budget, seed, device)
    negative = pos >= budget
    return pos - negative.long() * budget, negative


class HashedWeight(nn.Module):
    """Parametrization: the virtual weight of ``shape`` read from a 1-D budget through the hash.

    Args:
        shape: the virtual weight's shape (e.g. ``(out_features, in_features)``).
        budget: the number of stored weights the hash maps into.
        seed: the hash seed.

    Example:
        >>> hw = HashedWeight((3, 4), budget=5, seed=1)
        >>> hw(torch.arange(5.0)).shape
        torch.Size([3, 4])
    """

    def __init__(self, shape: Sequence[int], budget: int, seed: int = 0):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.budget = int(budget)
        self.seed = int(seed)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def forward(self, budget: torch.Tensor) -> torch.Tensor:
        if budget.dim() != 1 or budget.numel() != self.budget:
            raise SharingError(
                f"a hashed weight of shape {self.shape} reads a budget of {self.budget} values, "
                f"got a tensor of shape {tuple(budget.shape)}; re-hash with ps.apply_plan(model, plan)"
            )
        pos = signed_index(self.shape, self.budget, self.seed, budget.device)
        return torch.cat([budget, -budget]).index_select(0, pos).view(self.shape)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        """The budget whose virtual weight is closest to ``value`` (least squares)."""
        return project_to_budget([(value, self.seed)], self.budget)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, budget={self.budget}, seed={self.seed}"


def project_to_budget(values: Iterable[tuple[torch.Tensor, int]], budget: int) -> torch.Tensor:
    """The budget that best reproduces the given weights (least squares), detached.

    Each budget entry becomes the mean of the signed weights hashed to it; entries no weight
    maps to are 0.

    Args:
        values: ``(weight, seed)`` pairs that will read the budget.
        budget: its number of entries.

    Returns:
        A 1-D tensor of ``budget`` values in the weights' dtype and device.

    Example:
        >>> w = torch.randn(30, 40)
        >>> b = project_to_budget([(w, 0)], budget=150)
        >>> b.shape, HashedWeight((30, 40), 150)(b).shape
        (torch.Size([150]), torch.Size([30, 40]))
    """
    values = list(values)
    first = values[0][0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    sums = torch.zeros(budget, dtype=acc, device=first.device)
    counts = torch.zeros(budget, dtype=acc, device=first.device)
    with torch.no_grad():
        for w, seed in values:
            idx, negative = hash_index(w.shape, budget, seed, w.device)
            v = w.detach().reshape(-1).to(acc)
            sums.index_add_(0, idx, torch.where(negative, -v, v))
            counts.index_add_(0, idx, torch.ones_like(v))
    return (sums / counts.clamp(min=1)).to(first.dtype)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SharingError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class HashedLinear(nn.Linear):
    """A linear layer whose ``out_features x in_features`` weights come from ``budget`` stored values.

    ``weight[i, j] = budget[h(i, j)] * sign(i, j)`` with the hash computed on the fly (see
    :func:`hash_index`): the layer stores ``budget`` weights plus the bias, and no index. It is
    an ``nn.Linear`` (same forward, ``layer.weight`` is the virtual weight), initialised so
    that its virtual weights have the distribution of a fresh ``nn.Linear``'s.

    Args:
        in_features, out_features: as for ``nn.Linear``.
        budget: number of stored weights (1 to ``in_features * out_features``).
        bias: whether to learn a (dense) bias.
        seed: the hash seed.
        device, dtype: as for ``nn.Linear``.

    Raises:
        SharingError: a size that is not a positive integer, a budget larger than the weight.

    Example:
        >>> import paramshare as ps
        >>> layer = ps.nn.HashedLinear(784, 300, budget=784 * 300 // 64)
        >>> layer.weight.shape, sum(p.numel() for p in layer.parameters())
        (torch.Size([300, 784]), 3975)
    """

    def __init__(self, in_features: int, out_features: int, budget: int, bias: bool = True, seed: int = 0,
                 device=None, dtype=None):
        nn.Module.__init__(self)
        _check_int("in_features", in_features, 1)
        _check_int("out_features", out_features, 1)
        _check_int("budget", budget, 1)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise SharingError(f"seed must be an integer, got {seed!r}")
        if budget > in_features * out_features:
            raise SharingError(
                f"budget {budget} is larger than the {out_features} x {in_features} = {in_features * out_features} "
                "weights it would hash; use an nn.Linear or a smaller budget"
            )
        if budget > MAX_BUDGET:
            raise SharingError(f"budget {budget} exceeds the largest hash budget, 2**30 = {MAX_BUDGET}; split the layer")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        stored = nn.Parameter(torch.empty(budget, **factory))
        set_derived(self, "weight", HashedWeight((out_features, in_features), budget, seed), stored)
        self.reset_parameters()

    @property
    def budget(self) -> nn.Parameter:
        """The stored weights (a 1-D ``nn.Parameter``)."""
        return self.parametrizations.weight.original

    @property
    def seed(self) -> int:
        return self.parametrizations.weight[0].seed

    def reset_parameters(self) -> None:
        """Uniform in +-1/sqrt(in_features), like ``nn.Linear``'s default initialisation."""
        if "parametrizations" not in self._modules:  # nn.Linear.__init__ is not called; guard anyway
            return
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.budget, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"budget={self.budget.numel()}, bias={self.bias is not None}, seed={self.seed}")


# ---- ps.hash ------------------------------------------------------------------------------
def _patterns(include) -> list[str] | None:
    if include is None:
        return None
    if isinstance(include, str):
        return [include]
    if isinstance(include, Iterable):
        pats = list(include)
        if pats and all(isinstance(p, str) for p in pats):
            return pats
    raise SharingError(f"include must be a name pattern or a list of them (e.g. 'fc*' or ['fc1', 'fc2']), got {include!r}")


def _matches(pattern: str, module_name: str) -> bool:
    return fnmatch.fnmatchcase(module_name, pattern) or fnmatch.fnmatchcase(module_name + ".weight", pattern)


def select_linears(index: ModelIndex, include, what: str) -> list[str]:
    """Names of the ``nn.Linear`` modules ``include`` selects (all of them for None).

    Patterns are shell-style (``fnmatch``) and match a module name (``"fc1"``, ``"blocks.*.ffn"``)
    or its weight's name (``"fc1.weight"``).
    """
    pats = _patterns(include)
    linears = [n for n, m in index.modules.items() if isinstance(m, nn.Linear) and "weight" in index.uses_in(n)]
    if pats is None:
        if not linears:
            raise SharingError(f"{what}: the model has no nn.Linear layers to hash")
        return linears
    chosen: list[str] = []
    for pat in pats:
        hit = [n for n in linears if _matches(pat, n)]
        if not hit:
            others = [
                f"{n!r} ({type(m).__name__})" for n, m in index.modules.items()
                if n and not isinstance(m, nn.Linear) and _matches(pat, n) and "weight" in index.uses_in(n)
            ]
            if others:
                raise SharingError(
                    f"{what}: {pat!r} matches {', '.join(others[:4])}, which {'is' if len(others) == 1 else 'are'} "
                    "not nn.Linear; HashedNets hash nn.Linear weights only: include Linear layers"
                )
            raise SharingError(f"{what}: pattern {pat!r} matches no nn.Linear layer" + did_you_mean(pat, linears, "Linear layer"))
        chosen += [n for n in hit if n not in chosen]
    return [n for n in linears if n in chosen]


def hash(model: nn.Module, ratio: float, include=None, seed: int = 0) -> nn.Module:  # noqa: A001
    """Hash the weights of selected ``nn.Linear`` layers into budgets ``ratio`` times their size.

    Each selected weight becomes a :class:`HashedWeight` over its own budget of
    ``max(1, round(ratio * numel))`` stored values, initialised to the least-squares fit of
    the current weight (each budget entry is the mean of the signed weights hashed to it), so
    a trained layer keeps as much of its function as the budget allows. Biases stay dense. A
    weight tied (aliased) across several selected layers gets one budget that they all read.
    The modules keep their class and forward. To train a hashed net from scratch, build it from
    :class:`HashedLinear` (whose init matches ``nn.Linear``'s) or re-initialise the budgets.

    Args:
        model: the module (changed in place).
        ratio: stored/virtual weights, in (0, 1]; ``1/8`` stores an eighth of each weight.
        include: shell-style pattern(s) of Linear module names (or their ``.weight`` names);
            None selects every ``nn.Linear``.
        seed: the hash seed.

    Returns:
        ``model``.

    Raises:
        SharingError: a ratio outside (0, 1], a pattern that matches nothing or matches
            a non-Linear module, a weight that is already hashed/clustered/transposed or tied
            to a use that is not selected. The model is unchanged.

    Example:
        >>> import torch.nn as nn, paramshare as ps
        >>> net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 10))
        >>> net = ps.hash(net, 1 / 8)
        >>> net[0].weight.shape, ps.report(net).unique_params  # 29400 + 375 stored weights + biases
        (torch.Size([300, 784]), 30085)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio <= 1) or math.isnan(ratio):
        raise SharingError(f"ratio must be in (0, 1] (the fraction of each weight that is stored, e.g. 1/8), got {ratio!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SharingError(f"seed must be an integer, got {seed!r}")
    index = ModelIndex(model)
    names = select_linears(index, include, "ps.hash")
    # group the selected weights by the stored parameter they use (aliases share one budget)
    groups: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for mname in names:
        wname = f"{mname}.weight" if mname else "weight"
        use = index.uses[wname]
        if use.derived:
            kinds = ", ".join(type(m).__name__ for m in use.plist)
            how = "already hashed" if is_derived(use.module, use.attr, HashedWeight) else f"computed by {kinds}"
            raise SharingError(
                f"ps.hash: {wname!r} is {how}; hash plain weights only (ps.untie(model, {wname!r}) makes it dense again)"
            )
        p = use.param
        if not p.is_floating_point():
            raise SharingError(f"ps.hash: {wname!r} is {p.dtype}; only floating-point weights can be hashed")
        if ratio * p.numel() > MAX_BUDGET:
            raise SharingError(
                f"ps.hash: {wname!r} would get a budget of {round(ratio * p.numel())} values, more than the largest "
                f"hash budget, 2**30; use a smaller ratio"
            )
        groups.setdefault(id(p), []).append(wname)
        params[id(p)] = p
    selected = {w for ws in groups.values() for w in ws}
    for key, members in groups.items():
        others = [n for n, u in index.uses.items() if u.backing()[0] is params[key] and n not in selected]
        if others:
            raise SharingError(
                f"ps.hash: {members[0]!r} is tied to {', '.join(map(repr, others))}, which {'is' if len(others) == 1 else 'are'} "
                "not selected; include every layer of the tie, or ps.untie it first"
            )
    for key, members in groups.items():
        p = params[key]
        size = max(1, int(round(ratio * p.numel())))
        shape = tuple(p.shape)
        budget = nn.Parameter(project_to_budget([(p, seed)], size), requires_grad=p.requires_grad)
        for wname in members:
            use = index.uses[wname]
            set_derived(use.module, use.attr, HashedWeight(shape, size, seed), budget)
    return model
