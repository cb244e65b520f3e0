"""The generative story of the Storchastic introduction, as a stochastic computation graph.

    Compute d = a + b
    Sample  e ~ N(c + b, 1)
    Compute f = d * e**2

The objective is E[f] = (a + b) * ((c + b)**2 + 1), so its gradient is known exactly:

    dE/da = (c + b)**2 + 1
    dE/db = (c + b)**2 + 1 + 2 (a + b)(c + b)
    dE/dc = 2 (a + b)(c + b)

The story is written once, without a guide; its estimator is swapped from outside with
``storch_pyro.handlers.estimator``. For each estimator the script draws many gradient
estimates of ``StorchELBO().differentiable_loss(story, None, a, b, c)`` and prints their mean,
the variance of one estimate (trace of its covariance) and the largest |mean - exact| in
standard errors (below ~4 for an unbiased estimator).

    python examples/generative_story.py [--draws 2000] [--smoke]
"""

import argparse

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import gradient_stats


def story(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    d = a + b
    e = storch.sample("e", dist.Normal(c + b, 1.0))
    f = d * e**2
    storch.add_cost("f", f)


def exact_gradient(a: float, b: float, c: float) -> torch.Tensor:
    second_moment = (c + b) ** 2 + 1
    cross = 2 * (a + b) * (c + b)
    return torch.tensor([second_moment, second_moment + cross, cross])


ESTIMATORS = {
    "Pathwise": lambda: estimators.Pathwise(),
    "ScoreFunction": lambda: estimators.ScoreFunction(),
    "ScoreFunction + MovingAverage(0.9)": lambda: estimators.ScoreFunction(
        baseline=baselines.MovingAverage(0.9)
    ),
    "ScoreFunction(n_samples=8) + LeaveOneOut": lambda: estimators.ScoreFunction(
        n_samples=8, baseline=baselines.LeaveOneOut()
    ),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Gradient estimators on a generative story")
    parser.add_argument("--draws", type=int, default=2000, help="gradient estimates each")
    parser.add_argument("--smoke", action="store_true", help="a few draws, for tests")
    args = parser.parse_args(argv)
    draws = 20 if args.smoke else args.draws

    pyro.set_rng_seed(0)
    values = {"a": 5.0, "b": -3.0, "c": 0.23}
    exact = exact_gradient(**values)
    a, b, c = (torch.tensor(v, requires_grad=True) for v in values.values())
    elbo = storch.StorchELBO()

    def fmt(v: torch.Tensor) -> str:
        return "(" + ", ".join(f"{x:8.3f}" for x in v.tolist()) + ")"

    print(f"{values}; {draws} gradient estimates each\n")
    print("| estimator | mean d/d(a, b, c) | variance (trace) | max abs(error)/s.e. |")
    print("|:----------|:------------------|-----------------:|--------------------:|")
    print(f"| exact | {fmt(exact)} | 0 | - |")
    for name, make_estimator in ESTIMATORS.items():
        pyro.clear_param_store()  # a fresh moving average for each estimator
        with handlers.estimator(config={"e": make_estimator()}):
            stats = gradient_stats(
                lambda: elbo.differentiable_loss(story, None, a, b, c), [a, b, c], draws, exact
            )
        print(
            f"| {name} | {fmt(stats.mean)} | {stats.total_variance:.1f} "
            f"| {float(stats.z_scores.abs().max()):.2f} |"
        )


if __name__ == "__main__":
    main()
