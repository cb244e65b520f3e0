"""User errors give clear exceptions that name the site and the remedy; importing storch_pyro
changes no global torch or Pyro setting."""

import json
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.errors import (
    NonFiniteCostError,
    StorchError,
    UnsupportedDistributionError,
    UnusedConfigWarning,
)


def _loss_and_grads(model, guide=None, **elbo_kwargs):
    return storch.StorchELBO(**elbo_kwargs).loss_and_grads(model, guide)


def test_error_hierarchy():
    assert issubclass(UnsupportedDistributionError, StorchError)
    assert issubclass(NonFiniteCostError, StorchError)
    assert issubclass(UnusedConfigWarning, UserWarning)


# ---- unsupported distributions ----------------------------------------------------------


def _bernoulli_model():
    p = pyro.param("p", torch.tensor(0.3))
    b = storch.sample("my_coin", dist.Bernoulli(p), estimator=estimators.Pathwise())
    storch.add_cost("c", b)


def test_pathwise_on_bernoulli_names_site_distribution_and_remedy():
    with pytest.raises(UnsupportedDistributionError) as info:
        _loss_and_grads(_bernoulli_model)
    message = str(info.value)
    assert "my_coin" in message
    assert "Bernoulli" in message
    assert "ScoreFunction" in message


def test_pathwise_on_bernoulli_via_handler_and_default():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("coins", 3):
            b = pyro.sample("coins_b", dist.Bernoulli(p))
        storch.add_cost("c", b.sum())

    with pytest.raises(UnsupportedDistributionError, match="coins_b"):
        with handlers.estimator(config={"coins_b": estimators.Pathwise()}):
            _loss_and_grads(model)
    with pytest.raises(UnsupportedDistributionError, match="Bernoulli"):
        _loss_and_grads(model, default_estimator=estimators.Pathwise())


def test_pathwise_on_wrapped_bernoulli_names_base_distribution():
    def model():
        d = dist.Bernoulli(torch.full((2,), 0.4)).to_event(1)
        b = storch.sample("wrapped", d, estimator=estimators.Pathwise())
        storch.add_cost("c", b.sum())

    with pytest.raises(UnsupportedDistributionError) as info:
        _loss_and_grads(model)
    assert "wrapped" in str(info.value)
    assert "Bernoulli" in str(info.value)


def test_unsupported_distribution_error_is_also_a_type_error():
    with pytest.raises(TypeError):
        _loss_and_grads(_bernoulli_model)


# ---- baselines --------------------------------------------------------------------------


def test_leave_one_out_with_one_sample():
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        b = storch.sample(
            "loo_site",
            dist.Bernoulli(p),
            estimator=estimators.ScoreFunction(n_samples=1),
            baseline=baselines.LeaveOneOut(),
        )
        storch.add_cost("c", b)

    with pytest.raises(StorchError) as info:
        _loss_and_grads(model)
    assert "loo_site" in str(info.value)
    assert "n_samples" in str(info.value)


def test_leave_one_out_with_one_sample_in_estimator():
    def model():
        b = pyro.sample("loo_site", dist.Bernoulli(0.3))
        storch.add_cost("c", b)

    est = estimators.ScoreFunction(baseline=baselines.LeaveOneOut())
    with pytest.raises(StorchError, match="loo_site"):
        with handlers.estimator(config={"loo_site": est}):
            _loss_and_grads(model)


def test_baseline_on_pathwise_site_given_explicitly():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        z = storch.sample(
            "reparam_z",
            dist.Normal(loc, 1.0),
            estimator=estimators.Pathwise(),
            baseline=baselines.MovingAverage(),
        )
        storch.add_cost("c", z**2)

    with pytest.raises(StorchError) as info:
        _loss_and_grads(model)
    assert "reparam_z" in str(info.value)
    assert "Pathwise" in str(info.value)


def test_baseline_handler_dict_on_pathwise_site():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        z = pyro.sample("reparam_z", dist.Normal(loc, 1.0))  # default: Pathwise
        storch.add_cost("c", z**2)

    with pytest.raises(StorchError, match="reparam_z"):
        with handlers.baseline(config={"reparam_z": baselines.MovingAverage()}):
            _loss_and_grads(model)


class _Bad(torch.nn.Module):
    """A baseline network returning one value per data point with a trailing dim of 1."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x)  # (N, 1): does not broadcast to the site's batch shape (N,)


def test_learned_baseline_wrong_shape():
    x = torch.randn(5, 2)

    def model(x):
        p = pyro.param("p", torch.tensor(0.3))
        with pyro.plate("data", 5):
            b = storch.sample(
                "shape_site",
                dist.Bernoulli(p),
                estimator=estimators.ScoreFunction(),
                baseline=baselines.Learned(_Bad()),
            )
        storch.add_cost("c", b.sum())

    with pytest.raises(StorchError) as info:
        storch.StorchELBO().loss_and_grads(model, None, x)
    message = str(info.value)
    assert "shape_site" in message
    assert "(5, 1)" in message
    assert "(5,)" in message


# ---- non-finite costs -------------------------------------------------------------------


def test_non_finite_add_cost_names_cost_site():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        storch.add_cost("fine", z**2)
        storch.add_cost("exploding", z / torch.tensor(0.0))

    with pytest.raises(NonFiniteCostError) as info:
        _loss_and_grads(model)
    assert "exploding" in str(info.value)
    assert "'fine'" not in str(info.value)


def test_non_finite_cost_in_guide_mode():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        storch.add_cost("nan_cost", z * float("nan"))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(NonFiniteCostError, match="nan_cost"):
        _loss_and_grads(model, guide)


def test_non_finite_loss_value():
    def model():
        storch.add_cost("inf_cost", torch.tensor(float("inf")))

    with pytest.raises(NonFiniteCostError):
        storch.StorchELBO().loss(model, None)


# ---- wrong arguments --------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"estimator": "sf"},
        {"estimator": estimators.ScoreFunction},
        {"estimator": baselines.MovingAverage()},
        {"baseline": "moving_average"},
        {"baseline": estimators.ScoreFunction()},
    ],
)
def test_wrong_types_to_sample(kwargs):
    with pytest.raises(TypeError, match="z"):
        storch.sample("z", dist.Normal(0.0, 1.0), **kwargs)


@pytest.mark.parametrize("n", [0, -1, 1.5, 2.0, True, "2"])
def test_score_function_bad_n_samples(n):
    with pytest.raises(ValueError, match="n_samples"):
        estimators.ScoreFunction(n_samples=n)


def test_score_function_bad_baseline_type():
    with pytest.raises(TypeError):
        estimators.ScoreFunction(baseline="loo")


@pytest.mark.parametrize("decay", [-0.1, 1.0, 2.0])
def test_moving_average_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        baselines.MovingAverage(decay)


def test_learned_needs_a_module():
    with pytest.raises(TypeError):
        baselines.Learned(lambda x: x)


def test_add_cost_name_must_be_str():
    with pytest.raises(TypeError):
        storch.add_cost(3, torch.tensor(1.0))


def test_unknown_pyro_baseline_option():
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.5))
        pyro.sample("z", dist.Bernoulli(p), infer={"baseline": {"use_decaying_avg": True}})

    with pytest.raises(StorchError, match="z"):
        _loss_and_grads(model, guide)


# ---- model/guide mismatch ---------------------------------------------------------------


def test_guide_latent_missing_from_model_warns_like_pyro():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="Found non-auxiliary vars in guide but not model") as rec:
        _loss_and_grads(model, guide)
    assert any("extra" in str(w.message) for w in rec)


def test_model_latent_missing_from_guide_warns_like_pyro():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + w, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.warns(UserWarning, match="Found vars in model but not guide"):
        _loss_and_grads(model, guide)


# ---- sample dims and max_plate_nesting --------------------------------------------------


def test_batch_shape_left_of_max_plate_nesting():
    def model():
        loc = pyro.param("loc", torch.zeros(3))
        # an undeclared batch dim of size 3: with max_plate_nesting=0 the sample dim of
        # n_samples=2 would have to go where this batch dim is
        z = storch.sample(
            "wide", dist.Normal(loc, 1.0), estimator=estimators.ScoreFunction(n_samples=2)
        )
        storch.add_cost("c", z.sum())

    with pytest.raises(StorchError) as info:
        _loss_and_grads(model, max_plate_nesting=0)
    message = str(info.value)
    assert "wide" in message
    assert "max_plate_nesting" in message
    assert "pyro.plate" in message


def test_second_multi_sample_site_batch_shape_left_of_max_plate_nesting():
    def model():
        z = storch.sample(
            "first", dist.Normal(0.0, 1.0), estimator=estimators.ScoreFunction(n_samples=5)
        )
        # batch dim of size 4 at dim -1: left of max_plate_nesting=0, where "first"'s
        # sample dim (size 5) already is. (A size equal to the sample size would be
        # indistinguishable from a dependence on "first", as with Pyro's enumeration dims.)
        w = storch.sample(
            "second",
            dist.Normal(torch.zeros(4), 1.0),
            estimator=estimators.ScoreFunction(n_samples=2),
        )
        storch.add_cost("c", w.sum() + z)

    with pytest.raises(StorchError, match="second"):
        storch.StorchELBO(max_plate_nesting=0).loss(model, None)


def test_batch_shape_inside_plates_is_fine():
    def model():
        loc = pyro.param("loc", torch.zeros(3))
        with pyro.plate("p", 3):
            z = storch.sample(
                "wide", dist.Normal(loc, 1.0), estimator=estimators.ScoreFunction(n_samples=2)
            )
        storch.add_cost("c", z.sum(-1, keepdim=True))  # over the plate only

    _loss_and_grads(model, max_plate_nesting=1)


# ---- costs reduced over a sample dim; exceptions with sample dims (issue 12 §3, §6) -------


def _summed_over_samples():
    p = pyro.param("p", torch.tensor(0.3))
    z = storch.sample("z", dist.Bernoulli(p), estimator=estimators.ScoreFunction(n_samples=4))
    storch.add_cost("f", (z + 1.0).sum())  # objective E[z + 1] = 1.3; the loss was 4x that


def _enumerated_summed_over_plate_and_samples():
    probs = pyro.param("probs", torch.tensor([0.2, 0.5, 0.7]))
    with pyro.plate("N", 3):
        z = storch.sample("z", dist.Bernoulli(probs), estimator=estimators.Enumerate())
    storch.add_cost("f", (z * torch.tensor([1.0, 2.0, 3.0])).sum())


@pytest.mark.parametrize(
    "model, site, estimator",
    [
        (_summed_over_samples, "'z'", "ScoreFunction(n_samples=4"),
        (_enumerated_summed_over_plate_and_samples, "'z'", "Enumerate()"),
    ],
)
def test_cost_reduced_over_a_sample_dim_raises(model, site, estimator):
    with pytest.raises(StorchError) as info:
        _loss_and_grads(model)
    message = str(info.value)
    assert "cost 'f'" in message and site in message and estimator in message
    assert "keepdim=True" in message


def test_cost_reduced_over_a_plate_without_keepdim_raises():
    # the plate's dim is gone, so the sample dims moved right: z's dim -2 is now dim -1
    def model():
        probs = pyro.param("probs", torch.tensor([0.2, 0.5, 0.7]))
        with pyro.plate("N", 3):
            z = storch.sample("z", dist.Bernoulli(probs), estimator=estimators.ScoreFunction(4))
        storch.add_cost("f", z.sum(-1))

    with pytest.raises(StorchError, match="cost 'f' depends on the samples of site"):
        _loss_and_grads(model)


def test_cost_reduced_over_an_upstream_sample_dim_names_that_site():
    def model():
        loc = pyro.param("loc", torch.tensor(0.0))
        a = storch.sample("a", dist.Normal(loc, 1.0), estimator=estimators.ScoreFunction(3))
        b = storch.sample("b", dist.Normal(a, 1.0))  # pathwise, carries a's sample dim
        storch.add_cost("f", b.mean())

    with pytest.raises(StorchError, match=r"cost 'f' depends on the samples of site\(s\) 'a'"):
        _loss_and_grads(model)


def test_cost_reduced_over_samples_in_the_guide_or_an_observation_raises():
    def model(data):
        loc = storch.sample("loc", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(loc.mean(), 1.0), obs=data)  # loc.mean() over samples

    def guide(data):
        q = pyro.param("q", torch.tensor(0.0))
        storch.sample("loc", dist.Normal(q, 1.0), estimator=estimators.ScoreFunction(2))

    with pytest.raises(StorchError, match="cost 'x' depends on the samples of site"):
        storch.StorchELBO().loss_and_grads(model, guide, torch.tensor(0.5))


def test_costs_that_keep_or_do_not_need_a_sample_dim_pass():
    weights = torch.tensor([1.0, 2.0, 3.0])
    table = torch.tensor([1.0, -1.0])

    def model():
        p = pyro.param("p", torch.tensor(0.3))
        probs = pyro.param("probs", torch.tensor([0.2, 0.5, 0.7]))
        a = storch.sample("a", dist.Bernoulli(p), estimator=estimators.ScoreFunction(4))
        storch.add_cost("const", torch.ones(5).sum() * p)  # independent of a: no sample dim
        storch.add_cost("fa", a * 2.0)  # keeps a's sample dim
        with pyro.plate("N", 3):
            z = storch.sample("z", dist.Bernoulli(probs * 0.5 + 0.1 * a),
                              estimator=estimators.Enumerate())
            y = storch.sample("y", dist.Bernoulli(probs), estimator=estimators.ScoreFunction(2))
            storch.add_cost("fz", z * weights + a.new_zeros(()))
            storch.add_cost("h", table[z.long()] + 0.0 * a)
        storch.add_cost("g", (y * weights).sum(-1, keepdim=True))  # over the plate only

    loss = storch.StorchELBO().differentiable_loss(model, None)
    assert type(loss) is torch.Tensor and loss.requires_grad


def test_sample_dim_checks_run_on_validated_steps_only():
    depths = []

    def model():
        p = pyro.param("p", torch.tensor(0.3))
        z = storch.sample("z", dist.Bernoulli(p), estimator=estimators.ScoreFunction(2))
        depths.append(torch._C._len_torch_function_stack())
        storch.add_cost("f", z)

    elbo = storch.StorchELBO()
    for _ in range(3):
        elbo.differentiable_loss(model, None)
    # (the first call to the model is the max_plate_nesting probe)
    # checked, then the fast path (credit by data flow keeps its provenance mode on)
    fast = [0, 0] if elbo.credit == "order" else [1, 1]
    assert depths[1] > 0 and depths[2:] == fast, depths


def _multi_sample(action):
    def model():
        p = pyro.param("p", torch.tensor(0.3))
        z = storch.sample("z", dist.Bernoulli(p), estimator=estimators.ScoreFunction(4))
        storch.add_cost("f", z * action(z))

    return model


def _note(error: BaseException) -> str:
    return "\n".join(getattr(error, "__notes__", []))


@pytest.mark.parametrize(
    "action", [lambda z: z.item(), lambda z: float(bool(z))], ids=["item", "bool"]
)
def test_scalar_use_of_a_multi_sample_value_is_noted(action):
    with pytest.raises(RuntimeError) as info:
        _loss_and_grads(_multi_sample(action))
    note = _note(info.value)
    assert "site 'z' (ScoreFunction(n_samples=4" in note
    assert "holds 4 values along a sample dim at dim -1" in note
    assert "ScoreFunction(baseline=MovingAverage())" in note


@pytest.mark.parametrize(
    "estimator", [estimators.ScoreFunction(n_samples=2), estimators.ARM(),
                  estimators.DisARM(), estimators.REBAR()],
    ids=repr,
)
def test_two_dimensional_code_given_a_sample_dim_is_noted(estimator):
    # AIR's spatial transformer: code that takes one 2-D batch (issue 12 §6)
    def model():
        p = pyro.param("p", torch.full((5,), 0.3))
        with pyro.plate("batch", 5):
            z_pres = storch.sample("z_pres", dist.Bernoulli(p), estimator=estimator)
        features = torch.cat([z_pres.unsqueeze(-1), torch.zeros(5, 2)], -1)
        storch.add_cost("f", features.sum(-1))

    with pytest.raises(RuntimeError, match="same number of dimensions") as info:
        _loss_and_grads(model)
    note = _note(info.value)
    assert f"site 'z_pres' ({estimator!r}) holds" in note
    assert "must broadcast over dims left of their plates" in note


def _indexed_relaxed_model(with_multi_sample):
    def model():
        logits = pyro.param("logits", torch.zeros(3))
        if with_multi_sample:
            p = pyro.param("p", torch.tensor(0.3))
            storch.sample("b", dist.Bernoulli(p), estimator=estimators.ScoreFunction(2))
        k = storch.sample("k", dist.Categorical(logits=logits),
                          estimator=estimators.GumbelSoftmax())
        storch.add_cost("f", torch.tensor([1.0, 2.0, 3.0])[k])

    return model


@pytest.mark.parametrize("with_multi_sample", [False, True])
def test_indexing_with_a_relaxed_one_hot_value_is_noted(with_multi_sample):
    # with a multi-sample site, the max_plate_nesting probe meets the error first
    with pytest.raises(IndexError) as info:
        _loss_and_grads(_indexed_relaxed_model(with_multi_sample))
    note = _note(info.value)
    assert "site 'k' (GumbelSoftmax" in note
    assert "relaxed one-hot value (floats over a last dim of size 3)" in note
    assert "z @ table, not table[z]" in note


def test_no_note_without_sample_dims_or_on_storch_errors():
    def plain():
        z = storch.sample("z", dist.Bernoulli(0.3))
        storch.add_cost("f", z * torch.ones(2)[z.long() + 5])

    with pytest.raises(IndexError) as info:
        _loss_and_grads(plain)
    assert not _note(info.value)
    with pytest.raises(StorchError) as info:
        _loss_and_grads(_summed_over_samples)
    assert not _note(info.value)


# ---- import side effects ----------------------------------------------------------------

_GLOBALS = r"""
import json, torch, torch.distributions, pyro, pyro.infer.util, pyro.poutine.util
import pyro.distributions, pyro.settings
from pyro.poutine.runtime import _PYRO_STACK
def snapshot():
    return {
        "dtype": str(torch.get_default_dtype()),
        "torch_validate": torch.distributions.Distribution._validate_args,
        "pyro_dist_validate": pyro.distributions.is_validation_enabled(),
        "pyro_infer_validate": pyro.infer.util.is_validation_enabled(),
        "pyro_poutine_validate": pyro.poutine.util.is_validation_enabled(),
        "grad": torch.is_grad_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "threads": torch.get_num_threads(),
        "pyro_settings": {k: repr(v) for k, v in pyro.settings.get().items()},
        "pyro_stack": len(_PYRO_STACK),
        "param_store": sorted(pyro.get_param_store().keys()),
        "rng": torch.random.get_rng_state().sum().item(),
    }
before = snapshot()
import storch_pyro  # noqa
from storch_pyro import handlers, estimators, baselines, diagnostics  # noqa
after = snapshot()
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.parametrize("python_flags", [[], ["-O"]])
def test_import_changes_no_global_setting(python_flags):
    out = subprocess.run(
        [sys.executable, *python_flags, "-c", _GLOBALS],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["after"] == result["before"]


def _extra_model(extra):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))


def _extra_guide(extra):
    loc = pyro.param("loc", torch.tensor(0.0))
    pyro.sample("z", dist.Normal(loc, 1.0))
    if extra:
        pyro.sample("extra", dist.Normal(0.0, 1.0))


def test_guide_latent_missing_from_model_on_a_later_step_warns():
    elbo = storch.StorchELBO()
    elbo.loss_and_grads(_extra_model, _extra_guide, False)
    with pytest.warns(UserWarning, match="Found non-auxiliary vars in guide but not model"):
        elbo.loss_and_grads(_extra_model, _extra_guide, True)
