"""Unbiasedness on an accelerator: a few storch_pyro estimators on a Bernoulli toy, with all
tensors on ``--device``, against the closed-form gradient.

Toy: :math:`b_d \\sim \\mathrm{Bernoulli}(\\sigma(\\phi_d))`, cost
:math:`f(b) = \\sum_d (b_d - t_d)^2`, so :math:`\\partial_{\\phi_d} \\mathbb{E} f =
\\sigma(\\phi_d)(1 - \\sigma(\\phi_d))(1 - 2 t_d)`. Each estimator's mean over ``--draws``
gradient estimates must lie within 4.5 standard errors of it in every coordinate (with 3
coordinates the chance of a false alarm under unbiasedness is below 1e-4); ``Enumerate``
must match exactly. Prints a table and exits non-zero on a failure.

    python -m benchmarks.gpu_unbiased --device cuda
"""

import argparse
import sys

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import baselines, estimators
from storch_pyro.diagnostics import flat_grad, gradient_stats

TARGET = (0.0, 1.0, 0.3)
PHI = (-0.7, 0.4, 1.2)


def toy(phi, target, estimator):
    b = storch.sample("b", dist.Bernoulli(logits=phi).to_event(1), estimator=estimator)
    storch.add_cost("c", ((b - target) ** 2).sum(-1))


def plate_toy(phi, target, estimator):
    """The same toy with the coordinates in a plate (for estimators that enumerate)."""
    with pyro.plate("p", len(target)):
        b = storch.sample("b", dist.Bernoulli(logits=phi), estimator=estimator)
        storch.add_cost("c", (b - target) ** 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args(argv)
    pyro.set_rng_seed(0)
    phi = torch.tensor(PHI, device=args.device, requires_grad=True)
    target = torch.tensor(TARGET, device=args.device)
    p = torch.sigmoid(phi.detach())
    exact = p * (1 - p) * (1 - 2 * target)
    candidates = {
        "ScoreFunction(4, LeaveOneOut)": estimators.ScoreFunction(
            n_samples=4, baseline=baselines.LeaveOneOut()
        ),
        "ScoreFunction(MovingAverage)": estimators.ScoreFunction(
            baseline=baselines.MovingAverage(0.9)
        ),
        "ARM": estimators.ARM(),
        "DisARM": estimators.DisARM(),
    }
    elbo = storch.StorchELBO(max_plate_nesting=1)
    failed = False
    print(f"device: {phi.device}, {args.draws} draws per estimator; exact {exact.tolist()}")
    print("| estimator | max abs z | on device | ok |")
    print("|---|--:|---|---|")
    for name, estimator in candidates.items():
        pyro.clear_param_store()
        stats = gradient_stats(
            lambda estimator=estimator: elbo.differentiable_loss(toy, None, phi, target,
                                                                 estimator),
            [phi], args.draws, exact=exact,
        )
        z = float(stats.z_scores.abs().max())
        ok = z < 4.5
        failed |= not ok
        print(f"| {name} | {z:.2f} | {stats.mean.device} | {'yes' if ok else 'NO'} |")
    loss = elbo.differentiable_loss(plate_toy, None, phi, target, estimators.Enumerate())
    gradient = flat_grad(loss, [phi])
    error = float((gradient - exact).abs().max())
    ok = error < 1e-5
    failed |= not ok
    verdict = "yes" if ok else "NO"
    print(f"| Enumerate (exact) | error {error:.1e} | {gradient.device} | {verdict} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
