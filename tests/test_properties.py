"""Property-based tests of the core (hypothesis) over plate shapes, sample counts and
particles: few examples each, derandomized, so the run is short and reproducible."""

import pyro
import pyro.distributions as dist
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro.infer import Trace_ELBO

import storch_pyro as storch
from storch_pyro import estimators

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None)

plate_sizes = st.lists(st.integers(1, 4), min_size=0, max_size=2)


def _plates(sizes):
    """Nested plates, outermost first, at dims -len(sizes) .. -1."""
    return [pyro.plate(f"plate_{i}", size, dim=i - len(sizes)) for i, size in enumerate(sizes)]


def _enter(plates):
    from contextlib import ExitStack

    stack = ExitStack()
    for plate in plates:
        stack.enter_context(plate)
    return stack


@SETTINGS
@given(
    sizes=plate_sizes,
    num_particles=st.integers(1, 3),
    vectorize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_loss_value_equals_trace_elbo(sizes, num_particles, vectorize, seed):
    """With the default estimators (one draw per site, as Pyro draws), any plate shape and
    any particles give Trace_ELBO's loss value."""
    shape = tuple(sizes)
    data = torch.linspace(-1.0, 2.0, max(1, len(torch.zeros(shape).flatten()))).reshape(shape)

    def model():
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with _enter(_plates(sizes)):
            b = pyro.sample("b", dist.Bernoulli(0.3))
            z = pyro.sample("z", dist.Normal(mu + b, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=data)

    def guide():
        m = pyro.param("m", torch.tensor(0.2))
        logits = pyro.param("logits", torch.zeros(shape))
        loc = pyro.param("loc", torch.zeros(shape))
        pyro.sample("mu", dist.Normal(m, 1.0))
        with _enter(_plates(sizes)):
            pyro.sample("b", dist.Bernoulli(logits=logits))
            pyro.sample("z", dist.Normal(loc, 0.7))

    kwargs = dict(num_particles=num_particles, vectorize_particles=vectorize,
                  max_plate_nesting=len(sizes))
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    expected = Trace_ELBO(**kwargs).loss(model, guide)
    pyro.set_rng_seed(seed)
    actual = storch.StorchELBO(**kwargs).loss(model, guide)
    pyro.set_rng_seed(seed)
    surrogate = storch.StorchELBO(**kwargs).differentiable_loss(model, guide)
    assert abs(actual - expected) <= 1e-4 * (1 + abs(expected))
    assert abs(float(surrogate.detach()) - expected) <= 1e-4 * (1 + abs(expected))


ESTIMATORS = {
    "score": lambda k: estimators.ScoreFunction(k),
    "pathwise": lambda k: estimators.Pathwise(k),
    "arm": lambda k: estimators.ARM(k),
    "gumbel": lambda k: estimators.GumbelSoftmax(0.5, n_samples=k),
    "gumbel-rao": lambda k: estimators.GumbelRao(0.5, 3, n_samples=k),
}


@SETTINGS
@given(
    sizes=plate_sizes,
    extra_nesting=st.integers(0, 1),
    k=st.integers(1, 4),
    name=st.sampled_from(sorted(ESTIMATORS)),
    seed=st.integers(0, 2**16),
)
def test_sample_dim_left_of_plates_and_loss_is_the_mean(sizes, extra_nesting, k, name, seed):
    """A site with k values gets them on a dim left of all plates (``max_plate_nesting``
    dims from the right), and the loss value is the mean over them of the summed cost."""
    shape = tuple(sizes)
    nesting = len(sizes) + extra_nesting
    estimator = ESTIMATORS[name](k)
    values = []
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    param = torch.full(shape, 0.3, requires_grad=True)
    target = torch.full(shape, 0.6)

    def model():
        fn = (dist.Normal(param, 1.0) if name == "pathwise" else dist.Bernoulli(logits=param))
        with _enter(_plates(sizes)):
            z = storch.sample("z", fn, estimator=estimator)
            values.append(z)
            storch.add_cost("c", (z - target) ** 2)

    loss = storch.StorchELBO(max_plate_nesting=nesting).differentiable_loss(model, None)
    (value,) = values
    size = 2 * k if name == "arm" else k  # antithetic pairs; else n_samples values
    if size > 1:
        assert value.shape == (size,) + (1,) * (nesting - len(sizes)) + shape
    else:
        assert value.shape == shape
    costs = ((value.detach() - target) ** 2).reshape(size, -1).sum(-1)
    assert torch.allclose(loss.detach(), costs.mean(), rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, [param])
    assert torch.isfinite(grad).all()


@SETTINGS
@given(
    sizes=plate_sizes,
    probs=st.lists(st.floats(0.01, 0.99), min_size=4, max_size=4),
)
def test_enumerate_is_exact(sizes, probs):
    """Enumerate's loss and gradient are the exact expectation and its gradient, for any
    plate shape (per plate index: sum over the two values weighted by q)."""
    shape = tuple(sizes)
    n = max(1, len(torch.zeros(shape).flatten()))
    p = torch.tensor((probs * n)[:n]).reshape(shape).requires_grad_()
    weight = torch.linspace(0.5, 2.0, n).reshape(shape)

    def model():
        with _enter(_plates(sizes)):
            z = storch.sample("z", dist.Bernoulli(p), estimator=estimators.Enumerate())
            storch.add_cost("c", weight * (z - 0.3) ** 2)

    loss = storch.StorchELBO(max_plate_nesting=len(sizes)).differentiable_loss(model, None)
    exact = (weight * (p * 0.49 + (1 - p) * 0.09)).sum()
    assert torch.allclose(loss, exact, rtol=1e-5)
    (grad,) = torch.autograd.grad(loss, [p])
    (exact_grad,) = torch.autograd.grad(exact, [p])
    assert torch.allclose(grad, exact_grad, rtol=1e-5, atol=1e-7)
