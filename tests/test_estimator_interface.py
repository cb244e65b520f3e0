"""The estimator interface (storch_pyro.estimators.base): the complete estimator in the
``Estimator`` docstring runs and is unbiased, capabilities follow from the records an
estimator returns, and one estimator instance serves one site."""

import textwrap

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import StorchELBO, estimators, handlers
from storch_pyro.estimators import Draw, Estimator, Site
from storch_pyro.handlers.resolution import instance_for_site


def _docstring_example() -> str:
    """The code block of the ``Estimator`` docstring's example."""
    doc = Estimator.__doc__
    start = doc.index("Example: a complete new estimator")
    block = doc[doc.index("::", start) + 2:]
    lines = []
    for line in block.splitlines()[1:]:
        if line.strip() and not line.startswith(" " * 8):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))


def _run_example():
    namespace = {"storch": storch, "dist": dist, "pyro": pyro, "torch": torch,
                 "StorchELBO": StorchELBO}
    code = _docstring_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 30
    before = list(Estimator.registry)
    exec(compile(code, "<Estimator docstring>", "exec"), namespace)
    Estimator.registry[:] = before  # keep the example out of other tests' error messages
    return namespace


def test_docstring_estimator_runs():
    namespace = _run_example()
    assert "LooReinforce" in namespace


def test_docstring_estimator_is_unbiased():
    """Mean of 800 gradient draws against the exact gradient 0.4 p (1 - p) of
    E[(z - 0.3)^2] per coordinate. Power: measured s.e. 0.0014-0.0019 per coordinate, so a
    bias above 4.5 s.e. ~ 0.007-0.009 (8 % of the gradients 0.079-0.1) fails; dropping the
    leave-one-out correction's 1/(k-1) (a biased baseline) shifts them by ~0.025."""
    namespace = _run_example()
    story = namespace["story"]
    pyro.set_rng_seed(0)
    logits = torch.tensor([-1.0, 0.0, 0.5], requires_grad=True)
    grads = []
    for _ in range(800):
        loss = StorchELBO().differentiable_loss(story, None, logits)
        grads.append(torch.autograd.grad(loss, logits)[0])
    grads = torch.stack(grads)
    p = torch.sigmoid(logits.detach())
    exact = 0.4 * p * (1 - p)
    mean, se = grads.mean(0), grads.std(0) / len(grads) ** 0.5
    assert (se < 0.003).all(), se
    assert ((mean - exact).abs() < 4.5 * se).all(), (mean, exact, se)


class _NoTerms(Estimator):
    """Plain sampling: no score, no weights, no terms."""

    @classmethod
    def supports(cls, fn):
        return True

    def draw(self, site: Site) -> Draw:
        return Draw(site.fn.sample())


def test_capabilities_follow_from_the_draw():
    """A draw without score and an estimator without terms makes no stochastic node."""
    from storch_pyro.handlers.records import Run
    from storch_pyro.handlers.tracing import StorchMessenger

    def model():
        z = storch.sample("z", dist.Bernoulli(0.3), estimator=_NoTerms())
        w = storch.sample("w", dist.Bernoulli(0.3), estimator=estimators.ScoreFunction())
        storch.add_cost("f", z + w)

    run = Run(None, -1, (), {})
    with StorchMessenger(run, "scg"):
        model()
    assert [node.name for node in run.nodes] == ["w"]


def test_one_instance_per_site():
    shared = estimators.GumbelSoftmax(0.5)
    a, b = instance_for_site(shared, "a"), instance_for_site(shared, "b")
    assert a is not b and a is not shared
    assert instance_for_site(shared, "a") is a
    assert instance_for_site(a, "a") is a  # a per-site instance serves its own site


def test_shared_instance_draws_through_per_site_copies():
    seen = []

    class _Spy(estimators.ScoreFunction):
        def draw(self, site):
            seen.append((site.name, id(self)))
            return super().draw(site)

    spy = _Spy()

    def model():
        for name in ("a", "b"):
            z = pyro.sample(name, dist.Bernoulli(0.5))
            storch.add_cost(f"f_{name}", z)

    for _ in range(2):
        with handlers.estimator(config={"a": spy, "b": spy}):
            StorchELBO().differentiable_loss(model, None)
    ids = {}
    for name, ident in seen:
        ids.setdefault(name, set()).add(ident)
    assert all(len(v) == 1 for v in ids.values())  # the same instance at every step
    assert ids["a"] != ids["b"] and id(spy) not in ids["a"] | ids["b"]


def test_config_handlers_write_msg_infer():
    """A handler inside the loss (here: with no loss at all) writes its choice into the
    site's typed options; an inner handler's choice wins over an outer one's."""
    from pyro import poutine

    from storch_pyro.site_options import INFER_KEY

    inner, outer = estimators.DisARM(), estimators.ARM()

    def model():
        pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("w", dist.Bernoulli(0.5))

    with poutine.trace() as tracer:
        handlers.estimator(handlers.estimator(model, config={"z": inner}),
                           config={"z": outer, "w": outer})()
    options = {name: tracer.trace.nodes[name]["infer"][INFER_KEY] for name in ("z", "w")}
    assert options["z"].handler_estimator is inner
    assert options["w"].handler_estimator is outer
    assert options["z"].status is None  # no loss drew it
