"""Soft weight-sharing (Ullrich, Meeds & Welling 2017): a Gaussian-mixture prior over weights.

During (re)training the penalty pulls every selected weight toward one of a few learnable
component means; one component is pinned at zero with a large mixing weight, so many weights
collapse to exactly zero. Afterwards :meth:`GMMPrior.quantize` snaps each weight to the mean
of its most responsible component, turning it into a codebook weight (``centroids[labels]``,
the ``codebook`` sharing kind) that checkpoints store as a few bits per weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._index import ModelIndex
from .errors import SharingError

__all__ = ["GMMPrior"]

def _gamma_pair(value, what: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SharingError(f"{what} must be a pair (alpha, beta) of positive numbers, got {value!r}") from None
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise SharingError(f"{what} must be a pair (alpha, beta) of positive numbers, got {value!r}")
    return a, b


class _NegLogSumExp(torch.autograd.Function):
    """``-logsumexp(q, 0).sum()`` for ``q`` of shape ``(J, N)``, computing in place the softmax
    its gradient needs (components along dim 0: the reductions run over contiguous rows)."""

    @staticmethod
    def forward(ctx, q):
        m = q.amax(0, keepdim=True)
        e = (q - m).exp_()
        s = e.sum(0, keepdim=True)
        out = -(s.log() + m).sum()
        ctx.save_for_backward(e.div_(s))
        return out

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return r * (-grad)


class GMMPrior(nn.Module):
    """A mixture-of-Gaussians prior over a model's weights: the soft weight-sharing penalty.

    ``prior()`` returns the negative log prior of the selected weights,
    ``-sum_i log sum_j pi_j N(w_i | mu_j, sigma_j^2)``, plus Gamma hyperpriors on the
    components' precisions (which keep variances from collapsing). Add it to the loss scaled
    by ``tau / N_train`` (Ullrich et al. use ``tau = 0.003``) and train the model and the
    prior together (:meth:`param_groups` gives the prior's parameters with the learning
    rates of the paper). Component 0 has mean pinned at 0 and mixing weight ``pi_zero``;
    the other ``components - 1`` means, all variances and the other mixing weights are
    learnable ``nn.Parameter`` s of this module (the model's weights are not its parameters).

    Args:
        model: the model whose weights the prior covers (kept by reference, not as a submodule).
        components: J, the number of mixture components including the zero component (>= 2).
        include: ``fnmatch`` pattern(s) on parameter or module names that narrow the default
            selection (the weight of every Linear, Conv and Embedding layer); a pattern naming
            a parameter exactly selects it whatever it is (``"fc1.bias"``). As for
            :func:`paramshare.cluster`.
        pi_zero: the zero component's mixing weight, fixed (as in the paper); None makes it
            learnable too, starting at 0.99.
        init_std: initial standard deviation of every component; None uses 0.25 for weights
            in [-0.6, 0.6] as in the paper, scaled with the weights' largest magnitude.
        hyperprior: ``((alpha0, beta0), (alpha, beta))``, the Gamma priors on the zero
            component's precision and on the others'; None for no hyperprior. The default,
            the paper's, expects standard deviations near 0.02.

    Raises:
        SharingError: ``components`` < 2, ``pi_zero`` outside (0, 1), a pattern matching
            nothing, a selected weight that is computed (clustered, hashed, transposed) rather
            than stored, or that is not floating point, bad hyperprior values.

    Example:
        >>> import torch, torch.nn as nn, paramshare as ps
        >>> net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3))
        >>> prior = ps.GMMPrior(net, components=5)
        >>> opt = torch.optim.Adam([{"params": net.parameters(), "lr": 5e-4}, *prior.param_groups()])
        >>> x, y = torch.randn(8, 20), torch.randint(0, 3, (8,))
        >>> loss = nn.functional.cross_entropy(net(x), y) + 0.003 / 8 * prior()
        >>> loss.backward(); opt.step()
        >>> prior.means.shape  # the pinned zero included
        torch.Size([5])
    """

    def __init__(self, model: nn.Module, components: int = 17, include=None, *, pi_zero: float | None = 0.99,
                 init_std: float | None = None,
                 hyperprior: Sequence[Sequence[float]] | None = ((5e3, 2.0), (2.5e2, 1e-1))):
        super().__init__()
        if isinstance(components, bool) or not isinstance(components, int) or components < 2:
            raise SharingError(f"components must be an integer >= 2 (one is pinned at zero), got {components!r}")
        if pi_zero is not None and (isinstance(pi_zero, bool) or not isinstance(pi_zero, (int, float))
                                    or not 0 < pi_zero < 1):
            raise SharingError(f"pi_zero must be in (0, 1) or None (learnable), got {pi_zero!r}")
        if init_std is not None and (isinstance(init_std, bool) or not isinstance(init_std, (int, float))
                                     or not (init_std > 0 and math.isfinite(init_std))):
            raise SharingError(f"init_std must be a positive number or None, got {init_std!r}")
        if hyperprior is not None:
            try:
                pair0, pair = hyperprior
            except (TypeError, ValueError):
                raise SharingError(
                    f"hyperprior must be ((alpha0, beta0), (alpha, beta)) or None, got {hyperprior!r}"
                ) from None
            hyperprior = (_gamma_pair(pair0, "hyperprior[0]"), _gamma_pair(pair, "hyperprior[1]"))
        from .cluster import select

        index = ModelIndex(model)
        uses = select(index, include, None, 0)
        if not uses:
            raise SharingError(
                "GMMPrior: no weight selected: the model has no floating-point Linear, Conv or Embedding weight"
                + (" matching include" if include is not None else "") + "; name parameters with include=[...]"
            )
        seen: set[int] = set()
        kept: list[str] = []
        for use in uses:
            name = use.name
            if use.derived:
                kinds = ", ".join(type(m).__name__ for m in use.plist)
                raise SharingError(
                    f"GMMPrior: {name!r} is computed by {kinds}, not stored; the prior acts on stored weights "
                    f"(ps.untie(model, {name!r}) makes it a plain weight)"
                )
            if not use.param.is_floating_point():
                raise SharingError(f"GMMPrior: {name!r} is {use.param.dtype}; only floating-point weights have a prior")
            if id(use.param) not in seen:  # a tied weight counts once
                seen.add(id(use.param))
                kept.append(name)
        self.names: tuple[str, ...] = tuple(kept)
        self.pi_zero = None if pi_zero is None else float(pi_zero)
        self.hyperprior = hyperprior
        object.__setattr__(self, "_model", model)
        with torch.no_grad():
            w = self._flat(model).float()
            top = max(float(w.abs().max()), 1e-8)
        n = components - 1
        std = init_std if init_std is not None else 0.25 * top / 0.6
        self.mean_free = nn.Parameter(torch.linspace(-top, top, n))
        self.log_precision = nn.Parameter(torch.full((components,), -2 * math.log(std)))
        p0 = 0.99 if pi_zero is None else float(pi_zero)
        self.mixing_free = nn.Parameter(torch.full((n if pi_zero is not None else components,), 0.0))
        if pi_zero is None:
            with torch.no_grad():
                self.mixing_free[0] = math.log(p0 * n / (1 - p0))

    # ---- the mixture ----------------------------------------------------------------------
    @property
    def components(self) -> int:
        return self.log_precision.numel()

    @property
    def means(self) -> torch.Tensor:
        """All J means; ``means[0]`` is the pinned 0."""
        return torch.cat([self.mean_free.new_zeros(1), self.mean_free])

    @property
    def mixing(self) -> torch.Tensor:
        """All J mixing weights (summing to 1)."""
        if self.pi_zero is None:
            return torch.softmax(self.mixing_free, 0)
        rest = torch.softmax(self.mixing_free, 0) * (1 - self.pi_zero)
        return torch.cat([rest.new_full((1,), self.pi_zero), rest])

    @property
    def stds(self) -> torch.Tensor:
        return torch.exp(-0.5 * self.log_precision)

    def param_groups(self, lr_means: float = 1e-4, lr_precision: float = 3e-3, lr_mixing: float = 3e-3) -> list[dict]:
        """The prior's parameters as optimizer groups, with the learning rates of Ullrich et al."""
        return [
            {"params": [self.mean_free], "lr": lr_means},
            {"params": [self.log_precision], "lr": lr_precision},
            {"params": [self.mixing_free], "lr": lr_mixing},
        ]

    def _weights(self, model: nn.Module | None) -> list[torch.Tensor]:
        model = self._model if model is None else model
        out = []
        for name in self.names:
            mod, _, attr = name.rpartition(".")
            try:
                t = getattr(model.get_submodule(mod), attr)
            except AttributeError:
                raise SharingError(f"GMMPrior: the model has no parameter {name!r} (the prior was built for another model)") from None
            out.append(t)
        return out

    def _flat(self, model: nn.Module | None) -> torch.Tensor:
        return torch.cat([w.reshape(-1) for w in self._weights(model)])

    def _log_joint(self, w: torch.Tensor) -> torch.Tensor:
        """``log pi_j + log N(w | mu_j, sigma_j^2)``, shape ``(len(w), J)``."""
        lp = self.log_precision.to(w.dtype)
        mu = self.means.to(w.dtype)
        return (torch.log(self.mixing.to(w.dtype)) + 0.5 * lp - 0.5 * math.log(2 * math.pi)
                - 0.5 * torch.exp(lp) * (w.unsqueeze(1) - mu).square())

    def forward(self, model: nn.Module | None = None) -> torch.Tensor:
        """The negative log prior of the weights (plus the hyperprior): a scalar to add to the loss.

        Args:
            model: the model to read the weights from (default: the one given at construction).
        """
        w = self._flat(model)
        if not w.is_floating_point():
            raise SharingError("GMMPrior: the selected weights are no longer floating point")
        # log pi_j + log N(w | mu_j, 1/lam_j) = C @ [w^2; w; 1]: one (J x 3) @ (3 x N) product,
        # then a fused log-sum-exp over the J rows (8x faster than the direct (N, J) form, and
        # one J x N tensor kept for the backward pass)
        lp = self.log_precision.to(w.dtype)
        lam = torch.exp(lp)
        mu = self.means.to(w.dtype)
        const = torch.log(self.mixing.to(w.dtype)) + 0.5 * lp - 0.5 * math.log(2 * math.pi) - 0.5 * lam * mu * mu
        coeff = torch.stack([-0.5 * lam, lam * mu, const], 1)
        feats = torch.stack([w * w, w, torch.ones_like(w)])
        nll = _NegLogSumExp.apply(coeff @ feats)
        if self.hyperprior is not None:
            (a0, b0), (a, b) = self.hyperprior
            g = self.log_precision.to(w.dtype)
            nll = nll + ((1 - a0) * g[0] + b0 * torch.exp(g[0]))
            nll = nll + ((1 - a) * g[1:] + b * torch.exp(g[1:])).sum()
        return nll

    @torch.no_grad()
    def assign(self, weight: torch.Tensor) -> torch.Tensor:
        """The most responsible component of each value of ``weight`` (int64, same shape)."""
        flat = weight.detach().reshape(-1)
        labels = torch.empty(flat.numel(), dtype=torch.int64, device=flat.device)
        for start in range(0, flat.numel(), 1 << 20):  # bounded memory for large weights
            part = flat[start:start + (1 << 20)]
            labels[start:start + part.numel()] = self._log_joint(part.float()).argmax(1)
        return labels.view(weight.shape)

    def quantize(self, model: nn.Module | None = None) -> nn.Module:
        """Snap every selected weight to the mean of its most responsible component.

        Each weight becomes a ``codebook`` weight (``centroids[labels]``, as
        :func:`paramshare.cluster` makes them) whose centroids are the component means it
        uses; the zero component, when used, is centroid 0 and pinned at exactly zero (its
        weights stay pruned if the centroids are fine-tuned afterwards). ``ps.save`` then
        stores a few bits per weight (``compress=True`` entropy-codes the labels, which pays
        off when most weights sit in the zero component).

        Args:
            model: the model to quantize (default: the one given at construction); it must
                have the selected weights as plain parameters.

        Returns:
            the model, changed in place.

        Raises:
            SharingError: a selected weight that is missing or no longer a plain stored
                parameter; the model is then unchanged.

        Example:
            >>> import torch.nn as nn, paramshare as ps
            >>> net = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 3))
            >>> prior = ps.GMMPrior(net, components=5)
            >>> net = prior.quantize()
            >>> [g.kind for g in ps.find_ties(net)]
            ['codebook', 'codebook']
            >>> net[0].weight.unique().numel() <= 5
            True
        """
        from .cluster import set_codebook

        model = self._model if model is None else model
        index = ModelIndex(model)
        for name in self.names:
            use = index.uses.get(name)
            if use is None:
                raise SharingError(f"GMMPrior.quantize: the model has no parameter {name!r} (the prior was built for another model)")
            if use.derived:
                kinds = ", ".join(type(m).__name__ for m in use.plist)
                raise SharingError(f"GMMPrior.quantize: {name!r} is already computed by {kinds}; quantize plain weights")
        means = self.means.detach()
        plans = []
        for name in self.names:
            w = index.uses[name].value()
            labels = self.assign(w)
            used = labels.unique()  # sorted; component 0 (the zero) first when used
            order = torch.cat([used[used == 0], used[used != 0][means[used[used != 0]].argsort()]])
            remap = torch.empty(self.components, dtype=torch.int64, device=labels.device)
            remap[order] = torch.arange(order.numel(), device=labels.device)
            plans.append((name, means[order].to(w.dtype), remap[labels], bool((order == 0).any())))
        for name, centroids, labels, zero in plans:
            set_codebook(model, name, centroids, labels, zero=zero)
        return model

    def extra_repr(self) -> str:
        return f"components={self.components}, weights={len(self.names)} tensors, pi_zero={self.pi_zero}"
