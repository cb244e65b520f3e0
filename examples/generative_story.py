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
standard errors (below ~4 for an unbiased estimator), and saves a plot of the mean
gradients (± 2 s.e.) against the exact one, and of the variances (``gradients.png`` in
``--out``, default ``examples/out/generative_story``). About 10 s on a laptop CPU.

    python examples/generative_story.py [--draws 2000] [--out DIR] [--smoke]
"""

import argparse
from pathlib import Path
from typing import Dict

import pyro
import pyro.distributions as dist
import torch
from _common import output_dir, pyplot

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import GradientStats, gradient_stats


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


def save_plot(results: Dict[str, GradientStats], path: Path) -> None:
    """Left: each estimator's error, mean gradient minus the exact one (± 2 s.e.), per
    coordinate (an unbiased estimator's bars cross zero about 95 % of the time); right: the
    variance of one estimate (trace of its covariance)."""
    plt = pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4),
                                         gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(results)
    for i, (name, stats) in enumerate(results.items()):
        x = torch.arange(3) - 0.4 + (i + 0.5) * width
        left.errorbar(x.tolist(), stats.bias.tolist(), yerr=(2 * stats.std_error).tolist(),
                      fmt="o", color=f"C{i}", capsize=3, label=name)
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xticks(range(3), ["d/da", "d/db", "d/dc"])
    left.set_ylabel("mean estimate - exact gradient (± 2 s.e.)")
    left.legend(fontsize=7)
    names = list(results)
    right.barh(range(len(names)), [results[n].total_variance for n in names],
               color=[f"C{i}" for i in range(len(names))])
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xscale("log")
    right.set_xlabel("variance of one estimate (trace)")
    draws = next(iter(results.values())).n
    figure.suptitle(f"f = (a + b) e², e ~ N(c + b, 1): {draws} gradient estimates of E[f] "
                    f"per estimator", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Gradient estimators on a generative story")
    parser.add_argument("--draws", type=int, default=2000, help="gradient estimates each")
    parser.add_argument("--out", default=None, help="folder for the PNG")
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
    results = {}
    for name, make_estimator in ESTIMATORS.items():
        pyro.clear_param_store()  # a fresh moving average for each estimator
        with handlers.estimator(config={"e": make_estimator()}):
            stats = gradient_stats(
                lambda: elbo.differentiable_loss(story, None, a, b, c), [a, b, c], draws, exact
            )
        results[name] = stats
        print(
            f"| {name} | {fmt(stats.mean)} | {stats.total_variance:.1f} "
            f"| {float(stats.z_scores.abs().max()):.2f} |"
        )
    out = output_dir(args.out, "generative_story")
    save_plot(results, out / "gradients.png")
    print(f"\nwrote {out / 'gradients.png'}")


if __name__ == "__main__":
    main()
