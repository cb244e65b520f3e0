"""Variational inference for Bayesian logistic regression: pathwise vs score function.

Breast-cancer diagnosis (scikit-learn's ``load_breast_cancer``: 569 tumours, 30
standardized features), with a Gaussian prior on the weights and a mean-field Gaussian
guide:

    model:  w ~ N(0, I),  y_n ~ Bernoulli(sigmoid(x_n . w))      (w includes a bias)
    guide:  w ~ N(mu, diag(sigma^2))

The latent ``w`` is continuous and reparameterizable, so the pathwise estimator (Kingma &
Welling 2014) applies; the score-function estimator (Williams 1992) does too, but ignores
that the cost is differentiable in ``w``. The script swaps the estimator of site ``w`` with
``storch_pyro.handlers.estimator`` and, for each, measures the variance of the ELBO
gradient (trace of the covariance of one estimate, over ``--draws`` draws) at the
initial guide and at a trained one, then trains with SVI from the same start and reports the
final negative ELBO and test accuracy. LAX (Grathwohl et al. 2018) trains its control
variate (a small network of ``w``) during SVI, so it appears in the training comparison
only. Output: a table and ``elbo.png`` (``--out``).

    python examples/vi_continuous.py          # about half a minute
    python examples/vi_continuous.py --smoke
"""

import argparse
import sys
from typing import Callable, Dict, List

import pyro
import pyro.distributions as dist
import torch
from _common import output_dir, save_curves
from pyro.infer import SVI
from tqdm import tqdm

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import gradient_stats

#: 30 standardized features and a column of ones.
N_FEATURES = 31
#: The reported negative ELBO is the mean over the last TAIL training steps.
TAIL = 100


def load_data(seed: int = 0):
    """Standardized features with a column of ones, labels; 400 to train, 169 to test."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.float32)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    train = slice(0, 400)
    x = (x - x[train].mean(0)) / x[train].std(0)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)
    return (x[:400], y[:400]), (x[400:], y[400:])


def model(x: torch.Tensor, y: torch.Tensor) -> None:
    w = pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    with pyro.plate("data", x.shape[0]):
        logits = (x * w).sum(-1)  # broadcasts over a sample dim of w (n_samples > 1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def guide(x: torch.Tensor, y: torch.Tensor) -> None:
    loc = pyro.param("loc", torch.zeros(x.shape[1]))
    scale = pyro.param("scale", torch.full((x.shape[1],), 0.5),
                       constraint=dist.constraints.positive)
    pyro.sample("w", dist.Normal(loc, scale).to_event(1))


def estimator_choices() -> Dict[str, Callable[[], estimators.Estimator]]:
    """The estimators compared, by display name."""
    choices = {
        "Pathwise": lambda: estimators.Pathwise(),
        "Pathwise(8)": lambda: estimators.Pathwise(n_samples=8),
        "ScoreFunction": lambda: estimators.ScoreFunction(),
        "ScoreFunction + MovingAverage": lambda: estimators.ScoreFunction(
            baseline=baselines.MovingAverage(0.9)),
        "ScoreFunction(8) + LeaveOneOut": lambda: estimators.ScoreFunction(
            n_samples=8, baseline=baselines.LeaveOneOut()),
    }
    # LAX: c_phi(w), a small network of the sampled weights, trained by SVI on the variance
    # of the gradient (a fresh one per call: each training run starts untrained).
    choices["LAX"] = lambda: estimators.LAX(ControlVariate(N_FEATURES))
    return choices


#: Estimators whose control variate trains during SVI: their variance at a fixed guide with
#: an untrained network says nothing, so the tables leave it out.
TRAINED_CONTROL_VARIATES = {"LAX"}


class ControlVariate(torch.nn.Module):
    """:math:`c_\\phi(w)`: an MLP of the sampled weights, one value per sample."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
        )

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.net(w).squeeze(-1)


def gradient_variance(make: Callable[[], estimators.Estimator], x, y, draws: int) -> float:
    """Trace of the covariance of one gradient estimate w.r.t. the guide's (unconstrained)
    parameters, at their current values; estimator state starts fresh."""
    elbo = storch.StorchELBO()
    params = [p for _, p in pyro.get_param_store().named_parameters()]
    saved = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    with handlers.estimator(config={"w": make()}):
        stats = gradient_stats(lambda: elbo.differentiable_loss(model, guide, x, y), params,
                               draws)
    _restore(saved)
    return stats.total_variance


def _restore(saved: Dict[str, torch.Tensor]) -> None:
    """Puts the guide parameters back and drops any other state (e.g. moving averages)."""
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if n not in saved]:
        del store[name]
    with torch.no_grad():
        for name, p in store.named_parameters():
            p.copy_(saved[name])


def train(make: Callable[[], estimators.Estimator], x, y, steps: int, lr: float,
          label: str, quiet: bool) -> List[float]:
    """SVI from the initial guide; returns the negative ELBO (per data point) per step."""
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=storch.StorchELBO())
    curve = []
    with handlers.estimator(config={"w": make()}):
        for _ in tqdm(range(steps), desc=label, file=sys.stdout, disable=quiet, leave=False,
                      mininterval=1.0):
            curve.append(svi.step(x, y) / len(x))
    return curve


def accuracy(x: torch.Tensor, y: torch.Tensor) -> float:
    """Test accuracy of the posterior-mean weights."""
    with torch.no_grad():
        return float(((x @ pyro.param("loc") > 0).float() == y).float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--draws", type=int, default=300, help="gradient draws for variance")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.draws = 10, 5
    torch.set_num_threads(1)
    (x, y), (x_test, y_test) = load_data()
    choices = estimator_choices()

    # Variance at the initial guide, and at one trained with the pathwise estimator.
    variance = {}
    for point in ("initial", "trained"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        if point == "trained":
            train(choices["Pathwise"], x, y, args.steps, args.lr, "pathwise", True)
        else:
            guide(x, y)  # creates the parameters
        for name, make in choices.items():
            if name not in TRAINED_CONTROL_VARIATES:
                variance[name, point] = gradient_variance(make, x, y, args.draws)

    curves, results = {}, {}
    for name, make in choices.items():
        curves[name] = train(make, x, y, args.steps, args.lr, name, args.smoke)
        last = curves[name][-TAIL:]
        results[name] = (sum(last) / len(last), accuracy(x_test, y_test))

    print(f"Bayesian logistic regression, breast cancer ({len(x)} train, {len(x_test)} test, "
          f"{x.shape[1]} weights); gradient variance over {args.draws} draws; "
          f"{args.steps} SVI steps, Adam lr {args.lr}\n")
    tail = min(TAIL, args.steps)
    print("| estimator | model evaluations per step | grad. variance at init | at trained "
          f"guide | ratio to pathwise (trained) | neg. ELBO / point (last {tail} steps) "
          "| test accuracy |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    reference = variance["Pathwise", "trained"]
    for name in choices:
        final, acc = results[name]
        evaluations = choices[name]().n_samples
        if name in TRAINED_CONTROL_VARIATES:
            print(f"| {name} | {evaluations} | – | – | – | {final:.4f} | {acc:.3f} |")
            continue
        print(f"| {name} | {evaluations} | {variance[name, 'initial']:.3g} "
              f"| {variance[name, 'trained']:.3g} "
              f"| {variance[name, 'trained'] / reference:.3g} | {final:.4f} | {acc:.3f} |")
    out = output_dir(args.out, "vi_continuous")
    save_curves(curves, out / "elbo.png", "Bayesian logistic regression: SVI",
                "step", "negative ELBO / data point", log_y=True)
    print(f"\nwrote {out / 'elbo.png'}")


if __name__ == "__main__":
    main()
