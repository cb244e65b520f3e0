"""Drop-in compatibility with Pyro's ``Trace_ELBO`` and ``TraceGraph_ELBO``.

A catalogue of model/guide pairs written for Pyro's losses (plates, nested plates,
subsampling, sequential plates, ``poutine.scale``/``mask``, ``obs_mask``, ``pyro.factor``,
``pyro.deterministic``, auxiliary guide sites, ``pyro.module`` networks, autoguides,
particles) runs unchanged under :class:`~storch_pyro.StorchELBO`:

* valid pairs give the same loss value as both Pyro losses under the same seed (every
  default estimator draws exactly what Pyro draws: ``rsample`` where ``has_rsample``, else
  ``sample``), through ``loss``, ``differentiable_loss`` and ``loss_and_grads``; where every
  latent is reparameterized, the gradient is Trace_ELBO's too (the two surrogates are then
  the same function of the noise);
* invalid pairs give the same exception type (and the same message, as StorchELBO calls
  Pyro's own checks) or the same warning text.
"""

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceGraph_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from pyro.infer.reparam import LocScaleReparam

import storch_pyro as storch
from storch_pyro.errors import NonFiniteCostError

DATA = torch.tensor([0.3, -1.2, 0.8, 2.1, -0.4, 1.0, 0.0, 0.6, -2.0, 1.5])
GRID = torch.tensor([[0.1, -0.5, 0.9], [1.2, 0.0, -0.3]])  # (2, 3): outer plate 2, inner 3


@dataclass
class Case:
    """A model/guide pair, its arguments and the ELBO options to run it with."""

    model: Callable
    guide: Optional[Callable]
    args: Tuple[Any, ...] = ()
    elbo: Dict[str, Any] = field(default_factory=dict)
    reparameterized: bool = False  # every latent Pathwise: gradients equal Trace_ELBO's


# ---- valid models -----------------------------------------------------------------------


def normal_model(data=DATA):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def normal_guide(data=DATA):
    loc = pyro.param("loc", torch.tensor(0.2))
    scale = pyro.param("scale", torch.tensor(0.7), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def local_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=data)


def local_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(z_loc, 0.8))


def nested_model(grid=GRID):
    with pyro.plate("rows", 2, dim=-2):
        r = pyro.sample("r", dist.Normal(0.0, 1.0))
        with pyro.plate("cols", 3, dim=-1):
            z = pyro.sample("z", dist.Normal(r, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=grid)


def nested_guide(grid=GRID):
    r_loc = pyro.param("r_loc", torch.zeros(2, 1))
    z_loc = pyro.param("z_loc", torch.zeros(2, 3))
    with pyro.plate("rows", 2, dim=-2):
        pyro.sample("r", dist.Normal(r_loc, 1.0))
        with pyro.plate("cols", 3, dim=-1):
            pyro.sample("z", dist.Normal(z_loc, 0.9))


def subsample_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(data), subsample_size=4) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=data[idx])


def subsample_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", len(data), subsample_size=4) as idx:
        pyro.sample("z", dist.Normal(z_loc[idx], 0.8))


def sequential_model(data=DATA[:3]):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    for i in pyro.plate("seq", len(data)):
        z = pyro.sample(f"z_{i}", dist.Normal(mu, 1.0))
        pyro.sample(f"x_{i}", dist.Normal(z, 0.5), obs=data[i])


def sequential_guide(data=DATA[:3]):
    m = pyro.param("m", torch.tensor(0.1))
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    for i in pyro.plate("seq", len(data)):
        pyro.sample(f"z_{i}", dist.Normal(z_loc[i], 0.8))


def sequential_subsample_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    for i in pyro.plate("seq", len(data), subsample_size=3):
        pyro.sample(f"x_{i}", dist.Normal(mu, 1.0), obs=data[i])


def sequential_subsample_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("mu", dist.Normal(m, 1.0))
    for _ in pyro.plate("seq", len(data), subsample_size=3):
        pass


SCALE_MASK = torch.tensor([True, False, True, True, False, True, True, True, False, True])


def scale_mask_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with poutine.scale(scale=0.3):
        with pyro.plate("data", len(data)):
            with poutine.mask(mask=SCALE_MASK):
                z = pyro.sample("z", dist.Normal(mu, 1.0))
                pyro.sample("x", dist.Normal(z, 0.5), obs=data)


def scale_mask_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with poutine.scale(scale=0.3):
        with pyro.plate("data", len(data)):
            with poutine.mask(mask=SCALE_MASK):
                pyro.sample("z", dist.Normal(z_loc, 0.8))


def obs_mask_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data, obs_mask=SCALE_MASK)


def obs_mask_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    x_loc = pyro.param("x_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x_unobserved", dist.Normal(x_loc, 1.0))


def factor_deterministic_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    pyro.deterministic("mu_squared", mu**2)
    pyro.factor("prior_shift", -0.5 * (mu - 1.0) ** 2)
    with pyro.plate("data", len(data)):
        pyro.factor("per_point", -0.1 * (data - mu).abs())
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


def factor_deterministic_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("mu", dist.Normal(m, 1.0))


def to_event_model(data=GRID):
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("rows", 2):
        pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=data)


def to_event_guide(data=GRID):
    loc = pyro.param("loc", torch.zeros(3))
    pyro.sample("z", dist.Normal(loc, 0.9).to_event(1))


def auxiliary_model(data=DATA):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def auxiliary_guide(data=DATA):
    loc = pyro.param("loc", torch.tensor(0.2))
    u = pyro.sample("u", dist.Normal(loc, 1.0), infer={"is_auxiliary": True})
    pyro.sample("z", dist.Normal(u, 0.5))


def gamma_dirichlet_model(data=DATA):
    rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
    w = pyro.sample("w", dist.Dirichlet(torch.ones(3)))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(w[0] - w[1], 1.0 / rate), obs=data)


def gamma_dirichlet_guide(data=DATA):
    a = pyro.param("a", torch.tensor(3.0), constraint=constraints.positive)
    conc = pyro.param("conc", torch.ones(3) * 2, constraint=constraints.positive)
    pyro.sample("rate", dist.Gamma(a, 1.5))
    pyro.sample("w", dist.Dirichlet(conc))


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2)

    def forward(self, x):
        out = self.net(x.unsqueeze(-1))
        return out[..., 0], torch.nn.functional.softplus(out[..., 1]) + 0.1


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)

    def forward(self, z):
        return self.net(z.unsqueeze(-1)).squeeze(-1)


ENCODER = _Encoder()
DECODER = _Decoder()


def module_model(data=DATA):
    decoder = pyro.module("decoder", DECODER)
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(decoder(z), 0.5), obs=data)


def module_guide(data=DATA):
    encoder = pyro.module("encoder", ENCODER)
    loc, scale = encoder(data)
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(loc, scale))


def discrete_model(data=DATA):
    probs = torch.tensor([0.2, 0.5, 0.3])
    locs = torch.tensor([-1.0, 0.0, 1.5])
    s = pyro.sample("s", dist.Bernoulli(0.4))
    with pyro.plate("data", len(data)):
        k = pyro.sample("k", dist.Categorical(probs))
        pyro.sample("x", dist.Normal(locs[k] + s, 1.0), obs=data)


def discrete_guide(data=DATA):
    p = pyro.param("p", torch.tensor(0.6), constraint=constraints.unit_interval)
    logits = pyro.param("k_logits", torch.zeros(len(data), 3))
    pyro.sample("s", dist.Bernoulli(p))
    with pyro.plate("data", len(data)):
        pyro.sample("k", dist.Categorical(logits=logits))


def mixed_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    with pyro.plate("data", len(data), subsample_size=5) as idx:
        b = pyro.sample("b", dist.Bernoulli(0.3))
        with poutine.scale(scale=0.5):
            pyro.sample("x", dist.Normal(mu + b, 1.0), obs=data[idx])


def mixed_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    b_logits = pyro.param("b_logits", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", len(data), subsample_size=5) as idx:
        pyro.sample("b", dist.Bernoulli(logits=b_logits[idx]))


def markov_model(data=DATA[:4]):
    z = torch.tensor(0.0)
    for t in pyro.markov(range(len(data))):
        z = pyro.sample(f"z_{t}", dist.Normal(0.9 * z, 1.0))
        pyro.sample(f"x_{t}", dist.Normal(z, 0.5), obs=data[t])


def markov_guide(data=DATA[:4]):
    locs = pyro.param("locs", torch.zeros(len(data)))
    for t in pyro.markov(range(len(data))):
        pyro.sample(f"z_{t}", dist.Normal(locs[t], 0.7))


def conditioned_model(data=DATA):
    return poutine.condition(local_model, data={"mu": torch.tensor(0.4)})(data)


def conditioned_guide(data=DATA):
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(z_loc, 0.8))


def subsample_indices_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data), subsample=torch.tensor([1, 4, 7])) as idx:
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])


def subsample_indices_guide(data=DATA):
    m = pyro.param("m", torch.tensor(0.1))
    z_loc = pyro.param("z_loc", torch.zeros(len(data)))
    pyro.sample("mu", dist.Normal(m, 1.0))
    with pyro.plate("data", len(data), subsample=torch.tensor([1, 4, 7])) as idx:
        pyro.sample("z", dist.Normal(z_loc[idx], 0.8))


def _hierarchical_model(data=DATA):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(mu, s))
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


reparam_model = poutine.reparam(_hierarchical_model, config={"z": LocScaleReparam(0.0)})


def block_model(data=DATA):
    with poutine.block(hide=["hidden"]):
        hidden = pyro.sample("hidden", dist.Normal(0.0, 1.0))
    mu = pyro.sample("mu", dist.Normal(hidden, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


def block_guide(data=DATA):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.1)), 1.0))


def empty_model():
    pass


def observed_only_model():
    loc = torch.zeros(2)
    pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=torch.tensor([0.3, -0.2]))


def plate_reuse_model():
    """Plate objects entered several times, alone and together (explicit dims)."""
    p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
    outer = pyro.plate("outer", 10, 5, dim=-1)
    inner = pyro.plate("inner", 11, 6, dim=-2)
    with outer as i:
        pyro.sample("x", dist.Bernoulli(p).expand_by([len(i)]))
    with inner as j:
        pyro.sample("y", dist.Bernoulli(p).expand_by([len(j), 1]))
    with outer as i, inner as j:
        pyro.sample("z", dist.Bernoulli(p).expand_by([len(j), len(i)]))


def plate_without_size_model():
    p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
    with pyro.plate("plate"):
        pyro.sample("x", dist.Bernoulli(p).expand_by([7]))


def nested_sequential_model(order="ij"):
    p = pyro.param("p", torch.tensor(0.4), constraint=constraints.unit_interval)
    outer, inner = pyro.plate("seq_0", 3, 2), pyro.plate("seq_1", 3, 2)
    pairs = [(i, j) for i in outer for j in inner]
    if order == "ji":
        pairs = [(i, j) for j in inner for i in outer]
    for i, j in pairs:
        pyro.sample(f"x_{i}_{j}", dist.Bernoulli(p))


def nested_sequential_swapped_guide():
    nested_sequential_model(order="ji")


def plate_in_model_only_model(data=DATA):
    for _ in pyro.plate("unused", 10, 5):
        pass
    normal_model(data)


def _autoguide(cls, model):
    guides = {}

    def guide(*args, **kwargs):
        if "guide" not in guides:
            guides["guide"] = cls(model)
        return guides["guide"](*args, **kwargs)

    return guide


VALID = {
    "normal": Case(normal_model, normal_guide, reparameterized=True),
    "local_plate": Case(local_model, local_guide, reparameterized=True),
    "nested_plates": Case(nested_model, nested_guide, reparameterized=True),
    "subsample": Case(subsample_model, subsample_guide, reparameterized=True),
    "sequential_plate": Case(sequential_model, sequential_guide, reparameterized=True),
    "sequential_subsample": Case(
        sequential_subsample_model, sequential_subsample_guide, reparameterized=True
    ),
    "scale_mask": Case(scale_mask_model, scale_mask_guide, reparameterized=True),
    "obs_mask": Case(obs_mask_model, obs_mask_guide, reparameterized=True),
    "factor_deterministic": Case(
        factor_deterministic_model, factor_deterministic_guide, reparameterized=True
    ),
    "to_event": Case(to_event_model, to_event_guide, reparameterized=True),
    "auxiliary": Case(auxiliary_model, auxiliary_guide, reparameterized=True),
    "gamma_dirichlet": Case(gamma_dirichlet_model, gamma_dirichlet_guide, reparameterized=True),
    "pyro_module": Case(module_model, module_guide, reparameterized=True),
    "markov": Case(markov_model, markov_guide, reparameterized=True),
    "conditioned": Case(conditioned_model, conditioned_guide, reparameterized=True),
    "auto_normal": Case(local_model, "AutoNormal", reparameterized=True),
    "auto_diagonal_normal": Case(nested_model, "AutoDiagonalNormal", reparameterized=True),
    "auto_delta": Case(local_model, "AutoDelta", reparameterized=True),
    "subsample_indices": Case(
        subsample_indices_model, subsample_indices_guide, reparameterized=True
    ),
    "loc_scale_reparam": Case(reparam_model, "AutoNormal", reparameterized=True),
    "poutine_block": Case(block_model, block_guide, reparameterized=True),
    "sequential_plate_vectorized_particles": Case(
        sequential_model,
        sequential_guide,
        elbo=dict(num_particles=3, vectorize_particles=True),
        reparameterized=True,
    ),
    "discrete": Case(discrete_model, discrete_guide),
    "mixed_subsample": Case(mixed_model, mixed_guide),
    "empty_model_and_guide": Case(empty_model, empty_model),
    "observed_only_empty_guide": Case(observed_only_model, empty_model),
    "plate_reuse_model_as_guide": Case(plate_reuse_model, plate_reuse_model),
    "plate_without_size": Case(plate_without_size_model, plate_without_size_model),
    "nested_sequential_swapped": Case(nested_sequential_model, nested_sequential_swapped_guide),
    "plate_in_model_only": Case(plate_in_model_only_model, normal_guide, reparameterized=True),
    "particles": Case(local_model, local_guide, elbo=dict(num_particles=3), reparameterized=True),
    "vectorized_particles": Case(
        nested_model,
        nested_guide,
        elbo=dict(num_particles=3, vectorize_particles=True, max_plate_nesting=2),
        reparameterized=True,
    ),
    "vectorized_particles_guessed": Case(
        mixed_model, mixed_guide, elbo=dict(num_particles=4, vectorize_particles=True)
    ),
    "max_plate_nesting_given": Case(
        discrete_model, discrete_guide, elbo=dict(max_plate_nesting=2)
    ),
}

_AUTOGUIDES = {"AutoNormal": AutoNormal, "AutoDiagonalNormal": AutoDiagonalNormal,
               "AutoDelta": AutoDelta}


def _guide(case: Case) -> Optional[Callable]:
    if isinstance(case.guide, str):
        return _autoguide(_AUTOGUIDES[case.guide], case.model)
    return case.guide


LOSSES = {
    "Trace_ELBO": Trace_ELBO,
    "TraceGraph_ELBO": TraceGraph_ELBO,
    "StorchELBO": storch.StorchELBO,
}


def _params() -> Dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained() for name in sorted(store.keys())}


def _loss_values(loss_cls, case: Case, seed: int) -> Dict[str, float]:
    """``loss``, ``differentiable_loss`` and ``loss_and_grads`` of a fresh loss object, each
    from the same seed and the same (initialized) parameters."""
    guide = _guide(case)
    pyro.set_rng_seed(100)
    pyro.clear_param_store()
    loss_cls(**case.elbo).loss(case.model, guide, *case.args)  # creates the params
    values = {}
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        if not hasattr(loss_cls, method):  # TraceGraph_ELBO has no differentiable_loss
            continue
        pyro.set_rng_seed(seed)
        value = getattr(loss_cls(**case.elbo), method)(case.model, guide, *case.args)
        values[method] = float(value.detach() if isinstance(value, torch.Tensor) else value)
    return values


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(VALID))
def test_valid_pair_same_loss_value_as_pyro(name, seed):
    case = VALID[name]
    reference = _loss_values(Trace_ELBO, case, seed)
    for loss_name in ("TraceGraph_ELBO", "StorchELBO"):
        values = _loss_values(LOSSES[loss_name], case, seed)
        for method, value in values.items():
            assert value == pytest.approx(reference[method], rel=1e-5, abs=1e-5), (
                loss_name, method)
    # Pyro's losses agree with themselves across entry points; so must ours.
    values = _loss_values(storch.StorchELBO, case, seed)
    assert values["differentiable_loss"] == pytest.approx(values["loss"], rel=1e-5, abs=1e-5)


def _gradients(loss_cls, case: Case, seed: int) -> Dict[str, torch.Tensor]:
    guide = _guide(case)
    pyro.set_rng_seed(100)
    pyro.clear_param_store()
    loss_cls(**case.elbo).loss(case.model, guide, *case.args)
    params = _params()
    pyro.set_rng_seed(seed)
    loss = loss_cls(**case.elbo).differentiable_loss(case.model, guide, *case.args)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(params.items(), grads)
    }


@pytest.mark.parametrize("name", [n for n, c in VALID.items() if c.reparameterized])
def test_reparameterized_pair_same_gradient_as_trace_elbo(name):
    case = VALID[name]
    expected = _gradients(Trace_ELBO, case, seed=3)
    actual = _gradients(storch.StorchELBO, case, seed=3)
    assert set(actual) == set(expected)
    for param, grad in expected.items():
        assert torch.allclose(actual[param], grad, rtol=1e-4, atol=1e-5), param


def plate_discrete_model(data=DATA):
    with pyro.plate("data", len(data)):
        b = pyro.sample("b", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(2.0 * b, 1.0), obs=data)


def plate_discrete_guide(data=DATA):
    logits = pyro.param("b_logits", torch.linspace(-1.0, 1.0, len(data)))
    with pyro.plate("data", len(data)):
        pyro.sample(
            "b", dist.Bernoulli(logits=logits),
            infer={"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}},
        )


@pytest.mark.parametrize("annotated", [False, True])
def test_score_function_gradient_is_tracegraphs_plus_the_zero_mean_log_q_term(annotated):
    """A discrete guide site in a plate, whose costs all depend on it per index: both
    losses give each index's score the same downstream cost (also with Pyro's decaying
    average baseline annotation, updated the same way over steps). Draw for draw the
    gradients then differ by exactly the direct gradient of the cost ``log q(b)``,
    :math:`\\nabla_\\phi \\log q(b) = b - \\sigma(\\phi)`, which has mean zero: TraceGraph_ELBO
    drops it (a non-reparameterized site's ``entropy_term`` is 0), StorchELBO keeps it
    (DiCE differentiates every cost)."""
    guide = plate_discrete_guide
    if not annotated:
        def guide(data=DATA):
            logits = pyro.param("b_logits", torch.linspace(-1.0, 1.0, len(data)))
            with pyro.plate("data", len(data)):
                pyro.sample("b", dist.Bernoulli(logits=logits))

    grads = {}
    for loss in (TraceGraph_ELBO(), storch.StorchELBO()):
        pyro.clear_param_store()
        steps = []
        for seed in range(3):
            pyro.set_rng_seed(seed)
            b = poutine.trace(guide).get_trace().nodes["b"]["value"]
            pyro.set_rng_seed(seed)
            loss.loss_and_grads(plate_discrete_model, guide)
            param = pyro.param("b_logits").unconstrained()
            log_q_term = b - torch.sigmoid(param.detach())
            if isinstance(loss, storch.StorchELBO):
                param.grad -= log_q_term
            steps.append(param.grad.clone())
            param.grad = None
        grads[type(loss).__name__] = torch.stack(steps)
    assert torch.allclose(grads["StorchELBO"], grads["TraceGraph_ELBO"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["normal", "discrete", "pyro_module", "auto_normal"])
def test_valid_pair_trains_in_svi_without_warnings(name):
    case = VALID[name]
    guide = _guide(case)
    svi = pyro.infer.SVI(case.model, guide, pyro.optim.Adam({"lr": 0.01}), storch.StorchELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            svi.step(*case.args)


# ---- invalid models ---------------------------------------------------------------------


def plate_dim_clash_model():
    with pyro.plate("a", 2, dim=-1):
        with pyro.plate("b", 3, dim=-1):
            pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.zeros(3))


def plate_broadcast_model():
    with pyro.plate("plate", 10, 5):
        pyro.sample("x", dist.Bernoulli(0.5).expand_by([2]), obs=torch.zeros(2))


def plate_dim_model():
    p = torch.tensor([0.5])
    with pyro.plate("outer", 10, 5) as i:
        pyro.sample("x", dist.Bernoulli(p).expand_by([len(i)]), obs=torch.zeros(5, 1))
        with pyro.plate("inner", 11, 6) as j:  # x above lacks the dim of "outer" at -1
            pyro.sample("y", dist.Bernoulli(p).expand_by([len(j)]), obs=torch.zeros(6, 1))


def empty_guide(*args, **kwargs):
    pass


def guide_extra_site(data=DATA):
    normal_guide(data)
    pyro.sample("extra", dist.Normal(0.0, 1.0))


def model_extra_site(data=DATA):
    normal_model(data)
    pyro.sample("unguided", dist.Normal(0.0, 1.0))


def undeclared_batch_model():
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))  # batch dim without a plate
    pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.5))


def undeclared_batch_guide():
    loc = pyro.param("loc", torch.zeros(3))
    pyro.sample("z", dist.Normal(loc, 1.0))


def duplicate_site_model():
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("z", dist.Normal(z, 1.0), obs=torch.tensor(0.5))


def duplicate_site_guide():
    pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))


def event_dim_mismatch_guide(data=GRID):
    loc = pyro.param("loc", torch.zeros(3))
    pyro.sample("z", dist.Normal(loc, 0.9))  # model: .to_event(1)


def shape_mismatch_guide(data=DATA):
    loc = pyro.param("loc", torch.zeros(len(data)))
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(loc[:4], 0.8))  # model: plate of 10


def reentered_plate_guide(data=DATA):
    normal_guide(data)
    with pyro.plate("twice", 3):
        pass
    with pyro.plate("twice", 3):  # reuse the plate object instead: poutine.trace raises
        pass


def guide_only_plate_model(data=DATA):
    normal_model(data)


def guide_only_plate_guide(data=DATA):
    normal_guide(data)
    with pyro.plate("guide_only", 3):
        pass


def enumerated_guide(data=DATA):
    p = pyro.param("p", torch.tensor(0.6), constraint=constraints.unit_interval)
    logits = pyro.param("k_logits", torch.zeros(len(data), 3))
    pyro.sample("s", dist.Bernoulli(p), infer={"enumerate": "parallel"})
    with pyro.plate("data", len(data)):
        pyro.sample("k", dist.Categorical(logits=logits))


def out_of_support_model():
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    pyro.sample("x", dist.Bernoulli(p), obs=torch.tensor(2.0))


def out_of_support_guide():
    a = pyro.param("a", torch.tensor(2.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, 2.0))


def auxiliary_in_model_model(data=DATA):
    u = pyro.sample("u", dist.Normal(0.0, 1.0))
    normal_model(data + 0 * u)


def auxiliary_in_model_guide(data=DATA):
    pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    normal_guide(data)


def factor_in_guide_model(data=DATA):
    normal_model(data)


def factor_in_guide_guide(data=DATA):
    normal_guide(data)
    pyro.factor("guide_factor", torch.tensor(0.3))


def bad_baseline_option_model(data=DATA):
    discrete_model(data)


def bad_baseline_option_guide(data=DATA):
    p = pyro.param("p", torch.tensor(0.6), constraint=constraints.unit_interval)
    pyro.sample("s", dist.Bernoulli(p), infer={"baseline": {"use_decaying_avg": True}})
    with pyro.plate("data", len(data)):
        pyro.sample("k", dist.Categorical(logits=torch.zeros(len(data), 3)))


MV_DATA = torch.full((3, 2), 7.0)
MV_MASK = torch.tensor([[False, False], [False, True], [True, False]])  # batch shape is (3,)


def obs_mask_multivariate_model(data=MV_DATA):
    """Pyro's ``test_valid_models.py::test_obs_mask_multivariate_error``: an ``obs_mask``
    with an event dim on a multivariate site."""
    x = pyro.sample("x", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
    with pyro.plate("plate", len(data)):
        pyro.sample("y", dist.MultivariateNormal(x, torch.eye(2)), obs=data, obs_mask=MV_MASK)


def obs_mask_multivariate_guide(data=MV_DATA):
    loc = pyro.param("loc", torch.zeros(2))
    x = pyro.sample("x", dist.MultivariateNormal(loc, torch.eye(2)))
    with pyro.plate("plate", len(data)):
        with poutine.mask(mask=~MV_MASK):  # as wrong as the model's: fails first in the guide
            pyro.sample("y_unobserved", dist.MultivariateNormal(x, torch.eye(2)))


@dataclass
class Invalid:
    """An invalid pair and what Pyro's losses (``references``) and ours do with it:
    ``("raises", exception type)`` or ``("warns", text in the message)``."""

    case: Case
    outcome: Tuple[str, Any]
    references: Tuple[str, ...] = ("Trace_ELBO", "TraceGraph_ELBO")
    methods: Tuple[str, ...] = ("loss", "differentiable_loss", "loss_and_grads")
    same_message: bool = True  # the first line of the message is Pyro's too


ENUMERATION_TEXT = "If you want to enumerate sites, you need to use TraceEnum_ELBO instead"

INVALID = {
    "plate_dim_clash": Invalid(Case(plate_dim_clash_model, empty_guide), ("raises", ValueError)),
    "guide_site_not_in_model": Invalid(
        Case(normal_model, guide_extra_site),
        ("warns", "Found non-auxiliary vars in guide but not model"),
    ),
    "model_site_not_in_guide": Invalid(
        Case(model_extra_site, normal_guide), ("warns", "Found vars in model but not guide")
    ),
    "max_plate_nesting_too_small": Invalid(
        Case(nested_model, nested_guide, elbo=dict(max_plate_nesting=1)),
        ("raises", ValueError),
    ),
    "undeclared_batch_dim": Invalid(
        Case(undeclared_batch_model, undeclared_batch_guide), ("raises", ValueError)
    ),
    "shape_mismatch_inside_plate": Invalid(
        Case(plate_broadcast_model, empty_guide), ("raises", ValueError)
    ),
    "site_shape_against_plate_dims": Invalid(
        Case(plate_dim_model, empty_guide), ("raises", ValueError)
    ),
    "duplicate_site": Invalid(
        Case(duplicate_site_model, duplicate_site_guide), ("raises", RuntimeError)
    ),
    "plate_reentered_by_name": Invalid(
        Case(normal_model, reentered_plate_guide), ("raises", RuntimeError)
    ),
    "event_dim_mismatch": Invalid(
        Case(to_event_model, event_dim_mismatch_guide), ("raises", ValueError)
    ),
    "shape_mismatch": Invalid(Case(local_model, shape_mismatch_guide), ("raises", ValueError)),
    "guide_only_plate": Invalid(
        Case(guide_only_plate_model, guide_only_plate_guide),
        ("warns", "Found plate statements in guide but not model"),
    ),
    "enumerate_annotation": Invalid(
        Case(discrete_model, enumerated_guide), ("warns", ENUMERATION_TEXT)
    ),
    "observation_out_of_support": Invalid(
        Case(out_of_support_model, out_of_support_guide), ("raises", ValueError)
    ),
    "auxiliary_in_model": Invalid(
        Case(auxiliary_in_model_model, auxiliary_in_model_guide),
        ("warns", "Found auxiliary vars in the model"),
    ),
    "factor_in_guide_without_has_rsample": Invalid(
        Case(factor_in_guide_model, factor_in_guide_guide), ("raises", ValueError)
    ),
    "obs_mask_multivariate_shape": Invalid(
        Case(obs_mask_multivariate_model, obs_mask_multivariate_guide), ("raises", ValueError)
    ),
    # Trace_ELBO ignores baseline annotations; TraceGraph_ELBO reads them for gradients only
    "unknown_baseline_option": Invalid(
        Case(bad_baseline_option_model, bad_baseline_option_guide),
        ("raises", ValueError),
        references=("TraceGraph_ELBO",),
        methods=("loss_and_grads",),
        same_message=False,
    ),
}

_INVALID_RUNS = [(name, method) for name, bad in INVALID.items() for method in bad.methods]


def _outcome(loss_cls, case: Case, method: str):
    """What running ``method`` of a fresh loss gives: ("raises", type, message) or
    ("warns", [messages]) or ("ok",)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            getattr(loss_cls(**case.elbo), method)(case.model, _guide(case), *case.args)
        except Exception as error:  # noqa: BLE001 - the outcome is what we compare
            return ("raises", type(error), str(error))
    messages = [str(w.message) for w in caught]
    return ("warns", messages) if messages else ("ok",)


@pytest.mark.parametrize("name, method", _INVALID_RUNS)
def test_invalid_pair_same_error_or_warning_as_pyro(name, method):
    bad = INVALID[name]
    kind, expected = bad.outcome
    ours = _outcome(storch.StorchELBO, bad.case, method)
    for loss_name in bad.references:
        if not hasattr(LOSSES[loss_name], method):  # TraceGraph_ELBO: no differentiable_loss
            continue
        outcome = _outcome(LOSSES[loss_name], bad.case, method)
        assert outcome[0] == kind, (loss_name, outcome)
        if kind == "raises":
            assert ours[0] == "raises", ours
            assert issubclass(ours[1], outcome[1]), (ours, loss_name, outcome)
            if bad.same_message:
                assert ours[2].splitlines()[0] == outcome[2].splitlines()[0], (ours, outcome)
        else:
            assert any(expected in message for message in outcome[1]), (loss_name, outcome)
    if kind == "raises":
        assert ours[0] == "raises" and issubclass(ours[1], expected), ours
    else:
        assert ours[0] == "warns", ours
        assert any(expected in message for message in ours[1]), ours


# ---- deliberate differences -------------------------------------------------------------


def nan_model(data=DATA):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.factor("broken", z * float("nan"))


def test_nan_loss_raises_where_pyro_warns():
    """With validation off (on, both raise Pyro's ValueError for the NaN factor), Pyro's
    losses warn (``warn_if_nan``) and return NaN; StorchELBO raises NonFiniteCostError
    naming the site, so training stops where the problem is."""
    with pyro.validation_enabled(False):
        with pytest.warns(UserWarning, match="Encountered NaN"):
            Trace_ELBO().loss_and_grads(nan_model, normal_guide)
        pyro.clear_param_store()
        with pytest.raises(NonFiniteCostError, match="broken"):
            storch.StorchELBO().loss_and_grads(nan_model, normal_guide)


def test_guide_messenger_raises_where_pyro_accepts_it():
    """GuideMessenger guides (AutoNormalMessenger, ...) sample inside the model; StorchELBO
    runs the guide before the model and says so instead of failing obscurely."""
    from pyro.infer.autoguide import AutoNormalMessenger

    guide = AutoNormalMessenger(normal_model)
    Trace_ELBO().loss(normal_model, guide)
    with pytest.raises(NotImplementedError, match="AutoNormal instead of AutoNormalMessenger"):
        storch.StorchELBO().loss(normal_model, guide)


# ---- other ways Pyro users drive a loss -------------------------------------------------


def test_elbo_module_with_a_torch_optimizer():
    """``elbo(model, guide)`` gives Pyro's ELBOModule: a torch module whose call is the
    differentiable loss and whose parameters are the param store's."""
    values = {}
    for loss_cls in (Trace_ELBO, storch.StorchELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        # max_plate_nesting given: unknown, StorchELBO's first call guesses it with a run
        # that initializes AutoNormal's parameters from the random number generator, so the
        # values would differ from Trace_ELBO's by the draw (not in distribution).
        loss = loss_cls() if loss_cls is Trace_ELBO else loss_cls(max_plate_nesting=1)
        module = loss(local_model, AutoNormal(local_model))
        pyro.set_rng_seed(1)
        loss = module(DATA)
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        loss.backward()
        optimizer.step()
        values[loss_cls.__name__] = float(loss.detach())
        assert len(list(module.parameters())) == 4  # AutoNormal: loc and scale of mu and z
    assert values["StorchELBO"] == pytest.approx(values["Trace_ELBO"], rel=1e-5)


class _PyroModuleModel(pyro.nn.PyroModule):
    def __init__(self):
        super().__init__()
        self.prior_loc = pyro.nn.PyroParam(torch.tensor(0.2))
        self.mu = pyro.nn.PyroSample(lambda self: dist.Normal(self.prior_loc, 1.0))

    def forward(self, data=DATA):
        mu = self.mu
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


def test_pyro_module_model_trains_like_under_trace_elbo():
    losses = {}
    for loss_cls in (Trace_ELBO, storch.StorchELBO):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = _PyroModuleModel()
        loss = loss_cls() if loss_cls is Trace_ELBO else loss_cls(max_plate_nesting=1)  # see above
        svi = pyro.infer.SVI(model, AutoNormal(model), pyro.optim.Adam({"lr": 0.05}), loss)
        losses[loss_cls.__name__] = [svi.step() for _ in range(3)]
        losses[loss_cls.__name__].append(float(model.prior_loc.detach()))
    assert losses["StorchELBO"] == pytest.approx(losses["Trace_ELBO"], rel=1e-5)
