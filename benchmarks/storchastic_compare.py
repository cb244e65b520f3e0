"""The original Storchastic (``storchastic==0.3.7``, van Krieken et al. 2021) on the binary VAE:
bias against exact enumeration and time per step, next to a hand-written twin in the same
process. Optional: Storchastic patches torch at import (``torch.is_tensor``,
``Tensor.to/le/gt``, and turns distribution validation off), so it runs in its own process
and its own virtual environment, never in the one the tests use::

    python -m venv /tmp/storchastic-venv            # torch 2.13.0 + this repo's deps in it
    /tmp/storchastic-venv/bin/pip install --no-deps storchastic==0.3.7 entmax==1.3
    /tmp/storchastic-venv/bin/python -m benchmarks.storchastic_compare

Storchastic is GPL-licensed: this module only imports and calls it.

For each estimator: the gradient of :math:`-\\mathrm{ELBO}` (summed over a fixed batch of 50)
with respect to the encoder of a binary linear VAE with 8 latents on the digits, exact by
enumeration, against the mean of ``--draws`` estimates (mean squared z-score over
coordinates: about 1 if unbiased), and the median time of a training step at 200 latents.
Estimators that crash are reported with their error.
"""

import argparse
import statistics
import time
import traceback

import torch

from benchmarks import data as datasets
from benchmarks.handwritten import HAND_WRITTEN
from benchmarks.models import BinaryVAE
from storch_pyro.diagnostics import flat_grad, gradient_stats


def storchastic_methods():
    from storch.method import ARM, DisARM, GumbelSoftmax, ScoreFunction

    return {
        "ScoreFunction(moving_average)": lambda: ScoreFunction(
            "z", n_samples=1, baseline_factory="moving_average"
        ),
        "ScoreFunction(2, batch_average)": lambda: ScoreFunction(
            "z", n_samples=2, baseline_factory="batch_average"
        ),
        "ARM": lambda: ARM("z"),
        "DisARM": lambda: DisARM("z"),
        "GumbelSoftmax": lambda: GumbelSoftmax("z"),
    }


def storchastic_loss(vae, x, method):
    """One Storchastic estimate: runs ``storch.backward`` and returns a scalar whose gradient
    is the estimate (:math:`\\sum_p p \\cdot \\bot g_p`, the grads read back from ``.grad``),
    scaled to the sum over the batch, and the loss value."""
    import storch

    params = list(vae.parameters())
    for p in params:
        p.grad = None
    xs = storch.denote_independent(x, 0, "data")
    q = torch.distributions.Bernoulli(logits=vae.encoder(xs))
    z = method(q)
    prior = torch.distributions.Bernoulli(logits=vae.prior_logits)
    likelihood = torch.distributions.Bernoulli(logits=vae.decoder(z))
    cost = q.log_prob(z).sum(-1) - prior.log_prob(z).sum(-1) - likelihood.log_prob(xs).sum(-1)
    storch.add_cost(cost, "neg_elbo")
    value = storch.backward()
    value = float(value._tensor if hasattr(value, "_tensor") else value)
    # Storchastic averages the cost over the data plate; the exact cost here is a sum.
    scale = x.shape[0]
    loss = torch.zeros(())
    for p in params:
        if p.grad is not None:
            loss = loss + scale * (p * p.grad.detach()).sum()
            p.grad = None
    return loss, scale * value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per method")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import storch  # noqa: F401  (patches torch: after everything else is set up)

    dataset = datasets.load("digits")
    x = next(datasets.train_batches(dataset.train, 50, torch.Generator().manual_seed(12345)))
    print(f"storchastic {getattr(storch, '__version__', '0.3.7')}, torch {torch.__version__}")
    print("| estimator | mean z² (8 latents) | relative bias | ms/step (200 latents) |")
    print("|---|--:|--:|--:|")
    for name, make in storchastic_methods().items():
        row = [name]
        try:
            torch.manual_seed(0)
            vae = BinaryVAE(dataset.n_pixel, dataset.train_mean(), n_latent=8)
            encoder = list(vae.encoder.parameters())
            exact = flat_grad(vae.exact_cost(x), encoder).detach()
            method = make()
            stats = gradient_stats(lambda: storchastic_loss(vae, x, method)[0], encoder,
                                   args.draws, exact=exact)
            z = stats.z_scores[stats.std_error > 0]
            row += [f"{float((z ** 2).mean()):.2f}",
                    f"{float(stats.bias.norm() / exact.norm()):.3f}"]
            ms = time_steps(dataset, lambda vae, x: storchastic_loss(vae, x, method), args.steps)
            row.append(f"{ms:.2f}")
        except Exception as error:  # report, do not stop
            row += [f"crashed: {type(error).__name__}: {str(error)[:120]}", "", ""]
            traceback.print_exc()
        print("| " + " | ".join(row) + " |")
    for name in ("sf-ma", "rloo", "disarm"):
        estimator = HAND_WRITTEN[name]()
        ms = time_steps(dataset, lambda vae, x: estimator(vae, x), args.steps)
        print(f"| hand-written torch:{name} (same process) | | | {ms:.2f} |")


def time_steps(dataset, loss_fn, steps: int) -> float:
    """Median ms per training step (loss, backward, Adam) of the 200-latent linear VAE."""
    torch.manual_seed(1)
    vae = BinaryVAE(dataset.n_pixel, dataset.train_mean(), n_latent=200)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)
    batches = datasets.train_batches(dataset.train, 50, torch.Generator().manual_seed(1))
    times = []
    for _ in range(steps):
        x = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss, _ = loss_fn(vae, x)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times[steps // 10:])


if __name__ == "__main__":
    main()
