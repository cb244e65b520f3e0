"""Numerical core of :func:`storch_pyro.handlers.sequence`: stochastic beam search and the
sample weights of the estimators over a set of sequences.

Layout: every tensor here is a *set layout* ``[..., K]`` (or ``[..., K, V]`` with the
vocabulary last): the rows of the beam on the last dim (``V`` candidate tokens after it),
independent batch elements on the leading dims.

**Stochastic beam search** (Kool, van Hoof & Welling 2019, "Stochastic Beams and Where to Find
Them", ICML). Give every complete sequence ``y`` the perturbed log-probability
``G_y = log p(y) + Gumbel``; the ``k`` sequences with the largest ``G_y`` are ``k`` samples
without replacement (Gumbel-top-k), and their set ``S`` has the set probability ``p^D(S)`` of
:mod:`~storch_pyro.estimators._unordered_set_math`. SBS finds them top-down: a prefix
carries ``G_prefix = max`` of ``G_y`` over its completions, distributed as
``Gumbel(log p(prefix))``; given it, the children's maxima are Gumbels with locations
``phi_c = log p(prefix) + log p(c | prefix)`` conditioned on their maximum being
``T = G_prefix`` (:func:`conditional_gumbel`), and the ``k`` largest children of all beams
are kept. A dropped prefix can contain no top-k sequence, so after the last step the beam
holds exactly the top-k sequences; the largest ``G`` ever dropped is ``kappa``, the
``(k+1)``-th largest ``G_y`` (the threshold of priority sampling).

**Weights.** Every quantity of the unordered set estimator depends only on the members'
probabilities ``p(s)`` and on ``p_rest = 1 - sum_s p(s)`` (see
:mod:`~storch_pyro.estimators._unordered_set_math`), so it applies to a set of sequences
unchanged (:func:`set_weights`). Priority sampling (Duffield et al. 2007; Kool et al. 2019,
section 4.2): with ``q(s) = P(G_s > kappa) = 1 - exp(-exp(log p(s) - kappa))``,
``sum_{s in S} p(s)/q(s) f(s)`` is unbiased for ``E[f]`` (:func:`priority_weights`).
"""

from typing import Tuple

import torch
from torch import Tensor

from storch_pyro.estimators._unordered_set_math import _compute_prepared

_LOG_HALF = -0.6931471805599453


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def conditional_gumbel(phi: Tensor, top: Tensor) -> Tensor:
    """Gumbels with locations ``phi [..., K, V]`` conditioned on their maximum over ``V``
    being ``top [..., K]``, in log space (Kool et al. 2019, appendix B):
    ``G~ = -log(exp(-T) - exp(-Z) + exp(-G))`` with ``Z = max G``, computed as
    ``T - relu(v) - log1p(exp(-|v|))``, ``v = T - G + log1mexp(G - Z)``.
    ``-inf`` where ``phi`` or ``top`` is ``-inf`` (impossible children, empty rows)."""
    tiny = torch.finfo(phi.dtype).tiny
    u = torch.rand(phi.shape, dtype=phi.dtype, device=phi.device).clamp_min(tiny)
    g = phi - torch.log(-torch.log(u))
    z = g.amax(-1, keepdim=True)
    t = top.unsqueeze(-1)
    # log(1 - e^x) as log(-expm1(x)): its error for x << 0 is absolute and below e^x, which
    # is negligible next to T - G (log1mexp's second branch buys nothing here).
    v = t - g + torch.log(-torch.expm1((g - z).clamp_max(0.0)))
    out = t - v.clamp_min(0.0) - torch.log1p(torch.exp(-v.abs()))
    ninf = torch.full_like(out, float("-inf"))
    return torch.where((phi > float("-inf")) & (t > float("-inf")), out, ninf)


def beam_step(
    log_p: Tensor, phi: Tensor, top: Tensor, k: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of stochastic beam search.

    :param log_p: ``[..., K, V]`` log-probabilities of the next token of each beam.
    :param phi: ``[..., K]`` the beams' log-probabilities (``-inf`` for empty rows).
    :param top: ``[..., K]`` the beams' perturbed log-probabilities ``G``.
    :returns: ``(parents, tokens, top, dropped)``: the ``k`` kept children's parent rows and
        tokens ``[..., k]`` and their ``G`` (sorted, decreasing), and the largest ``G`` among
        the children not kept ``[...]`` (``-inf`` if none).
    """
    vocab = log_p.shape[-1]
    children = conditional_gumbel(phi.unsqueeze(-1) + log_p, top).flatten(-2)
    n = min(k + 1, children.shape[-1])
    values, index = children.topk(n, dim=-1)
    if n > k:
        dropped = values[..., k]
    else:
        dropped = torch.full(values.shape[:-1], float("-inf"), dtype=values.dtype,
                             device=values.device)
    index = index[..., :k]
    return index // vocab, index % vocab, values[..., :k], dropped


def set_weights(log_p_set: Tensor, method: str = "auto") -> Tuple[Tensor, Tensor]:
    """The unordered set estimator's weights ``w [..., k]`` and built-in baseline weights
    ``W [..., k, k]`` (as :func:`~storch_pyro.estimators._unordered_set_math.
    unordered_set_weights`) from the members' normalized log-probabilities only, with
    ``p_rest = 1 - sum_s p(s)``. Exact (subset recursion) for ``k <= 12`` under
    ``"auto"``, the trapezoid rule above. Detached."""
    log_p_set = log_p_set.detach()
    log_rest = log1mexp(torch.logsumexp(log_p_set, -1).clamp_max(0.0))
    full, loo, lto = _compute_prepared(log_p_set, log_rest, 2, method, None)
    w = torch.exp(log_p_set + loo - full.unsqueeze(-1))
    if log_p_set.shape[-1] == 1:
        return w, torch.zeros(w.shape + (1,), dtype=w.dtype, device=w.device)
    return w, torch.exp(log_p_set.unsqueeze(-2) + lto - loo.unsqueeze(-1))


def priority_weights(log_p_set: Tensor, kappa: Tensor, normalized: bool) -> Tuple[Tensor, Tensor]:
    """Importance weights ``p(s)/q(s)`` of a top-k set with threshold ``kappa`` (the
    ``(k+1)``-th largest perturbed log-probability): ``q(s) = 1 - exp(-exp(log p(s) -
    kappa))``. Unnormalized: ``(w, 0)``, ``sum_s w_s f(s)`` unbiased. Normalized: ``w / W``
    with ``W = sum_s w_s`` and the baseline weights ``W_ij = w_j / W`` (the weighted mean of
    the set's costs), biased but consistent (Kool et al. 2020, section 4.2). Detached."""
    log_p_set = log_p_set.detach()
    log_q = log1mexp(-torch.exp(log_p_set - kappa.detach().unsqueeze(-1)))
    w = torch.exp(log_p_set - log_q)
    k = w.shape[-1]
    if not normalized:
        return w, torch.zeros(w.shape + (k,), dtype=w.dtype, device=w.device)
    w = w / w.sum(-1, keepdim=True)
    return w, w.unsqueeze(-2).expand(w.shape[:-1] + (k, k))
