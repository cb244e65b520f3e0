"""Numerical robustness: every estimator gives a finite loss and finite gradients at extreme
parameters (logits of +-30, probabilities of 1e-8 and 1 - 1e-8, locations of +-30 with
scales of 1e-4), in float32 and float64, and computes in the dtype (and so on the device)
of the parameters, whatever torch's default dtype is."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators

K = 3


def _bernoulli(extreme, dtype):
    if extreme == "logits":
        param = torch.tensor([-30.0, 30.0, 0.0], dtype=dtype, requires_grad=True)
        return param, lambda: dist.Bernoulli(logits=param)
    param = torch.tensor([1e-8, 1 - 1e-8, 0.5], dtype=dtype, requires_grad=True)
    return param, lambda: dist.Bernoulli(probs=param)


def _onehot(extreme, dtype):
    if extreme == "logits":
        row = [-30.0, 30.0, 0.0]
        param = torch.tensor([row, row[::-1], [0.0, 0.0, 0.0]], dtype=dtype, requires_grad=True)
        return param, lambda: dist.OneHotCategorical(logits=param)
    row = [1e-8, 1 - 2e-8, 1e-8]
    param = torch.tensor([row, row[::-1], [1 / 3] * 3], dtype=dtype, requires_grad=True)
    return param, lambda: dist.OneHotCategorical(probs=param)


def _normal(extreme, dtype):
    loc = torch.tensor([-30.0, 30.0, 0.0], dtype=dtype, requires_grad=True)
    scale = 1e-4 if extreme == "probs" else 1.0
    return loc, lambda: dist.Normal(loc, scale)


ESTIMATORS = {
    "pathwise": (estimators.Pathwise, _normal),
    "score-normal": (lambda: estimators.ScoreFunction(2), _normal),
    "score-moving-average": (
        lambda: estimators.ScoreFunction(baseline=baselines.MovingAverage(0.5)), _bernoulli
    ),
    "score-leave-one-out": (
        lambda: estimators.ScoreFunction(3, baseline=baselines.LeaveOneOut()), _onehot
    ),
    "arm": (estimators.ARM, _bernoulli),
    "disarm": (lambda: estimators.DisARM(2), _bernoulli),
    "enumerate-bernoulli": (estimators.Enumerate, _bernoulli),
    "enumerate-onehot": (estimators.Enumerate, _onehot),
    "sum-and-sample": (lambda: estimators.SumAndSample(2), _onehot),
    "unordered-set-onehot": (lambda: estimators.UnorderedSet(2), _onehot),
    "unordered-set-bernoulli": (lambda: estimators.UnorderedSet(2), _bernoulli),
    "rebar-bernoulli": (estimators.REBAR, _bernoulli),
    "rebar-onehot": (estimators.REBAR, _onehot),
    "gumbel-soft-bernoulli": (lambda: estimators.GumbelSoftmax(0.5), _bernoulli),
    "gumbel-soft-onehot": (lambda: estimators.GumbelSoftmax(0.1), _onehot),
    "gumbel-hard-onehot": (lambda: estimators.GumbelSoftmax(0.5, hard=True), _onehot),
    "straight-through-bernoulli": (estimators.StraightThrough, _bernoulli),
    "straight-through-onehot": (estimators.StraightThrough, _onehot),
}


def _model(make_dist, estimator, target):
    with pyro.plate("p", K):
        z = storch.sample("z", make_dist(), estimator=estimator)
        if z.dim() >= 2 and z.shape[-1] == K and make_dist().event_shape:
            z = (z * target).sum(-1)  # one-hot values: a cost per plate index
        storch.add_cost("c", (z - target) ** 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("extreme", ["logits", "probs"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_finite_gradients_at_extreme_parameters(name, extreme, dtype):
    make_estimator, family = ESTIMATORS[name]
    estimator = make_estimator()
    param, make_dist = family(extreme, dtype)
    target = torch.tensor([0.3, 0.7, 0.5], dtype=dtype)
    elbo = storch.StorchELBO()
    for _ in range(3):  # several draws (and baseline updates), first and later steps
        loss = elbo.differentiable_loss(_model, None, make_dist, estimator, target)
        (grad,) = torch.autograd.grad(loss, [param])
        assert loss.dtype == dtype and grad.dtype == dtype
        assert torch.isfinite(loss), loss
        assert torch.isfinite(grad).all(), grad


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_computes_in_the_parameters_dtype_not_the_default(name):
    """float32 parameters under a float64 default dtype: a tensor created without the
    parameters' dtype (or device) would promote the loss to float64."""
    make_estimator, family = ESTIMATORS[name]
    estimator = make_estimator()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        param, make_dist = family("logits", torch.float32)
        target = torch.tensor([0.3, 0.7, 0.5], dtype=torch.float32)
        loss = storch.StorchELBO().differentiable_loss(_model, None, make_dist, estimator, target)
        (grad,) = torch.autograd.grad(loss, [param])
    finally:
        torch.set_default_dtype(previous)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32


def test_elbo_mode_in_float64():
    data = torch.tensor([0.2, 1.5, -0.7], dtype=torch.float64)

    def model():
        with pyro.plate("data", 3):
            b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
            pyro.sample("x", dist.Normal(b, torch.tensor(1.0, dtype=torch.float64)), obs=data)

    def guide():
        logits = pyro.param("logits", torch.tensor([-30.0, 30.0, 0.0], dtype=torch.float64))
        with pyro.plate("data", 3):
            storch.sample(
                "b",
                dist.Bernoulli(logits=logits),
                estimator=estimators.ScoreFunction(baseline=baselines.MovingAverage()),
            )

    elbo = storch.StorchELBO()
    for _ in range(2):
        loss = elbo.differentiable_loss(model, guide)
        (grad,) = torch.autograd.grad(loss, [pyro.param("logits").unconstrained()])
        assert loss.dtype == torch.float64 and torch.isfinite(loss)
        assert torch.isfinite(grad).all()


def test_model_without_costs_loss_in_sites_dtype():
    def model():
        storch.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))

    assert storch.StorchELBO().differentiable_loss(model, None).dtype == torch.float64


# ---- devices ----------------------------------------------------------------------------

_FACTORIES = {"tensor", "zeros", "ones", "full", "empty", "rand", "randn", "randint",
              "arange", "linspace", "eye", "as_tensor"}
#: (module, function): tensor factories that are on the CPU by design.
_CPU_BY_DESIGN = {
    ("estimators/_unordered_set_math.py", "_subset_tables"),  # cached index tables, moved
    ("estimators/_unordered_set_math.py", "_quadrature_nodes_cpu"),  # cached nodes, moved
    ("estimators/relaxation.py", "_advance"),  # a step counter in the param store
    ("primitives.py", "add_cost"),  # a Python number as a cost: a CPU scalar broadcasts
    ("surrogate.py", "_zero"),  # a loss without costs or sites
}


def test_no_tensor_factory_without_a_device():
    """Tensors are created on the parameters' device (``device=``, ``*_like``, ``new_*``):
    a static check of the package, as this test machine has no GPU."""
    import ast
    from pathlib import Path

    root = Path(storch.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        module = str(path.relative_to(root))
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if (module, function.name) in _CPU_BY_DESIGN:
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch" and node.func.attr in _FACTORIES
                        and not any(k.arg == "device" for k in node.keywords)):
                    offenders.append(f"{module}:{node.lineno} {function.name}")
    assert not offenders, offenders
