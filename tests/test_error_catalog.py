"""The bad-input catalogue, ``docs/errors.rst``, is true: every user error it lists is raised
(or warned) with the documented type and message, the message names the site (or the
argument) and the remedy, and every entry of the catalogue is tested here (and vice versa).

``tests/test_errors.py`` tests the same errors from more angles (several ways to reach
each); this file checks the catalogue and the shape of every message. Errors found by
Pyro's own model/guide checks are catalogued as one entry and tested pair by pair in
``tests/test_dropin.py``.
"""

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Type

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.errors import (
    MaskShapeError,
    NonFiniteCostError,
    StorchError,
    UnsupportedDistributionError,
    UnusedConfigWarning,
)

CATALOGUE = Path(__file__).resolve().parent.parent / "docs" / "errors.rst"


@dataclass
class Entry:
    """A catalogued error: how to trigger it, what it raises (or warns), what the message
    must name (the site, or the argument where there is no site yet) and the remedy."""

    trigger: Callable[[], None]
    error: Type[BaseException]
    names: str
    remedy: str
    warning: bool = False


def _elbo_step(model, guide=None, **kwargs):
    storch.StorchELBO(**kwargs).loss_and_grads(model, guide)


# ---- triggers ---------------------------------------------------------------------------


def _unsupported_distribution():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        b = storch.sample("coin", dist.Bernoulli(p), estimator=estimators.Pathwise())
        storch.add_cost("c", b)

    _elbo_step(model)


def _sum_and_sample_too_large():
    def model():
        logits = pyro.param("logits", torch.zeros(3))
        estimator = estimators.SumAndSample(4)
        z = storch.sample("k", dist.Categorical(logits=logits), estimator=estimator)
        storch.add_cost("c", z.float())

    _elbo_step(model)


def _unordered_set_too_large():
    def model():
        logits = pyro.param("logits", torch.zeros(3))
        z = storch.sample(
            "k", dist.Categorical(logits=logits), estimator=estimators.UnorderedSet(4)
        )
        storch.add_cost("c", z.float())

    _elbo_step(model)


def _non_finite_sample_weights():
    def model():
        logits = torch.tensor([0.0, 0.0, -float("inf")])  # two possible categories
        z = storch.sample(
            "k", dist.Categorical(logits=logits), estimator=estimators.UnorderedSet(3)
        )
        storch.add_cost("c", z.float())

    _elbo_step(model)


def _unused_config():
    def model():
        z = pyro.sample("z", dist.Bernoulli(pyro.param("p", torch.tensor(0.3))))
        storch.add_cost("c", z)

    with handlers.estimator(config={"zz": estimators.ScoreFunction()}):
        _elbo_step(model)


def _sample_estimator_type():
    storch.sample("z", dist.Normal(0.0, 1.0), estimator="score_function")


def _sample_baseline_type():
    storch.sample("z", dist.Normal(0.0, 1.0), baseline="moving_average")


def _config_value_type():
    handlers.estimator(config={"z": "score_function"})


def _config_key_type():
    handlers.baseline(config={("z",): baselines.MovingAverage()})


def _config_type():
    handlers.estimator(config=[("z", estimators.ScoreFunction())])


def _callable_config_returns_wrong_type():
    def model():
        z = pyro.sample("z", dist.Bernoulli(pyro.param("p", torch.tensor(0.3))))
        storch.add_cost("c", z)

    with handlers.estimator(config=lambda msg: "score_function"):
        _elbo_step(model)


def _default_estimator_type():
    storch.StorchELBO(default_estimator=estimators.ScoreFunction)


def _credit_value():
    storch.StorchELBO(credit="dataflow")


def _data_flow_lost():
    scale = torch.tensor(2.0, requires_grad=True)

    def model():
        z = storch.sample("z", dist.Bernoulli(torch.tensor(0.3)))
        with torch._C.DisableTorchFunction():  # an op the provenance mode cannot see
            hidden = z * scale
        storch.add_cost("c", hidden)

    _elbo_step(model, credit="data_flow")


def _leave_one_out_one_sample():
    def model():
        z = storch.sample(
            "z",
            dist.Bernoulli(pyro.param("p", torch.tensor(0.3))),
            estimator=estimators.ScoreFunction(baseline=baselines.LeaveOneOut()),
        )
        storch.add_cost("c", z)

    _elbo_step(model)


def _baseline_without_score_term():
    def model():
        z = storch.sample(
            "z",
            dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0),
            baseline=baselines.MovingAverage(),
        )
        storch.add_cost("c", z**2)

    _elbo_step(model)


class _PerPointColumn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x)  # (5, 1): one column too many for the site's shape (5,)


def _baseline_shape():
    def model(x):
        with pyro.plate("data", 5):
            z = storch.sample(
                "z",
                dist.Bernoulli(pyro.param("p", torch.tensor(0.3))),
                estimator=estimators.ScoreFunction(),
                baseline=baselines.Learned(_PerPointColumn()),
            )
            storch.add_cost("c", z)

    storch.StorchELBO().loss_and_grads(model, None, torch.randn(5, 2))


def _non_finite_cost():
    def model():
        z = pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        storch.add_cost("ratio", z / torch.tensor(0.0))

    _elbo_step(model)


def _sample_dim_collision():
    def model():
        z = storch.sample(
            "z",
            dist.Normal(pyro.param("loc", torch.zeros(3)), 1.0),
            estimator=estimators.ScoreFunction(n_samples=2),
        )
        storch.add_cost("c", z.sum())

    with pyro.validation_enabled(False):  # with validation, Pyro's shape check comes first
        _elbo_step(model, max_plate_nesting=0)


def _plate_beyond_nesting():
    def model():
        with pyro.plate("rows", 2, dim=-2), pyro.plate("cols", 3, dim=-1):
            z = storch.sample(
                "z",
                dist.Bernoulli(pyro.param("p", torch.tensor(0.3))),
                estimator=estimators.ScoreFunction(n_samples=4),
            )
            storch.add_cost("c", z)

    _elbo_step(model, max_plate_nesting=1)


def _too_many_batch_dims():
    def model():
        with pyro.plate("p", 3):
            z = storch.sample(
                "z",
                dist.Normal(pyro.param("loc", torch.zeros(1, 1, 3)), 1.0),
                estimator=estimators.ScoreFunction(n_samples=2),
            )
        storch.add_cost("c", z.sum())

    _elbo_step(model, max_plate_nesting=1)


def _enumerated_cost_outside_plate():
    def model():
        with pyro.plate("p", 3):
            z = storch.sample(
                "z",
                dist.Bernoulli(pyro.param("p_z", torch.full((3,), 0.3))),
                estimator=estimators.Enumerate(),
            )
        storch.add_cost("total", z.sum(-1, keepdim=True))

    _elbo_step(model)


def _pyro_baseline_option():
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5))
        pyro.sample("z", dist.Bernoulli(p), infer={"baseline": {"use_decaying_avg": True}})

    _elbo_step(model, guide)


def _pyro_baseline_value_and_nn():
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5))
        options = {"nn_baseline": torch.nn.Linear(1, 1), "nn_baseline_input": torch.ones(1),
                   "baseline_value": torch.tensor(0.1)}
        pyro.sample("z", dist.Bernoulli(p), infer={"baseline": options})

    _elbo_step(model, guide)


def _add_cost_name_type():
    storch.add_cost(("c",), torch.tensor(1.0))


def _add_cost_value_type():
    storch.add_cost("c", "expensive")


def _add_cost_plate_shape():
    def model():
        with pyro.plate("data", 3):
            storch.add_cost("fit", torch.ones(5))

    _elbo_step(model)


def _cost_lost_sample_dim():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        z = storch.sample("z", dist.Bernoulli(p), estimator=estimators.ScoreFunction(n_samples=4))
        storch.add_cost("total", (z * 2.0).sum())

    _elbo_step(model)


def _observation_out_of_support():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        pyro.sample("coin", dist.Bernoulli(p), obs=torch.tensor(2.0))

    _elbo_step(model)


def _mask_shape():
    def model():
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))

    def guide():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 3), poutine.mask(mask=torch.ones(3, 2, dtype=torch.bool)):
            pyro.sample("z", dist.Normal(loc, 1.0))

    _elbo_step(model, guide)


class _PerElementColumn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)

    def forward(self, z):
        return self.linear(z.unsqueeze(-1))  # (..., 1): a trailing dim too many


def _control_variate_shape():
    def model():
        logits = pyro.param("logits", torch.zeros(3))
        with pyro.plate("data", 3):
            b = storch.sample(
                "b", dist.Bernoulli(logits=logits),
                estimator=estimators.RELAX(_PerElementColumn()),
            )
            storch.add_cost("c", b)

    _elbo_step(model)


def _control_term_below_relaxed():
    def model():
        logits = pyro.param("logits", torch.zeros(()))
        a = storch.sample("a", dist.Bernoulli(logits=logits), estimator=estimators.REBAR())
        b = storch.sample(
            "b", dist.Bernoulli(logits=logits + a), estimator=estimators.ARM()
        )
        storch.add_cost("c", a + b)

    _elbo_step(model)


def _lax_on_discrete():
    def model():
        logits = pyro.param("logits", torch.zeros(()))
        b = storch.sample(
            "b", dist.Bernoulli(logits=logits),
            estimator=estimators.LAX(_PerElementColumn()),
        )
        storch.add_cost("c", b)

    _elbo_step(model)


def _relaxed_density_family():
    def model():
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        logits = pyro.param("logits", torch.zeros(()))
        storch.sample("b", dist.Bernoulli(logits=logits), estimator=estimators.REBAR())

    _elbo_step(model, guide)


def _temperature_schedule():
    estimator = estimators.GumbelSoftmax(lambda step: 1.0 - step)

    def model():
        logits = pyro.param("logits", torch.zeros(3))
        z = storch.sample("z", dist.OneHotCategorical(logits=logits), estimator=estimator)
        storch.add_cost("c", z[..., 0])

    _elbo_step(model)
    _elbo_step(model)


def _measure_valued_cost_outside_plate():
    def model():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("data", 3):
            z = storch.sample("z", dist.Normal(loc, 1.0), estimator=estimators.MeasureValued())
        storch.add_cost("total", (z.sum(-1, keepdim=True) > 0.5).float())

    _elbo_step(model)


def _measure_valued_higher_order():
    loc = pyro.param("loc", torch.tensor(0.0))

    def model():
        z = storch.sample("z", dist.Normal(loc, 1.0), estimator=estimators.MeasureValued())
        storch.add_cost("c", z**2)

    loss = storch.StorchELBO().differentiable_loss(model, None)
    torch.autograd.grad(loss, [loc], create_graph=True)


def _iwelbo_coin_model():
    pyro.sample("z", dist.Bernoulli(0.5))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))


def _vimco_under_storch_elbo():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        z = storch.sample(
            "z", dist.Bernoulli(p), estimator=estimators.ScoreFunction(),
            baseline=baselines.VIMCO(),
        )
        storch.add_cost("c", z)

    _elbo_step(model)


def _iwelbo_estimator():
    def guide():
        logits = pyro.param("logits", torch.tensor(0.0))
        storch.sample("z", dist.Bernoulli(logits=logits), estimator=estimators.ARM())

    storch.IWELBO(num_particles=3).loss_and_grads(_iwelbo_coin_model, guide)


def _iwelbo_baseline():
    def guide():
        logits = pyro.param("logits", torch.tensor(0.0))
        storch.sample("z", dist.Bernoulli(logits=logits), baseline=baselines.MovingAverage())

    storch.IWELBO(num_particles=3).loss_and_grads(_iwelbo_coin_model, guide)


def _iwelbo_add_cost():
    def guide():
        z = pyro.sample("z", dist.Bernoulli(logits=pyro.param("logits", torch.tensor(0.0))))
        storch.add_cost("penalty", z)

    storch.IWELBO(num_particles=3).loss_and_grads(_iwelbo_coin_model, guide)


def _iwelbo_latent_not_in_guide():
    storch.IWELBO(num_particles=3).loss_and_grads(_iwelbo_coin_model, None)


def _constructor_argument():
    estimators.ScoreFunction(n_samples=0)


def _pyro_model_guide_check():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))  # a batch dim without a plate
        pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.zeros(3)), 1.0))

    _elbo_step(model, guide)


def _sync_state_type():
    storch.StorchELBO(sync_state="gloo")


def _sync_state_not_initialized():
    def story():
        storch.add_cost("c", storch.sample("z", dist.Normal(torch.zeros(()), 1.0)) ** 2)

    storch.StorchELBO(sync_state=True, max_plate_nesting=0).differentiable_loss(story, None)


def _sync_state_shapes():
    from storch_pyro.distributed import StateSync

    name = "__baseline_avg_downstream_cost_z"
    StateSync._average(name, [torch.zeros(2), torch.zeros(3)], None)


def _guide_messenger():
    from pyro.infer.autoguide import AutoNormalMessenger

    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    _elbo_step(model, AutoNormalMessenger(model))


def _markov_window_site():
    def model():
        a = storch.sample("z_0", dist.Categorical(logits=torch.zeros(2)))
        b = storch.sample("z_1", dist.Categorical(logits=torch.zeros(2, 2)[a]))
        for t in pyro.markov(range(2, 5)):  # history=1, but z_t depends on z_{t-2}
            a, b = b, storch.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[a]))
            storch.add_cost(f"c_{t}", b.float())

    _elbo_step(model, max_plate_nesting=0, default_estimator=estimators.Enumerate())


def _markov_window_cost():
    def model():
        kept = []
        older = newer = storch.sample("z_0", dist.Categorical(logits=torch.zeros(2)))
        for t in pyro.markov(range(1, 5)):
            older, newer = newer, storch.sample(
                f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[newer]))
            if t == 2:
                kept.append(older)
            if t == 4:
                storch.add_cost("late", (newer + kept[0]).float())

    _elbo_step(model, max_plate_nesting=0, default_estimator=estimators.Enumerate())


def _enumerated_chain_baseline():
    def model():
        z = torch.tensor(0)
        for t in pyro.markov(range(3)):
            estimator = estimators.Enumerate() if t == 0 else estimators.ScoreFunction(
                baseline=baselines.MovingAverage())
            z = storch.sample(f"z_{t}", dist.Categorical(logits=torch.zeros(2, 2)[z]),
                              estimator=estimator)
            storch.add_cost(f"c_{t}", z.float())

    _elbo_step(model, max_plate_nesting=0)


def _model_enumeration_sampled_site():
    def model():
        z = storch.sample("z", dist.Categorical(logits=torch.zeros(2)),
                          estimator=estimators.Enumerate())
        y = storch.sample("y", dist.Normal(z.float(), 1.0), estimator=estimators.Pathwise())
        pyro.sample("x", dist.Normal(y, 1.0), obs=torch.tensor(0.5))

    _elbo_step(model, lambda: None, max_plate_nesting=0)


def _guide_chain_step(model, plated=False, enumerated=("z_0", "z_1", "z_2", "z_3")):
    from tests import test_guide_enum_chain as chains

    guide = chains._plated_guide if plated else chains._chain_guide()
    config = {name: estimators.Enumerate() for name in enumerated}
    with handlers.estimator(config=config):
        _elbo_step(model, guide, max_plate_nesting=1)


def _guide_chain_windows():
    from tests.test_guide_enum_chain import _order_model

    _guide_chain_step(_order_model)


def _guide_chain_model_enumerated():
    from tests.test_guide_enum_chain import _enumerating_model

    _guide_chain_step(_enumerating_model, enumerated=("z_0", "z_1", "z_2", "z_3", "w"))


def _guide_chain_model_sampled():
    from tests.test_guide_enum_chain import _sampling_model

    _guide_chain_step(_sampling_model)


def _guide_chain_cost_outside_plate():
    from tests.test_guide_enum_chain import _unplated_cost_model

    _guide_chain_step(_unplated_cost_model, plated=True)


def _sum_and_sample_chain():
    from tests.test_enum_chain import _sum_and_sample_on_enumerated_chain

    storch.StorchELBO(max_plate_nesting=0).loss(_sum_and_sample_on_enumerated_chain(4), None)


def _sequence_step(body, **kwargs):
    def model():
        with handlers.sequence("translation", **kwargs):
            body()

    storch.StorchELBO(max_plate_nesting=0).differentiable_loss(model, None)


def _sequence_nested():
    def body():
        with handlers.sequence("inner"):
            pyro.sample("tok_0", dist.Categorical(logits=torch.zeros(3)))

    _sequence_step(body)


def _sequence_site_estimator():
    _sequence_step(lambda: storch.sample("tok_0", dist.Categorical(logits=torch.zeros(3)),
                                         estimator=estimators.ScoreFunction()))


def _sequence_too_many_samples():
    _sequence_step(lambda: pyro.sample("tok_0", dist.Categorical(logits=torch.zeros(3))),
                   estimator=estimators.UnorderedSet(4))


def _sequence_rows():
    def body():
        pyro.sample("tok_0", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("tok_0_beam_1", dist.Categorical(logits=torch.zeros(2, 3)))

    _sequence_step(body, estimator=estimators.UnorderedSet(4))


def _sequence_step_distribution():
    _sequence_step(lambda: pyro.sample("tok_0", dist.Normal(0.0, 1.0)))


def _sequence_estimator():
    handlers.sequence("translation", estimator=estimators.ARM())


def _sequence_reorder_first():
    def model():
        state = torch.zeros(3)
        with handlers.sequence("translation") as seq:
            for t in pyro.markov(range(2)):
                state = seq.reorder(state)
                tok = pyro.sample(f"tok_{t}", dist.Categorical(logits=state))
                state = state + tok

    storch.StorchELBO().differentiable_loss(model, None)


def _sequence_in_guide():
    def guide():
        with handlers.sequence("translation"):
            pyro.sample("tok_0", dist.Categorical(logits=torch.zeros(3)))

    storch.StorchELBO().differentiable_loss(
        lambda: pyro.sample("tok_0", dist.Categorical(logits=torch.zeros(3))), guide)


ENTRIES = {
    "unsupported-distribution": Entry(
        _unsupported_distribution, UnsupportedDistributionError, "'coin'",
        "Choose one with storch_pyro.sample(..., estimator=...)",
    ),
    "sum-and-sample-k": Entry(
        _sum_and_sample_too_large, UnsupportedDistributionError, "'k'", "use k <= 3"
    ),
    "unordered-set-n-samples": Entry(
        _unordered_set_too_large, UnsupportedDistributionError, "'k'", "use n_samples <= 3"
    ),
    "non-finite-sample-weights": Entry(
        _non_finite_sample_weights, NonFiniteCostError, "'k'", "Lower n_samples there"
    ),
    "unused-config": Entry(
        _unused_config, UnusedConfigWarning, "['zz']", "check the spelling", warning=True
    ),
    "sample-estimator-type": Entry(
        _sample_estimator_type, TypeError, "'z'", "(e.g. estimators.ScoreFunction())"
    ),
    "sample-baseline-type": Entry(
        _sample_baseline_type, TypeError, "'z'", "(e.g. baselines.MovingAverage())"
    ),
    "config-value-type": Entry(
        _config_value_type, TypeError, "'z'", "(e.g. estimators.ScoreFunction())"
    ),
    "config-key-type": Entry(_config_key_type, TypeError, "('z',)", "write {'site_name': ...}"),
    "config-type": Entry(_config_type, TypeError, "config", "must be a dict"),
    "callable-config-value-type": Entry(
        _callable_config_returns_wrong_type, TypeError, "'z'",
        "(e.g. estimators.ScoreFunction())",
    ),
    "default-estimator-type": Entry(
        _default_estimator_type, TypeError, "default_estimator", "must be a storch_pyro Estimator"
    ),
    "sync-state-type": Entry(_sync_state_type, TypeError, "sync_state", "got str"),
    "sync-state-not-initialized": Entry(
        _sync_state_not_initialized, StorchError, "sync_state", "init_process_group"
    ),
    "sync-state-shapes": Entry(
        _sync_state_shapes, StorchError, "'__baseline_avg_downstream_cost_z'",
        "Give every process the same batch size"
    ),
    "credit-value": Entry(_credit_value, ValueError, "credit", "must be 'order' or 'data_flow'"),
    "data-flow-lost": Entry(
        _data_flow_lost, RuntimeWarning, "'c'", "credit='order'", warning=True
    ),
    "leave-one-out-one-sample": Entry(
        _leave_one_out_one_sample, StorchError, "'z'", "with k >= 2"
    ),
    "baseline-without-score": Entry(
        _baseline_without_score_term, StorchError, "'z'", "Remove the baseline"
    ),
    "baseline-shape": Entry(_baseline_shape, StorchError, "'z'", "squeeze a trailing dim"),
    "non-finite-cost": Entry(
        _non_finite_cost, NonFiniteCostError, "'ratio'", "Check the parameters and data"
    ),
    "sample-dim-collision": Entry(
        _sample_dim_collision, StorchError, "'z'", "Declare batch dims with pyro.plate"
    ),
    "plate-beyond-nesting": Entry(
        _plate_beyond_nesting, StorchError, "'z'", "to at least 2"
    ),
    "too-many-batch-dims": Entry(
        _too_many_batch_dims, StorchError, "'z'", "squeeze its leading dims of size 1"
    ),
    "enumerated-cost-outside-plate": Entry(
        _enumerated_cost_outside_plate, StorchError, "'total'", "Move 'total' inside them"
    ),
    "markov-window-site": Entry(
        _markov_window_site, StorchError, "'z_4'", "pyro.markov(..., history=...)"
    ),
    "markov-window-cost": Entry(
        _markov_window_cost, StorchError, "'late'", "widen the window"
    ),
    "enumerated-chain-baseline": Entry(
        _enumerated_chain_baseline, StorchError, "'z_1'", "Use ScoreFunction() without a"
    ),
    "model-enumeration-sampled-site": Entry(
        _model_enumeration_sampled_site, StorchError, "'y'", "draw it in the guide"
    ),
    "sum-and-sample-chain": Entry(
        _sum_and_sample_chain, StorchError, "'y_1'", "Use Enumerate() there"
    ),
    "guide-chain-windows": Entry(
        _guide_chain_windows, StorchError, "'pair'", "Widen the guide's window"
    ),
    "guide-chain-model-enumerated": Entry(
        _guide_chain_model_enumerated, StorchError, "'w'", "Enumerate 'w' in the guide too"
    ),
    "guide-chain-model-sampled": Entry(
        _guide_chain_model_sampled, StorchError, "'w'", "Draw 'w' in the guide"
    ),
    "guide-chain-cost-outside-plate": Entry(
        _guide_chain_cost_outside_plate, StorchError, "'total'", "Compute it inside those plates"
    ),
    "pyro-baseline-option": Entry(
        _pyro_baseline_option, StorchError, "'z'", "use only ['baseline_beta'"
    ),
    "pyro-baseline-value-and-nn": Entry(
        _pyro_baseline_value_and_nn, StorchError, "'z'", "give one of them"
    ),
    "add-cost-name-type": Entry(_add_cost_name_type, TypeError, "name", "must be a str"),
    "add-cost-value-type": Entry(
        _add_cost_value_type, TypeError, "'c'", "compute it with torch"
    ),
    "add-cost-plate-shape": Entry(
        _add_cost_plate_shape, StorchError, "'fit'", "Compute the cost per element of the plate"
    ),
    "cost-lost-sample-dim": Entry(
        _cost_lost_sample_dim, StorchError, "'total'", "keepdim=True"
    ),
    "log-prob-error": Entry(
        _observation_out_of_support, ValueError, "'coin'", "is in the support of the site's"
    ),
    "mask-shape": Entry(_mask_shape, MaskShapeError, "'z'", "one value per batch element"),
    "control-variate-shape": Entry(
        _control_variate_shape, StorchError, "'b'", "squeeze a trailing dim of size 1"
    ),
    "control-term-below-relaxed": Entry(
        _control_term_below_relaxed, StorchError, "'b'", "Give 'b' a score-function"
    ),
    "lax-on-discrete": Entry(
        _lax_on_discrete, UnsupportedDistributionError, "'b'", "For discrete sites use"
    ),
    "relaxed-density-family": Entry(
        _relaxed_density_family, StorchError, "'b'", "Use the same family in both"
    ),
    "temperature-schedule": Entry(
        _temperature_schedule, ValueError, "'z'", "make it return a value > 0"
    ),
    "measure-valued-cost-outside-plate": Entry(
        _measure_valued_cost_outside_plate, StorchError, "'z'", "Compute 'total' inside"
    ),
    "measure-valued-higher-order": Entry(
        _measure_valued_higher_order, StorchError, "'z'", "Use ScoreFunction, Pathwise"
    ),
    "vimco-needs-iwelbo": Entry(
        _vimco_under_storch_elbo, StorchError, "'z'", "needs storch_pyro.IWELBO(num_particles=K)"
    ),
    "iwelbo-estimator": Entry(
        _iwelbo_estimator, StorchError, "'z'", "Use one of these at 'z'"
    ),
    "iwelbo-baseline": Entry(
        _iwelbo_baseline, StorchError, "'z'", "Remove the baseline (VIMCO() is the default)"
    ),
    "iwelbo-add-cost": Entry(
        _iwelbo_add_cost, StorchError, "'penalty'", "Use pyro.factor('penalty', -cost)"
    ),
    "iwelbo-latent-not-in-guide": Entry(
        _iwelbo_latent_not_in_guide, StorchError, "'z'", "Add it to the guide"
    ),
    "constructor-argument": Entry(
        _constructor_argument, ValueError, "n_samples", "must be a positive int"
    ),
    "guide-messenger": Entry(
        _guide_messenger, NotImplementedError, "AutoNormalMessenger", "Use a callable guide"
    ),
    "pyro-model-guide-checks": Entry(
        _pyro_model_guide_check, ValueError, '"z"', "enclose the batched tensor in a"
    ),
    "sequence-nested": Entry(
        _sequence_nested, StorchError, "'inner'", "Draw the inner choices as steps"
    ),
    "sequence-site-estimator": Entry(
        _sequence_site_estimator, StorchError, "'tok_0'", "drop it at the site"
    ),
    "sequence-too-many-samples": Entry(
        _sequence_too_many_samples, StorchError, "'translation'", "Lower n_samples"
    ),
    "sequence-rows": Entry(
        _sequence_rows, StorchError, "'tok_0_beam_1'", "Draw ONE site per step"
    ),
    "sequence-step-distribution": Entry(
        _sequence_step_distribution, UnsupportedDistributionError, "'tok_0'",
        "draw other variables outside"
    ),
    "sequence-estimator": Entry(
        _sequence_estimator, StorchError, "'translation'", "use ScoreFunction, UnorderedSet"
    ),
    "sequence-reorder-first": Entry(
        _sequence_reorder_first, StorchError, "'translation'", "Call it right after each sample"
    ),
    "sequence-in-guide": Entry(
        _sequence_in_guide, StorchError, "'translation'", "StorchELBO with guide=None"
    ),
}


def _raise(entry: Entry) -> BaseException:
    if entry.warning:
        with pytest.warns(entry.error) as record:
            entry.trigger()
        return record[0].message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(entry.error) as info:
            entry.trigger()
    return info.value


@pytest.mark.parametrize("key", list(ENTRIES))
def test_error_type_and_message_names_site_and_remedy(key):
    entry = ENTRIES[key]
    message = str(_raise(entry))
    assert entry.names in message, message
    assert entry.remedy in message, message


def _documented() -> dict:
    """``{key: (type name, message)}`` from the catalogue's ``.. _error-<key>:`` sections."""
    text = CATALOGUE.read_text()
    sections = re.split(r"^\.\. _error-", text, flags=re.M)[1:]
    documented = {}
    for section in sections:
        key = section.split(":", 1)[0]
        kind = re.search(r"^:(?:exception|warning): ``([\w.]+)``", section, flags=re.M)
        block = re.search(r"\.\. code-block:: text\n\n((?:   .*\n|\n)+)", section)
        documented[key] = (
            kind.group(1) if kind else None,
            " ".join(block.group(1).split()) if block else None,
        )
    return documented


def test_catalogue_lists_exactly_the_tested_errors():
    assert sorted(_documented()) == sorted(ENTRIES)


@pytest.mark.parametrize("key", list(ENTRIES))
def test_catalogue_shows_the_real_type_and_message(key):
    entry = ENTRIES[key]
    kind, documented = _documented()[key]
    error = _raise(entry)
    assert kind is not None and kind.split(".")[-1] == entry.error.__name__
    assert isinstance(error, entry.error)
    # "<...>" in the catalogue stands for any text (e.g. the list of registered estimators)
    pattern = ".*".join(re.escape(part) for part in documented.split("<...>"))
    assert re.fullmatch(pattern, " ".join(str(error).split())), (documented, str(error))
