"""Multi-sample objectives on the binary linear VAE (8x8 digits, 200 Bernoulli latents), K
evaluations of the decoder per data point and step:

- ``vimco``: ``IWELBO(num_particles=K)`` (the K-sample bound, VIMCO's leave-one-out baseline),
- ``rloo``: ``StorchELBO`` with ``ScoreFunction(n_samples=K, baseline=LeaveOneOut())`` (the
  ELBO, per-sample leave-one-out baseline),
- ``renyi``: Pyro's ``RenyiELBO(alpha=0, num_particles=K)`` (the K-sample bound; the
  encoder gets no gradient, as its guide site is not reparameterizable).

Reported: the K-sample and 100-sample importance-weighted test bounds (higher is better)
after training, mean over seeds::

    python -m benchmarks.iwelbo_digits --steps 300 --k 5 --seeds 0 1
"""

import argparse
import time

import pyro
import torch
from pyro.infer import RenyiELBO

import storch_pyro as storch
from benchmarks import data as datasets
from benchmarks.models import make_model
from storch_pyro import baselines, estimators, handlers

METHODS = ("vimco", "rloo", "renyi")


def _se(values: torch.Tensor) -> float:
    return float(values.std() / len(values) ** 0.5) if len(values) > 1 else float("nan")


def train(method: str, k: int, steps: int, seed: int, lr: float, batch_size: int, dataset):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    vae = make_model("binary-linear", dataset.n_pixel, dataset.train_mean())
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    batches = datasets.train_batches(
        dataset.train, batch_size, torch.Generator().manual_seed(seed))
    guide = vae.guide
    if method == "vimco":
        loss = storch.IWELBO(num_particles=k, max_plate_nesting=1)
    elif method == "rloo":
        loss = storch.StorchELBO(max_plate_nesting=1)
        guide = handlers.estimator(vae.guide, config={
            "z": estimators.ScoreFunction(n_samples=k, baseline=baselines.LeaveOneOut())})
    else:
        loss = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    start = time.perf_counter()
    for _ in range(steps):
        x = next(batches)
        optimizer.zero_grad()
        if method == "renyi":
            loss.loss_and_grads(vae.model, guide, x)
        else:
            loss.differentiable_loss(vae.model, guide, x).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    torch.manual_seed(1000 + seed)
    return vae.test_bound(dataset.test, k), vae.test_bound(dataset.test, 100), seconds / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dataset = datasets.load("digits")
    print(f"binary-linear VAE, digits, K={args.k}, {args.steps} steps, lr {args.lr}, "
          f"batch {args.batch_size}, seeds {args.seeds}")
    print(f"{'method':8s} {'K-sample test bound':>22s} {'100-sample test bound':>22s} ms/step")
    for method in args.methods:
        runs = [train(method, args.k, args.steps, seed, args.lr, args.batch_size, dataset)
                for seed in args.seeds]
        bound_k = torch.tensor([r[0] for r in runs])
        bound_100 = torch.tensor([r[1] for r in runs])
        ms = 1000 * sum(r[2] for r in runs) / len(runs)
        print(f"{method:8s} {float(bound_k.mean()):14.2f} ± {_se(bound_k):5.2f} "
              f"{float(bound_100.mean()):14.2f} ± {_se(bound_100):5.2f} {ms:7.1f}")


if __name__ == "__main__":
    main()
