"""Toy stochastic computation graphs shared by the statistical tests."""

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch

#: Targets of the Bernoulli toy f(b) = sum (b - t)^2.
TARGET = torch.tensor([0.0, 1.0, 0.3])


def story(a, b, c, estimator=None):
    """The seed's generative story: d = a + b, e ~ N(c + b, 1), cost f = d e^2."""
    d = a + b
    e = storch.sample("e", dist.Normal(c + b, 1.0), estimator=estimator)
    storch.add_cost("f", d * e**2)


def bernoulli_event_model(phi, estimator):
    """b ~ Bernoulli(logits=phi) as one event, cost sum (b - TARGET)^2."""
    b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1), estimator=estimator)
    storch.add_cost("c", ((b - TARGET) ** 2).sum(-1))


def bernoulli_plate_model(phi, estimator):
    """The same toy with the coordinates in a plate: per-coordinate credit assignment."""
    with pyro.plate("p", 3):
        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
        storch.add_cost("c", (b - TARGET) ** 2)


def discrete_fn(kind: str, logits: torch.Tensor):
    """A Bernoulli, Categorical or OneHotCategorical (``kind``) with these logits."""
    return {
        "bernoulli": dist.Bernoulli,
        "categorical": dist.Categorical,
        "onehot": dist.OneHotCategorical,
    }[kind](logits=logits)
