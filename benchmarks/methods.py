"""One interface over every way of computing the VAE's gradient: StorchELBO with a registered
estimator, Pyro's ``Trace_ELBO`` / ``TraceGraph_ELBO``, and the hand-written surrogates.

A :class:`Method` gives ``surrogate(x) -> (loss, cost)``: a scalar whose gradient with respect
to the VAE's parameters is the method's estimate of :math:`\\nabla(-\\mathrm{ELBO})` summed
over the batch, and the detached estimate of :math:`-\\mathrm{ELBO}` per data point. State
(baselines) can be saved and restored, so repeated estimates at fixed parameters leave the
training run unchanged.
"""

from typing import Dict, Optional, Tuple

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceGraph_ELBO

import storch_pyro as storch
from benchmarks.handwritten import HAND_WRITTEN
from benchmarks.models import DiscreteVAE
from benchmarks.specs import MethodSpec
from storch_pyro import handlers


class Method:
    """Base class; ``label`` names the method in tables."""

    def __init__(self, vae: DiscreteVAE, spec: MethodSpec) -> None:
        self.vae = vae
        self.spec = spec
        self.label = spec.label

    def surrogate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def save_state(self):
        """Baseline state held in Pyro's param store (copied)."""
        store = pyro.get_param_store()
        return {name: value.detach().clone() for name, value in store._params.items()}

    def load_state(self, state) -> None:
        """Restores :meth:`save_state`'s copy in place; drops entries created since."""
        store = pyro.get_param_store()
        for name in list(store._params):
            if name in state and store._params[name].shape == state[name].shape:
                with torch.no_grad():
                    store._params[name].copy_(state[name])
            else:
                del store[name]


class StorchMethod(Method):
    """``StorchELBO(max_plate_nesting=1).differentiable_loss`` with the spec's estimator at
    the guide's site ``z`` (chosen from outside with :func:`storch_pyro.handlers.estimator`)."""

    def __init__(self, vae, spec):
        super().__init__(vae, spec)
        self.guide = handlers.estimator(vae.guide, config={"z": spec.make_estimator()})
        self.elbo = storch.StorchELBO(max_plate_nesting=1)

    def surrogate(self, x):
        loss = self.elbo.differentiable_loss(self.vae.model, self.guide, x)
        return loss, loss.detach() / x.shape[0]


class TraceMethod(Method):
    """Pyro's ``Trace_ELBO`` (score function without baseline for the discrete site)."""

    def __init__(self, vae, spec):
        super().__init__(vae, spec)
        self.elbo = Trace_ELBO(max_plate_nesting=1)

    def surrogate(self, x):
        loss = self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x)
        return loss, loss.detach() / x.shape[0]


class TraceGraphMethod(Method):
    """Pyro's ``TraceGraph_ELBO`` with its per-data-point decaying-average baseline
    (``use_decaying_avg_baseline``, beta 0.9). It has no ``differentiable_loss``: its
    ``loss_and_grads`` fills ``.grad``, which is handed on as :math:`\\sum_p p \\cdot \\bot g_p`
    (a scalar whose gradient is the estimate)."""

    INFER = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}

    def __init__(self, vae, spec):
        super().__init__(vae, spec)
        self.elbo = TraceGraph_ELBO(max_plate_nesting=1)
        self.params = list(vae.parameters())

    def model(self, x):
        self.vae.model(x, register=True)

    def guide(self, x):
        self.vae.guide(x, register=True, infer=self.INFER)

    def surrogate(self, x):
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        value = self.elbo.loss_and_grads(self.model, self.guide, x)
        loss = torch.zeros((), device=x.device)
        for p, before in zip(self.params, saved):
            if p.grad is not None:
                loss = loss + (p * p.grad.detach()).sum()
            p.grad = before
        return loss, torch.tensor(value / x.shape[0])


class HandWrittenMethod(Method):
    """A surrogate from :mod:`benchmarks.handwritten`."""

    def __init__(self, vae, spec):
        super().__init__(vae, spec)
        self.estimator = HAND_WRITTEN[spec.name]()
        self.estimator.check(vae)

    def surrogate(self, x):
        loss, cost = self.estimator(self.vae, x)
        return loss, cost.mean()

    def save_state(self):
        return self.estimator.state()

    def load_state(self, state):
        self.estimator.set_state(state)


_PYRO: Dict[str, type] = {"Trace_ELBO": TraceMethod, "TraceGraph_ELBO": TraceGraphMethod}


def make_method(vae: DiscreteVAE, spec: MethodSpec) -> Method:
    """The :class:`Method` for a parsed spec (raises for an estimator that cannot handle the
    model's latents, with the estimator's own message)."""
    if spec.family == "storch":
        return StorchMethod(vae, spec)
    if spec.family == "pyro":
        return _PYRO[spec.name](vae, spec)
    if spec.family == "torch":
        return HandWrittenMethod(vae, spec)
    raise ValueError(f"unknown method family {spec.family!r}")


def optional(value) -> Optional[float]:
    return None if value is None else float(value)
