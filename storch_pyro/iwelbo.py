"""IWELBO: the K-particle importance-weighted bound (Burda, Grosse & Salakhutdinov 2016),
with pathwise gradients at reparameterized guide sites (IWAE) and VIMCO's leave-one-out
score-function gradients (Mnih & Rezende 2016) at the others."""

import math
from typing import Any, Callable, Optional, Set, Tuple

import torch
from pyro import poutine
from pyro.infer.elbo import ELBO
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites
from pyro.util import (
    check_if_enumerated,
    check_model_guide_match,
    check_site_shape,
    warn_if_nan,
)

from storch_pyro.baselines import _UNDER_IWELBO, VIMCO
from storch_pyro.errors import StorchError
from storch_pyro.estimators.base import Estimator
from storch_pyro.estimators.pathwise import Pathwise
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.handlers.records import Frame
from storch_pyro.handlers.resolution import outer_config_handlers, resolve_site


def vimco_log_baselines(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """VIMCO's leave-one-out baselines :math:`\\hat L_{-k}` along ``dim`` (Mnih & Rezende
    2016, eq. 9 with the geometric mean):

    .. math:: \\hat L_{-k} = \\log \\frac1K \\Big(\\sum_{j \\ne k} w_j
        + \\exp\\big(\\tfrac{1}{K-1}\\textstyle\\sum_{j\\ne k} \\log w_j\\big)\\Big).

    Not differentiable (used detached); needs :math:`K \\ge 2`. See :func:`vimco_signals`
    for how it is computed.

    Example::

        log_w = torch.tensor([-1000.0, -2.0, -3.0])
        baselines = vimco_log_baselines(log_w)  # one per particle
    """
    top, shifted = _shift(log_weights, dim)
    return top + _shifted_baselines(shifted, dim)


def vimco_signals(log_weights: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """VIMCO's learning signals :math:`\\hat L - \\hat L_{-k}` along ``dim``, with
    :math:`\\hat L = \\log \\frac1K \\sum_j w_j` and :math:`\\hat L_{-k}` of
    :func:`vimco_log_baselines`.

    Computed in log space in O(K) memory, without forming :math:`w_j`: the log weights are
    shifted by their maximum :math:`m`, which cancels from the difference (so a signal near
    zero keeps its absolute precision whatever the size of the log weights). For :math:`k`
    other than the argmax, :math:`\\log\\sum_{j\\ne k} w_j - m = \\log(1 +
    \\sum_{j \\notin \\{k, \\arg\\max\\}} e^{\\log w_j - m})`, whose argument is at
    least 1 (no catastrophic cancellation); for the argmax it is the log-sum-exp of the
    others. The sums :math:`\\sum_{j\\ne k}\\log w_j` come from exclusive prefix and
    suffix sums (no subtraction of large numbers). In float32 with log weights spanning
    1000 nats, the signals agree with a float64 computation to 1e-4 relative (absolute
    below 1).

    Example::

        log_w = torch.tensor([-1000.0, -2.0, -3.0])
        signals = vimco_signals(log_w)  # multiplies each particle's score
    """
    _, shifted = _shift(log_weights, dim)
    k = shifted.size(dim)
    bound = torch.logsumexp(shifted, dim, keepdim=True) - math.log(k)
    return bound - _shifted_baselines(shifted, dim)


def _shift(log_weights: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    log_w = log_weights.detach()
    if log_w.size(dim) < 2:
        raise ValueError(f"VIMCO: needs at least 2 particles along dim {dim}")
    top = log_w.max(dim, keepdim=True).values
    return top, log_w - top


def _shifted_baselines(shifted: torch.Tensor, dim: int) -> torch.Tensor:
    """:math:`\\hat L_{-k} - m` from the log weights shifted by their maximum (all <= 0)."""
    k = shifted.size(dim)
    argmax = shifted.argmax(dim, keepdim=True)
    is_max = torch.zeros_like(shifted, dtype=torch.bool).scatter(dim, argmax, True)
    rest = torch.logsumexp(shifted.masked_fill(is_max, -math.inf), dim, keepdim=True)
    others_but_max = (rest.exp() - shifted.exp()).clamp(min=0.0)
    log_others = torch.where(is_max, rest, torch.log1p(others_but_max))
    prefix = shifted.cumsum(dim) - shifted
    suffix = shifted.flip(dim).cumsum(dim).flip(dim) - shifted
    log_geometric = (prefix + suffix) / (k - 1)
    return torch.logaddexp(log_others, log_geometric) - math.log(k)


class _SiteChoices(Messenger):
    """Resolves each unobserved guide site's estimator (the precedence rules of
    :func:`~storch_pyro.handlers.resolution.resolve_site`), checks that IWELBO can use it, draws
    score-function sites without a gradient path, and records their names."""

    def __init__(self, default_estimator: Optional[Estimator]) -> None:
        super().__init__()
        self.default_estimator = default_estimator
        self.score_sites: Set[str] = set()
        self._outer: list = []

    def __enter__(self):
        result = super().__enter__()
        self._outer = outer_config_handlers(self)
        return result

    def _pyro_sample(self, msg: Message) -> None:
        if (msg["is_observed"] or msg["done"] or msg["value"] is not None
                or type(msg["fn"]) is _Subsample):
            return
        name, fn = msg["name"], msg["fn"]
        config = resolve_site(msg, self.default_estimator, self._outer)
        estimator, baseline = config.estimator, config.baseline
        if isinstance(estimator, Pathwise):
            estimator.check(name, fn)
            if baseline is not None and config.explicit_baseline:
                raise StorchError(
                    f"site '{name}': a baseline was given, but its estimator Pathwise has no "
                    f"score-function term for it to apply to. Remove the baseline or use e.g. "
                    f"ScoreFunction."
                )
        elif type(estimator) is ScoreFunction and estimator.n_samples == 1:
            if baseline is not None and not isinstance(baseline, VIMCO):
                raise StorchError(
                    f"site '{name}': IWELBO uses VIMCO's leave-one-out baseline for "
                    f"score-function sites, got {baseline!r}. Remove the baseline (VIMCO() is "
                    f"the default) or use StorchELBO for {type(baseline).__name__}."
                )
            self.score_sites.add(name)
            if fn.has_rsample:
                msg["value"] = fn.sample()  # no gradient path: the score term carries it
        else:
            raise StorchError(
                f"site '{name}': IWELBO supports Pathwise (reparameterizable sites: the IWAE "
                f"gradient) and ScoreFunction() with one sample per particle (VIMCO's "
                f"baseline), got {estimator!r}. Use one of these at '{name}' (the "
                f"num_particles particles are the samples), or StorchELBO for "
                f"{type(estimator).__name__}."
            )

    def _pyro_storch_cost(self, msg: Message) -> None:
        raise StorchError(
            f"add_cost('{msg['name']}'): IWELBO bounds log p(x) from the model's and guide's "
            f"log-densities and takes no added costs. Use pyro.factor('{msg['name']}', -cost) "
            f"to add a log-density term, or StorchELBO."
        )


class IWELBO(ELBO):
    """The importance-weighted bound of Burda, Grosse & Salakhutdinov (2016, "Importance
    weighted autoencoders") with K particles, as a loss for ``SVI``:

    .. math:: \\mathcal L_K = \\mathbb E_{z_{1:K} \\sim q}\\Big[\\log \\frac1K
        \\sum_{k=1}^K w_k\\Big], \\qquad w_k = \\frac{p(x, z_k)}{q(z_k)},

    where :math:`\\log w_k` sums the log-densities of all model sites minus those of all guide
    sites over plates (scaled by ``poutine.scale`` and subsampling, masked by
    ``poutine.mask``, as Pyro's ``RenyiELBO`` does). Plates that every site shares (e.g. a
    data plate around a VAE) stay independent: the bound is taken per element and summed,
    as in ``RenyiELBO``. The loss is :math:`-\\mathcal L_K`; ``num_particles=K`` particles
    are drawn in one vectorized pass on a particle plate left of all plates.

    The gradient is, per guide site (estimators chosen as under
    :class:`~storch_pyro.StorchELBO`: :func:`storch_pyro.sample`, handlers,
    ``default_estimator``, else Pathwise where ``has_rsample``):

    - :class:`~storch_pyro.estimators.Pathwise`: differentiated through the sample (IWAE);
    - :class:`~storch_pyro.estimators.ScoreFunction` (one sample per particle): the score
      term with VIMCO's leave-one-out baseline (:class:`~storch_pyro.baselines.VIMCO`,
      Mnih & Rezende 2016), so the surrogate to minimize is

      .. math:: S = -\\Big[\\hat L\\, \\boxdot\\Big(\\sum_k l_k\\Big)
          - \\sum_k \\big(\\boxdot(l_k) - 1\\big)\\, \\bot(\\hat L_{-k})\\Big],
          \\qquad l_k = \\sum_{s \\in \\text{score sites}} \\log q(z_{k,s}),

      of value :math:`-\\hat L` and gradient
      :math:`-\\nabla\\hat L - \\sum_k (\\hat L - \\hat L_{-k}) \\nabla l_k`,

      an unbiased estimate of :math:`-\\nabla \\mathcal L_K` (:func:`vimco_signals`).

    Other estimators and baselines raise a :class:`~storch_pyro.errors.StorchError` naming
    the site (they estimate a different, per-site objective). Every latent model site must
    be in the guide; :func:`~storch_pyro.add_cost` is not supported (use ``pyro.factor``).
    Unlike ``RenyiELBO(alpha=0)``, which gives non-reparameterized guide sites no gradient,
    discrete guides learn. The surrogate has the Loaded-DiCE form (Farquhar et al. 2019),
    so its derivatives of any order (``create_graph=True``) are unbiased too.

    :param int num_particles: K >= 2 (for K = 1 the bound is the ELBO: use StorchELBO).
    :param int max_plate_nesting: bound on nested plates (guessed by a first run if not
        given).
    :param Estimator default_estimator: for sites without an estimator from the call or a
        handler.

    Example::

        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), loss=IWELBO(num_particles=5))
        svi.step(data)
    """

    def __init__(
        self,
        num_particles: int = 5,
        max_plate_nesting: float = float("inf"),
        default_estimator: Optional[Estimator] = None,
        **kwargs: Any,
    ) -> None:
        if (not isinstance(num_particles, int) or isinstance(num_particles, bool)
                or num_particles < 2):
            raise ValueError(
                f"IWELBO: num_particles must be an int >= 2, got {num_particles!r}; for one "
                f"particle the bound is the ELBO: use StorchELBO"
            )
        if default_estimator is not None and not isinstance(default_estimator, Estimator):
            raise TypeError(
                "IWELBO: default_estimator must be a storch_pyro Estimator, got "
                f"{type(default_estimator).__name__}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
            **kwargs,
        )
        self.default_estimator = default_estimator

    # ---- public interface ------------------------------------------------------------------
    @torch.no_grad()
    def loss(self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any) -> float:
        """The Monte Carlo estimate of :math:`-\\mathcal L_K`, as a float."""
        bound, _ = self._bound_and_score(model, guide, args, kwargs)
        loss = -float(bound.sum())
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(
        self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The surrogate :math:`S`: its value estimates :math:`-\\mathcal L_K`, its gradient
        is an unbiased estimate of :math:`-\\nabla \\mathcal L_K`."""
        bound, score_term = self._bound_and_score(model, guide, args, kwargs)
        return -(bound.sum() + score_term)

    def loss_and_grads(
        self, model: Callable, guide: Optional[Callable], *args: Any, **kwargs: Any
    ) -> float:
        """Backpropagates the surrogate (:meth:`differentiable_loss`) and returns its value."""
        surrogate = self.differentiable_loss(model, guide, *args, **kwargs)
        if surrogate.requires_grad:
            surrogate.backward(retain_graph=self.retain_graph)
        loss = surrogate.item()
        warn_if_nan(loss, "loss")
        return loss

    # ---- internals -------------------------------------------------------------------------
    def _bound_and_score(self, model, guide, args, kwargs) -> Tuple[torch.Tensor, Any]:
        """:math:`\\hat L` per element of the shared plates, and the VIMCO score term (of
        value zero; ``0.0`` without score-function sites)."""
        if guide is None:
            guide = _no_guide
        ((model_trace, guide_trace, score_sites),) = self._get_traces(model, guide, args, kwargs)
        nesting = int(self.max_plate_nesting)
        sites = [site for trace in (model_trace, guide_trace)
                 for site in trace.nodes.values() if site["type"] == "sample"]
        sum_dims = get_dependent_plate_dims(sites)
        log_w: Any = 0.0
        score: Any = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                log_w = log_w + _sum_dims(site["log_prob"], sum_dims)
        drawn = []
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                drawn.append(name)
                log_q = _sum_dims(site["log_prob"], sum_dims)
                log_w = log_w - log_q
                if name in score_sites:
                    score = score + log_q
        # the particle plate is at dim -nesting: make it dim 0
        log_w = torch.as_tensor(log_w, device=getattr(log_w, "device", None))
        log_w = log_w.reshape((1,) * (nesting - log_w.dim()) + log_w.shape)
        log_w = log_w.expand((self.num_particles,) + log_w.shape[1:])
        # The particles: a frame on Pyro's particle plate, reduced by log-mean-exp.
        particles = Frame(("num_particles_vectorized", -nesting, 0), -nesting,
                          self.num_particles, "log_mean_exp", sites=drawn)
        bound = particles.reduce(log_w)
        if not isinstance(score, torch.Tensor) or not score.requires_grad:
            return bound, 0.0
        # Loaded DiCE (Farquhar et al. 2019) with VIMCO's baselines b_k = L_{-k}:
        #   L box(sum_k s_k) - sum_k (box(s_k) - 1) b_k,  box(x) = exp(x - x.detach()),
        # rearranged so that the first derivative uses the precise signals L - b_k
        # (vimco_signals) and no difference of large numbers; the extra terms have value
        # and first derivative exactly zero and give the right higher derivatives.
        score = score.reshape((1,) * (nesting - score.dim()) + score.shape).expand_as(log_w)
        signal = vimco_signals(log_w, 0)
        box_k = torch.exp(score - score.detach()) - 1.0
        total = score.sum(0)
        box_total = torch.exp(total - total.detach()) - 1.0
        fixed = bound.detach()
        term = ((signal * box_k).sum(0) + fixed * (box_total - box_k.sum(0))
                + (bound - fixed) * box_total)
        return bound, term.sum()

    def _get_trace(self, model, guide, args, kwargs):
        """The guide's and model's traces with log-densities (one vectorized pass over the
        particles), and the names of the guide's score-function sites."""
        choices = _SiteChoices(self.default_estimator)
        under_iwelbo = _UNDER_IWELBO.set(True)
        try:
            with choices:
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
                model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                    *args, **kwargs
                )
        except StorchError as error:
            # poutine.trace re-raises with the trace's shapes appended: keep our message
            cause = error.__cause__
            raise (cause if isinstance(cause, StorchError) else error) from None
        finally:
            _UNDER_IWELBO.reset(under_iwelbo)
        for name, site in model_trace.nodes.items():
            if (site["type"] == "sample" and not site["is_observed"]
                    and type(site["fn"]) is not _Subsample and name not in guide_trace.nodes):
                raise StorchError(
                    f"site '{name}': IWELBO needs a guide that samples every latent site of "
                    f"the model; '{name}' is latent in the model and absent from the guide. "
                    f"Add it to the guide, or use StorchELBO (which also takes guide=None)."
                )
        validating = is_validation_enabled()
        if validating:
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
            check_if_enumerated(guide_trace)
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        if validating:
            for trace in (model_trace, guide_trace):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        check_site_shape(site, self.max_plate_nesting)
        return model_trace, guide_trace, choices.score_sites


def _sum_dims(log_prob: torch.Tensor, dims) -> torch.Tensor:
    """Sums the (negative) ``dims`` that exist in ``log_prob``, keeping them (size 1), so that
    every dim stays at its plate's position."""
    dims = [d for d in dims if d >= -log_prob.dim()]
    return log_prob.sum(dims, keepdim=True) if dims else log_prob


def _no_guide(*args: Any, **kwargs: Any) -> None:
    return None


__all__ = ["IWELBO", "vimco_log_baselines", "vimco_signals"]
