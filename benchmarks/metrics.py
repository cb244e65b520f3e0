"""Measurements: gradient variance (two conventions), bias against exact enumeration, time
and memory per step.

Gradient variance of the encoder's parameters :math:`\\phi`:

- *fixed batch*: ``n`` repeated estimates :math:`\\hat g_1..\\hat g_n` at fixed parameters on
  one fixed binarized batch; reported as the trace of their covariance,
  :math:`\\sum_j \\widehat{\\mathrm{Var}}(\\hat g_j)`
  (:func:`storch_pyro.diagnostics.gradient_stats`);
- *running moments* (the convention of Dong et al. 2020, DisARM): exponential moving averages
  :math:`m_1, m_2` (decay 0.999, bias-corrected) of the training estimates and their squares,
  reported as the mean over coordinates of :math:`m_2 - m_1^2`. This mixes the estimator's
  variance with the drift of the gradient along the run and the minibatch noise.
"""

import math
import time
from contextlib import contextmanager
from typing import Dict, List, Optional

import torch

from storch_pyro.diagnostics import flat_grad, gradient_stats


@contextmanager
def preserved_state(method):
    """Baseline state is restored on exit, so measurements leave the training run's baselines as
    they were (they do draw from the global RNG)."""
    state = method.save_state()
    try:
        yield
    finally:
        method.load_state(state)


def fixed_batch_variance(method, x: torch.Tensor, params: List[torch.Tensor], n: int) -> float:
    """Trace of the covariance of ``n`` repeated gradient estimates w.r.t. ``params``."""
    with preserved_state(method):
        stats = gradient_stats(lambda: method.surrogate(x)[0], params, n)
    return stats.total_variance


def bias_against_exact(
    method, vae, x: torch.Tensor, params: List[torch.Tensor], n: int
) -> Dict[str, float]:
    """Mean of ``n`` estimates against the exact gradient of :math:`-\\mathrm{ELBO}` (by
    enumeration of the latent space). ``mean_z2``: the mean over coordinates of the squared
    z-score, about 1 (:math:`(n-1)/(n-3)` for Student-t z-scores) for an unbiased
    estimator and far above 1 for a biased one; ``relative_bias``:
    :math:`\\lVert \\bar g - g \\rVert / \\lVert g \\rVert`; ``max_abs_z`` over coordinates."""
    exact = flat_grad(vae.exact_cost(x), params).detach()
    with preserved_state(method):
        stats = gradient_stats(lambda: method.surrogate(x)[0], params, n, exact=exact)
    keep = stats.std_error > 0
    z = stats.z_scores[keep]
    return {
        "relative_bias": float(stats.bias.norm() / exact.norm()),
        "mean_z2": float((z**2).mean()) if z.numel() else float("nan"),
        "max_abs_z": float(z.abs().max()) if z.numel() else float("nan"),
        "n": n,
    }


class RunningMoments:
    """Bias-corrected EMAs of the gradient and its square (the DisARM paper's variance)."""

    def __init__(self, decay: float = 0.999) -> None:
        self.decay = decay
        self.steps = 0
        self.first: Optional[torch.Tensor] = None
        self.second: Optional[torch.Tensor] = None

    def update(self, gradient: torch.Tensor) -> None:
        gradient = gradient.detach()
        if self.first is None:
            self.first = torch.zeros_like(gradient)
            self.second = torch.zeros_like(gradient)
        self.steps += 1
        self.first.mul_(self.decay).add_(gradient, alpha=1 - self.decay)
        self.second.mul_(self.decay).add_(gradient**2, alpha=1 - self.decay)

    def variance(self) -> float:
        """Mean over coordinates of the corrected :math:`m_2 - m_1^2`."""
        if self.first is None:
            return float("nan")
        correction = 1 - self.decay**self.steps
        first, second = self.first / correction, self.second / correction
        return float((second - first**2).clamp(min=0).mean())


def current_gradient(params: List[torch.Tensor]) -> torch.Tensor:
    """The ``.grad`` of ``params``, flattened (zeros where missing)."""
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


def saved_tensor_megabytes(method, x: torch.Tensor) -> float:
    """Megabytes of tensors that autograd saves for the backward pass of one surrogate: the
    activation memory of a step, the same on every device (distinct storages counted once)."""
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with preserved_state(method), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = method.surrogate(x)
    del loss
    return sum(seen.values()) / 2**20


class StepTimer:
    """Wall time of training steps (synchronizing CUDA), reported as a median."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.times: List[float] = []
        self._start = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)

    def median_ms(self, skip: int = 5) -> float:
        times = sorted(self.times[skip:] if len(self.times) > 2 * skip else self.times)
        return 1e3 * times[len(times) // 2] if times else float("nan")


def log10(value: float) -> float:
    return math.log10(value) if value > 0 else float("nan")
