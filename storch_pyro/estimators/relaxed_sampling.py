"""Relaxed samples of Bernoulli and categorical variables, their conditionals given the
discrete value, and log-densities that are continuous in a relaxed value.

The reparameterizations of Tucker et al. (2017, "REBAR: Low-variance, unbiased gradient
estimates for discrete latent variable models", appendix), written in log space so that they
stay finite and ordered at logits of :math:`\\pm 30` and probabilities of :math:`10^{-8}`:

* Bernoulli with logits :math:`\\phi`: :math:`z = \\phi + \\log u - \\log(1-u)` (logistic),
  :math:`b = H(z) = 1[z > 0]`, and given :math:`b`, with :math:`s = 2b - 1`,

  .. math:: \\tilde z = s\\,\\big(\\mathrm{softplus}(s\\phi + \\log v) - \\log(1 - v)\\big),

  which is :math:`\\phi + \\mathrm{logit}(u')` for :math:`u'` uniform on the part of
  :math:`(0,1)` where :math:`H = b`.
* Categorical with log-probabilities :math:`\\log\\pi` (normalized):
  :math:`z_i = \\log\\pi_i + G_i` (Gumbel), :math:`b = \\arg\\max z`; given :math:`b`, the
  maximum is a standard Gumbel and the others are Gumbels truncated below it
  (top-down sampling), with :math:`E_i = -\\log v_i`:

  .. math:: \\tilde z_b = -\\log E_b,\\qquad
     \\tilde z_i = -\\log\\big(E_b + E_i / \\pi_i\\big)
     = -\\mathrm{logaddexp}(\\log E_b, \\log E_i - \\log\\pi_i)\\quad (i \\ne b).

The conditional sample is differentiable in :math:`\\phi` (or :math:`\\log\\pi`) at fixed
noise :math:`v` and :math:`b`, which is what REBAR's :math:`\\nabla c(\\tilde z)` needs.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch.distributions import Distribution

from storch_pyro.estimators.relaxation import discrete_base


def open_uniform(shape: Tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Uniform noise on the open interval :math:`(0, 1)`: never 0, never 1."""
    u = torch.rand(shape, dtype=like.dtype, device=like.device)
    return u.clamp(min=torch.finfo(like.dtype).tiny)


def logistic_sample(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:math:`z = \\phi + \\log u - \\log(1 - u)`: :math:`H(z) = 1[z > 0]` is
    Bernoulli(:math:`\\sigma(\\phi)`)."""
    return logits + torch.log(u) - torch.log1p(-u)


def logistic_conditional(
    logits: torch.Tensor, hard: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """:math:`\\tilde z \\sim p(z \\mid b)` for the logistic relaxation (module docstring)."""
    sign = 2.0 * hard - 1.0
    return sign * (F.softplus(sign * logits + torch.log(v)) - torch.log1p(-v))


def gumbel_sample(log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:math:`z_i = \\log\\pi_i - \\log(-\\log u_i)`: :math:`\\arg\\max z \\sim \\pi`."""
    return log_probs - torch.log(-torch.log(u))


def gumbel_conditional(
    log_probs: torch.Tensor, one_hot: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """:math:`\\tilde z \\sim p(z \\mid b)` for the Gumbel-max relaxation, ``one_hot`` the
    one-hot :math:`b` (module docstring)."""
    log_e = torch.log(-torch.log(v))
    log_e_top = (log_e * one_hot).sum(-1, keepdim=True)
    others = -torch.logaddexp(log_e_top.expand_as(log_e), log_e - log_probs)
    return torch.where(one_hot > 0, -log_e_top.expand_as(log_e), others)


def relaxed_log_prob(fn: Distribution, value: torch.Tensor) -> torch.Tensor:
    """The log-probability of a Bernoulli, Categorical or OneHotCategorical (possibly
    ``.to_event`` or expanded) as a function continuous in a relaxed ``value``:
    :math:`b\\log\\sigma(\\phi) + (1-b)\\log\\sigma(-\\phi)`, or
    :math:`\\sum_i b_i \\log\\pi_i` with ``value`` one-hot shaped (also for ``Categorical``).
    It equals ``fn.log_prob`` at discrete values. Shape: ``value``'s batch shape."""
    found = discrete_base(fn)
    if found is None:
        raise TypeError(f"relaxed_log_prob: {type(fn).__name__} is not a discrete distribution")
    kind, logits = found
    event_rank = len(fn.event_shape)
    if kind == "bernoulli":
        log_prob = value * F.logsigmoid(logits) + (1.0 - value) * F.logsigmoid(-logits)
    else:
        log_prob = (value * torch.log_softmax(logits, -1)).sum(-1)
        if kind == "onehot":
            event_rank -= 1
    if event_rank:
        log_prob = log_prob.sum(tuple(range(-event_rank, 0)))
    return log_prob
