"""Credit by order vs by data flow, against TraceGraph_ELBO (issue 17).

The model: T independent Bernoulli latents, each with its own observation, as separate sites
(guide ``z_t ~ Bernoulli(logits=phi_t)``; model ``z_t ~ Bernoulli(0.5)``,
``x_t ~ Normal(z_t, 1)`` observed). For each loss, ``--draws`` gradient draws (fresh seeds),
the per-site variance of d loss / d phi_t and its ratio to TraceGraph_ELBO's, and the median
time per step.

    python -m benchmarks.credit --draws 2000
"""

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import TraceGraph_ELBO

import storch_pyro as storch


def make_model(T: int):
    x = torch.linspace(-1.5, 2.5, T)

    def model():
        for t in range(T):
            z = pyro.sample(f"z{t}", dist.Bernoulli(0.5))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[t])

    def guide():
        phi = pyro.param("phi", torch.zeros(T))
        for t in range(T):
            pyro.sample(f"z{t}", dist.Bernoulli(logits=phi[t]))

    return model, guide


def draws(loss, model, guide, n: int, seed: int):
    """``n`` gradients of phi and the median seconds per step."""
    grads, times = [], []
    for i in range(n):
        pyro.set_rng_seed(seed + i)
        phi = pyro.param("phi")
        phi.grad = None
        start = time.perf_counter()
        loss.loss_and_grads(model, guide)
        times.append(time.perf_counter() - start)
        grads.append(phi.grad.clone())
    return torch.stack(grads), sorted(times)[n // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--T", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(True)
    model, guide = make_model(args.T)
    pyro.clear_param_store()
    guide()
    losses = {
        "TraceGraph_ELBO": TraceGraph_ELBO(),
        "StorchELBO (credit='order')": storch.StorchELBO(),
        "StorchELBO (credit='data_flow')": storch.StorchELBO(credit="data_flow"),
    }
    results = {}
    for k, (name, loss) in enumerate(losses.items()):
        results[name] = draws(loss, model, guide, args.draws, seed=k * args.draws)
    reference = results["TraceGraph_ELBO"][0].var(0)
    print(f"T = {args.T}, {args.draws} draws each, validation on, 1 thread\n")
    print("| loss | ms/step | per-site variance / TraceGraph_ELBO's | total |")
    print("|:-----|--------:|:--------------------------------------|------:|")
    for name, (grads, seconds) in results.items():
        variance = grads.var(0)
        ratios = ", ".join(f"{r:.2f}" for r in (variance / reference).tolist())
        total = float(variance.sum() / reference.sum())
        print(f"| {name} | {1e3 * seconds:.2f} | {ratios} | {total:.2f} |")


if __name__ == "__main__":
    main()
