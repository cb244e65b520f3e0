"""Gradient statistics for tests and benchmarks: mean, variance, standard error, bias."""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch


@dataclass
class GradientStats:
    """Statistics of ``n`` independent gradient estimates (flattened over all params).

    :ivar mean: the mean estimate.
    :ivar variance: the per-coordinate sample variance of one estimate.
    :ivar std_error: the standard error of :attr:`mean` (``sqrt(variance / n)``).
    :ivar exact: the exact gradient, if given.
    :ivar n: number of estimates.

    Example::

        stats = gradient_stats(loss_fn, params, n=1000, exact=exact_gradient)
        print(stats.total_variance, stats.z_scores.abs().max())
    """

    mean: torch.Tensor
    variance: torch.Tensor
    std_error: torch.Tensor
    n: int
    exact: Optional[torch.Tensor] = None

    @property
    def bias(self) -> torch.Tensor:
        """``mean - exact``."""
        if self.exact is None:
            raise ValueError("GradientStats.bias needs the exact gradient")
        return self.mean - self.exact

    @property
    def z_scores(self) -> torch.Tensor:
        """``(mean - exact) / std_error``: standard normal per coordinate if unbiased."""
        return self.bias / self.std_error

    @property
    def total_variance(self) -> float:
        """Trace of the covariance of one estimate."""
        return float(self.variance.sum())


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor], **kwargs) -> torch.Tensor:
    """The gradient of ``loss`` w.r.t. ``params``, flattened into one vector (zeros for
    params ``loss`` does not depend on).

    Example::

        g = flat_grad(elbo.differentiable_loss(model, guide, data), list(net.parameters()))
    """
    grads = torch.autograd.grad(loss, list(params), allow_unused=True, **kwargs)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]
    )


def gradient_stats(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    n: int,
    exact: Optional[torch.Tensor] = None,
) -> GradientStats:
    """Draws ``n`` gradient estimates ``d loss_fn() / d params`` and summarizes them.

    :param loss_fn: returns a fresh differentiable surrogate loss each call, e.g.
        ``lambda: elbo.differentiable_loss(model, guide, data)``.
    :param params: leaf tensors to differentiate.
    :param exact: the exact gradient (flattened like the estimates), for bias/z-scores.

    Example::

        stats = gradient_stats(lambda: elbo.differentiable_loss(story, None, a, b, c),
                               [a, b, c], n=2000, exact=torch.tensor([...]))
        assert stats.z_scores.abs().max() < 4.5
    """
    if n < 2:
        raise ValueError(f"gradient_stats: n must be at least 2, got {n}")
    samples = torch.stack([flat_grad(loss_fn(), params) for _ in range(n)])
    mean = samples.mean(0)
    variance = samples.var(0)
    if exact is not None:
        exact = torch.as_tensor(exact, dtype=mean.dtype, device=mean.device).reshape(-1)
    return GradientStats(mean, variance, (variance / n).sqrt(), n, exact)
