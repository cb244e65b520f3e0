"""Behaviour of the user-facing handlers ``handlers.estimator`` and ``handlers.baseline``:
context managers and decorators, dict and callable configs, precedence, defaults, unused-name
warnings and type errors."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.errors import UnusedConfigWarning

# ---- spies ------------------------------------------------------------------------------
# Names start with "_" so they are not added to the public estimator registry.


class _Counting:
    """Counts the draws of an estimator and of its per-site copies (one shared counter)."""

    def _start_counting(self):
        self._draws = [0]

    @property
    def draws(self):
        return self._draws[0]

    def draw(self, site):
        self._draws[0] += 1
        return super().draw(site)


class _SpyScore(_Counting, estimators.ScoreFunction):
    """A ScoreFunction estimator that counts its draws."""

    def __init__(self, n_samples=1, baseline=None):
        super().__init__(n_samples=n_samples, baseline=baseline)
        self._start_counting()


class _SpyPathwise(_Counting, estimators.Pathwise):
    """A Pathwise estimator that counts its draws."""

    def __init__(self):
        super().__init__()
        self._start_counting()


class _SpyBaseline(baselines.Baseline):
    """A zero baseline that records the sites it is called for."""

    def __init__(self):
        self.sites = []

    def __call__(self, ctx, downstream_cost):
        self.sites.append(ctx.site)
        return torch.zeros_like(downstream_cost)


def test_spies_are_not_registered():
    assert _SpyScore not in estimators.Estimator.registry
    assert _SpyPathwise not in estimators.Estimator.registry


# ---- models -----------------------------------------------------------------------------


def scg_model(record=None):
    """A pure stochastic computation graph with a reparameterizable and a discrete site."""
    loc = pyro.param("loc", torch.tensor(0.5))
    logit = pyro.param("logit", torch.tensor(0.2))
    z = storch.sample("z", dist.Normal(loc, 1.0))
    b = storch.sample("b", dist.Bernoulli(logits=logit))
    storch.add_cost("c", z**2 + b + 1.0)
    if record is not None:
        record["z"] = z
        record["b"] = b


def scg_loss(model=scg_model, elbo=None, **kwargs):
    elbo = storch.StorchELBO() if elbo is None else elbo
    return elbo.differentiable_loss(model, None, **kwargs)


# ---- context managers and decorators ----------------------------------------------------


def test_estimator_context_manager_dict_config():
    spy = _SpyScore()
    with handlers.estimator(config={"z": spy}):
        scg_loss()
    assert spy.draws == 1


def test_estimator_context_manager_callable_config():
    spy = _SpyScore()
    seen = []

    def config(msg):
        seen.append(msg["name"])
        return spy if msg["name"] == "b" else None

    with handlers.estimator(config=config):
        scg_loss()
    assert spy.draws == 1
    assert set(seen) >= {"z", "b"}


def test_estimator_decorator_dict_config():
    spy = _SpyScore()
    model = handlers.estimator(scg_model, config={"z": spy})
    record = {}
    scg_loss(model, record=record)
    assert spy.draws == 1
    # ScoreFunction draws with fn.sample: no gradient path through the value
    assert not record["z"].requires_grad


def test_estimator_decorator_callable_config():
    spy = _SpyScore(n_samples=3)
    model = handlers.estimator(scg_model, config=lambda msg: spy if msg["fn"].has_rsample else None)
    record = {}
    scg_loss(model, record=record)
    assert spy.draws == 1
    assert record["z"].shape == (3,)
    assert record["b"].shape == ()


def test_estimator_handler_around_svi_step_reaches_guide_sites():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))

    def guide():
        loc = pyro.param("q_loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    spy = _SpyScore()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), storch.StorchELBO())
    with handlers.estimator(config={"z": spy}):
        for _ in range(3):
            svi.step()
    assert spy.draws == 3


def test_estimator_decorator_on_guide():
    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.3))

    def guide():
        loc = pyro.param("q_loc", torch.tensor(0.0))
        pyro.sample("z", dist.Normal(loc, 1.0))

    spy = _SpyScore(n_samples=2)
    storch.StorchELBO(max_plate_nesting=0).loss_and_grads(
        model, handlers.estimator(guide, config={"z": spy})
    )
    assert spy.draws == 1


def test_baseline_context_manager_and_decorator():
    spy = _SpyBaseline()
    with handlers.estimator(config={"z": estimators.ScoreFunction()}):
        with handlers.baseline(config={"z": spy, "b": spy}):
            storch.StorchELBO().loss_and_grads(scg_model, None)
    assert sorted(spy.sites) == ["b", "z"]

    spy2 = _SpyBaseline()
    model = handlers.baseline(scg_model, config={"b": spy2})
    storch.StorchELBO().loss_and_grads(model, None)
    assert spy2.sites == ["b"]


def test_baseline_callable_config_skips_pathwise_sites():
    spy = _SpyBaseline()
    # a callable may return a baseline for every site: it is used only where there is a
    # score term ("b"), silently not at the Pathwise site "z"
    model = handlers.baseline(scg_model, config=lambda msg: spy)
    storch.StorchELBO().loss_and_grads(model, None)
    assert spy.sites == ["b"]


def test_handlers_do_not_change_the_loss_value():
    pyro.set_rng_seed(3)
    plain = scg_loss().item()
    pyro.set_rng_seed(3)
    with handlers.estimator(config={"b": estimators.ScoreFunction()}):
        with handlers.baseline(config={"b": baselines.MovingAverage()}):
            handled = scg_loss().item()
    assert handled == pytest.approx(plain, rel=1e-6)


# ---- precedence -------------------------------------------------------------------------


def test_sample_estimator_wins_over_handler():
    in_call = _SpyScore()
    in_handler = _SpyScore()

    def model():
        z = storch.sample("z", dist.Normal(0.0, 1.0), estimator=in_call)
        storch.add_cost("c", z)

    with handlers.estimator(config={"z": in_handler}):
        scg_loss(model)
    assert (in_call.draws, in_handler.draws) == (1, 0)


def test_sample_estimator_wins_over_callable_handler_and_default():
    in_call = _SpyPathwise()
    other = _SpyScore()

    def model():
        z = storch.sample("z", dist.Normal(0.0, 1.0), estimator=in_call)
        storch.add_cost("c", z)

    with handlers.estimator(config=lambda msg: other):
        scg_loss(model, elbo=storch.StorchELBO(default_estimator=other))
    assert (in_call.draws, other.draws) == (1, 0)


def test_innermost_handler_wins():
    outer, inner = _SpyScore(), _SpyScore()
    with handlers.estimator(config={"z": outer}):
        with handlers.estimator(config={"z": inner}):
            scg_loss()
    assert (outer.draws, inner.draws) == (0, 1)


def test_decorator_inside_context_manager_wins():
    outer, inner = _SpyScore(), _SpyScore()
    model = handlers.estimator(scg_model, config={"z": inner})
    with handlers.estimator(config={"z": outer}):
        scg_loss(model)
    assert (outer.draws, inner.draws) == (0, 1)


def test_inner_callable_returning_none_falls_through_to_outer():
    outer, inner = _SpyScore(), _SpyScore()
    with handlers.estimator(config={"z": outer, "b": outer}):
        with handlers.estimator(config=lambda msg: inner if msg["name"] == "b" else None):
            scg_loss()
    assert (outer.draws, inner.draws) == (1, 1)


def test_handler_wins_over_default_estimator():
    default, handled = _SpyScore(), _SpyScore()
    elbo = storch.StorchELBO(default_estimator=default)
    with handlers.estimator(config={"z": handled}):
        scg_loss(elbo=elbo)
    # "z" from the handler, "b" (no handler entry) from the default
    assert (handled.draws, default.draws) == (1, 1)


def test_default_estimator_applies_to_every_unconfigured_site():
    default = _SpyScore()
    record = {}
    scg_loss(elbo=storch.StorchELBO(default_estimator=default), record=record)
    assert default.draws == 2
    assert not record["z"].requires_grad


def test_default_is_pathwise_for_rsample_else_score_function():
    record = {}
    loss = scg_loss(record=record)
    # Normal has rsample: drawn pathwise, the value carries the gradient path
    assert record["z"].requires_grad
    # Bernoulli has no rsample: drawn by ScoreFunction, no gradient path through the value
    assert not record["b"].requires_grad
    loc, logit = pyro.param("loc"), pyro.param("logit")
    g_loc, g_logit = torch.autograd.grad(loss, [loc, logit])
    # pathwise d/dloc z**2 = 2 z; score function gives (cost) * d/dlogit log p(b) != 0
    assert g_loc.item() == pytest.approx(2 * record["z"].item(), rel=1e-5)
    b = record["b"]
    cost = record["z"].detach() ** 2 + b + 1.0
    dlogp = b - torch.sigmoid(logit.detach())
    assert g_logit.item() == pytest.approx((cost * dlogp).item(), rel=1e-5)


@pytest.mark.parametrize(
    "fn, pathwise",
    [
        (lambda t: dist.Normal(t, 1.0), True),
        (lambda t: dist.Gamma(2.0 * t, 1.0), True),
        (lambda t: dist.Dirichlet(t * torch.ones(3)), True),
        (lambda t: dist.Bernoulli(0.3 * t), False),
        (lambda t: dist.Categorical(t * torch.ones(3) / 3), False),
        (lambda t: dist.Poisson(2.0 * t), False),
    ],
)
def test_default_estimator_by_has_rsample(fn, pathwise):
    # plain pyro.sample sites are stochastic nodes too
    assert fn(torch.tensor(1.0)).has_rsample == pathwise
    record = {}

    def model():
        t = pyro.param("t", torch.tensor(1.0))
        z = pyro.sample("z", fn(t))
        record["z"] = z
        storch.add_cost("c", z.float().sum())

    loss = scg_loss(model)
    assert record["z"].requires_grad == pathwise
    assert loss.requires_grad


# ---- warnings and errors ----------------------------------------------------------------


def test_unused_dict_config_warns():
    with pytest.warns(UnusedConfigWarning, match="zz"):
        with handlers.estimator(
            config={"z": estimators.Pathwise(), "zz": estimators.ScoreFunction()}
        ):
            scg_loss()


def test_unused_baseline_config_warns():
    with pytest.warns(UnusedConfigWarning, match="nope"):
        with handlers.baseline(config={"nope": baselines.MovingAverage()}):
            scg_loss()


def test_unused_config_warns_for_decorated_model():
    model = handlers.estimator(scg_model, config={"typo": estimators.ScoreFunction()})
    with pytest.warns(UnusedConfigWarning, match="typo"):
        scg_loss(model)


def test_no_warning_when_all_names_appear():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with handlers.estimator(
            config={"z": estimators.ScoreFunction(), "b": estimators.ScoreFunction()}
        ):
            with handlers.baseline(config={"b": baselines.MovingAverage()}):
                scg_loss()
        model = handlers.estimator(scg_model, config={"b": estimators.ScoreFunction()})
        scg_loss(model)
        # callables never warn
        with handlers.estimator(config=lambda msg: None):
            scg_loss()


@pytest.mark.parametrize(
    "handler, config",
    [
        (handlers.estimator, {"z": "sf"}),
        (handlers.estimator, {"z": estimators.ScoreFunction}),  # the class, not an instance
        (handlers.estimator, {"z": baselines.MovingAverage()}),
        (handlers.estimator, {1: estimators.ScoreFunction()}),
        (handlers.estimator, 3),
        (handlers.estimator, ["z"]),
        (handlers.estimator, None),
        (handlers.baseline, {"z": estimators.ScoreFunction()}),
        (handlers.baseline, {"z": 0.5}),
        (handlers.baseline, {("z",): baselines.MovingAverage()}),
        (handlers.baseline, "z"),
        (handlers.baseline, None),
    ],
)
def test_wrong_config_types_raise_type_error(handler, config):
    with pytest.raises(TypeError):
        handler(config=config)
    with pytest.raises(TypeError):
        handler(scg_model, config=config)


def test_callable_config_returning_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="z"):
        with handlers.estimator(config=lambda msg: "sf"):
            scg_loss()
    with pytest.raises(TypeError, match="b"):
        with handlers.baseline(config=lambda msg: estimators.ScoreFunction()):
            scg_loss()


def test_default_estimator_wrong_type_raises_type_error():
    with pytest.raises(TypeError):
        storch.StorchELBO(default_estimator="sf")
    with pytest.raises(TypeError):
        storch.StorchELBO(default_estimator=estimators.ScoreFunction)


# ---- swapping estimators without touching the model -------------------------------------


def linear_model():
    loc = pyro.param("loc", torch.tensor(0.7))
    z = pyro.sample("z", dist.Normal(loc, 1.0))
    storch.add_cost("c", 3.0 * z)
    return z


def _grads(config, n=60):
    elbo = storch.StorchELBO(max_plate_nesting=0)
    grads = []
    with handlers.estimator(config=config):
        for _ in range(n):
            loss = elbo.differentiable_loss(linear_model, None)
            (g,) = torch.autograd.grad(loss, [pyro.param("loc")])
            grads.append(g)
    return torch.stack(grads)


def test_handler_swap_changes_gradient_variance():
    pathwise = _grads({"z": estimators.Pathwise()})
    score = _grads({"z": estimators.ScoreFunction()})
    # both estimate d/dloc E[3 z] = 3; pathwise exactly, score function noisily
    assert torch.allclose(pathwise, torch.full_like(pathwise, 3.0))
    assert score.var() > 1.0
    assert abs(score.mean() - 3.0) < 4 * (score.var() / len(score)).sqrt()


def test_handler_swap_changes_value_shape():
    values = {}
    for k in (1, 5):
        with handlers.estimator(config={"z": estimators.ScoreFunction(n_samples=k)}):
            storch.StorchELBO().differentiable_loss(
                lambda: values.__setitem__(k, linear_model()), None
            )
    assert values[1].shape == ()
    assert values[5].shape == (5,)


# ---- baseline precedence ----------------------------------------------------------------


def _bernoulli_site(**kwargs):
    def model():
        logit = pyro.param("logit", torch.tensor(0.2))
        b = storch.sample("b", dist.Bernoulli(logits=logit), **kwargs)
        storch.add_cost("c", b + 1.0)

    return model


def test_sample_baseline_wins_over_estimator_baseline_and_handler():
    in_call, in_est, in_handler = _SpyBaseline(), _SpyBaseline(), _SpyBaseline()
    model = _bernoulli_site(estimator=estimators.ScoreFunction(baseline=in_est), baseline=in_call)
    with handlers.baseline(config={"b": in_handler}):
        storch.StorchELBO().loss_and_grads(model, None)
    assert (in_call.sites, in_est.sites, in_handler.sites) == (["b"], [], [])


def test_estimator_baseline_wins_over_handler():
    in_est, in_handler = _SpyBaseline(), _SpyBaseline()
    model = _bernoulli_site(estimator=estimators.ScoreFunction(baseline=in_est))
    with handlers.baseline(config={"b": in_handler}):
        storch.StorchELBO().loss_and_grads(model, None)
    assert (in_est.sites, in_handler.sites) == (["b"], [])


def test_pyro_annotation_wins_over_baseline_handler():
    in_handler = _SpyBaseline()
    model = _bernoulli_site(infer={"baseline": {"use_decaying_avg_baseline": True}})
    with handlers.baseline(config={"b": in_handler}):
        storch.StorchELBO().loss_and_grads(model, None)
    assert in_handler.sites == []
    assert "__baseline_avg_downstream_cost_b" in pyro.get_param_store()


def test_innermost_baseline_handler_wins():
    outer, inner = _SpyBaseline(), _SpyBaseline()
    with handlers.baseline(config={"b": outer}):
        with handlers.baseline(config={"b": inner}):
            storch.StorchELBO().loss_and_grads(_bernoulli_site(), None)
    assert (outer.sites, inner.sites) == ([], ["b"])


def test_baseline_handler_applies_to_estimator_from_estimator_handler():
    spy = _SpyBaseline()
    model = handlers.baseline(_bernoulli_site(), config={"b": spy})
    with handlers.estimator(config={"b": estimators.ScoreFunction(n_samples=3)}):
        storch.StorchELBO().loss_and_grads(model, None)
    assert spy.sites == ["b"]


def test_model_decorator_naming_a_guide_site_warns_with_hint():
    # The guide draws "z"; the model only replays it, so a handler on the model configures
    # nothing there and must say so.
    def model():
        pyro.sample("z", dist.Bernoulli(0.5))

    def guide():
        p = pyro.param("p_hint", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))

    decorated = handlers.estimator(model, config={"z": estimators.ScoreFunction(n_samples=2)})
    with pytest.warns(UnusedConfigWarning, match="drawn in the guide"):
        storch.StorchELBO().loss_and_grads(decorated, guide)


def test_observed_site_in_config_warns():
    def model():
        pyro.sample("x", dist.Bernoulli(0.5), obs=torch.tensor(1.0))
        storch.add_cost("c", torch.tensor(0.0))

    with pytest.warns(UnusedConfigWarning, match="x"):
        with handlers.estimator(config={"x": estimators.ScoreFunction()}):
            storch.StorchELBO().loss(model, None)
