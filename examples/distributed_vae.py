"""Data-parallel training of a discrete VAE with ``torch.distributed`` and
``DistributedDataParallel``, launched by ``torchrun``.

The model and guide are :class:`~pyro.nn.PyroModule` s (``pyro.settings.set(
module_local_params=True)``, as Pyro's ``examples/svi_lightning.py``), so their parameters
are ordinary module parameters; ``StorchELBO()(model, guide)`` is a ``torch.nn.Module``
computing the loss, and ``DistributedDataParallel`` around it averages the gradients of
every parameter in it: the encoder and decoder, and the networks of the estimators (a
``Learned`` baseline, RELAX's control variate: attributes of the guide, so DDP sees them).
Each rank computes the loss on its shard of every batch, with the data plate's
subsampling scale, so each rank's loss estimates the full-data negative ELBO and their
average (DDP's) is the estimate from the global batch. ``StorchELBO`` synchronizes the
estimators' state (e.g. ``MovingAverage``) over the process group by itself, once per step.

    torchrun --nproc_per_node=2 examples/distributed_vae.py            # gloo on CPU
    torchrun --nproc_per_node=2 examples/distributed_vae.py --smoke    # a few steps
    torchrun --nproc_per_node=2 examples/distributed_vae.py --estimator relax
    python examples/distributed_vae.py --smoke                         # one process
    # several machines: the same command on each, with
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
        --rdzv-endpoint=HOST:29400 --rdzv-id=vae examples/distributed_vae.py

On CUDA machines each rank uses the GPU ``LOCAL_RANK`` and NCCL. Prints, on rank 0, a table
with the held-out negative ELBO and the throughput (steps/s, samples/s over all ranks).
"""

import argparse
import os
import time

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.nn import PyroModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import storch_pyro as storch
from storch_pyro import baselines, estimators

LATENTS, HIDDEN, PIXELS = 16, 64, 64


def load_digits(device: torch.device):
    """scikit-learn's 8x8 digits, binarized: 1,500 to train, the rest held out."""
    from sklearn.datasets import load_digits as sklearn_digits

    images = torch.tensor(sklearn_digits().data, dtype=torch.float32) / 16.0
    images = (images > 0.5).float().to(device)
    return images[:1500], images[1500:]


class Model(PyroModule):
    """p(z) = Bernoulli(1/2)^L, p(x | z) = Bernoulli(decoder(z))."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size  # the data set's size: the subsampling scale is size / batch
        self.decoder = nn.Sequential(nn.Linear(LATENTS, HIDDEN), nn.Tanh(),
                                     nn.Linear(HIDDEN, PIXELS))

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> None:
        with pyro.plate("data", self.size, subsample=index):
            prior = torch.zeros(x.shape[0], LATENTS, device=x.device)
            z = pyro.sample("z", dist.Bernoulli(logits=prior).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class ControlVariate(nn.Module):
    """RELAX's c(z): (..., L) -> (...)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(LATENTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.mlp(z).squeeze(-1)


class Guide(PyroModule):
    """q(z | x) = Bernoulli(encoder(x)); holds the estimator, and its networks (so that
    DDP averages their gradients too)."""

    def __init__(self, size: int, estimator: str) -> None:
        super().__init__()
        self.size = size
        self.encoder = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.Tanh(),
                                     nn.Linear(HIDDEN, LATENTS))
        if estimator == "rloo":
            self.estimator = estimators.ScoreFunction(
                n_samples=4, baseline=baselines.LeaveOneOut())
        elif estimator == "moving-average":
            self.estimator = estimators.ScoreFunction(baseline=baselines.MovingAverage(0.9))
        elif estimator == "learned":
            self.baseline = nn.Sequential(nn.Linear(PIXELS, HIDDEN), nn.Tanh(),
                                          nn.Linear(HIDDEN, 1), nn.Flatten(0))
            self.estimator = estimators.ScoreFunction(baseline=baselines.Learned(
                self.baseline, input_fn=lambda x, index: x, name="baseline"))
        elif estimator == "relax":
            self.control_variate = ControlVariate()
            self.estimator = estimators.RELAX(self.control_variate, name="control_variate")
        elif estimator == "disarm":
            self.estimator = estimators.DisARM()
        else:
            raise SystemExit(f"unknown estimator {estimator!r}")

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> None:
        with pyro.plate("data", self.size, subsample=index):
            logits = self.encoder(x)
            storch.sample("z", dist.Bernoulli(logits=logits).to_event(1),
                          estimator=self.estimator)


def setup() -> tuple:
    """Joins the process group when launched by torchrun (``WORLD_SIZE`` set): NCCL and
    the GPU ``LOCAL_RANK`` where CUDA is available, else gloo on CPU."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        tdist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        tdist.init_process_group("gloo")
    return tdist.get_rank(), tdist.get_world_size(), device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", default="moving-average",
                        choices=["rloo", "moving-average", "learned", "relax", "disarm"])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-sync-state", action="store_true",
                        help="per-rank estimator state (StorchELBO(sync_state=False))")
    parser.add_argument("--smoke", action="store_true", help="a few steps")
    args = parser.parse_args()
    steps = 5 if args.smoke else args.steps

    rank, world, device = setup()
    pyro.settings.set(module_local_params=True)
    pyro.clear_param_store()
    torch.manual_seed(args.seed)  # the same initial parameters on every rank
    train, test = load_digits(device)
    model, guide = Model(len(train)).to(device), Guide(len(train), args.estimator).to(device)
    sync_state = False if args.no_sync_state else None  # None: whenever distributed
    loss_fn = storch.StorchELBO(max_plate_nesting=1, sync_state=sync_state)(model, guide)
    module = DistributedDataParallel(loss_fn) if world > 1 else loss_fn
    optimizer = torch.optim.Adam(module.parameters(), lr=args.lr)
    # Different draws and batches per rank: each rank's batch is its shard of a shared
    # permutation (as DistributedSampler does).
    order = torch.Generator().manual_seed(args.seed)
    pyro.set_rng_seed(args.seed + 1000 * (rank + 1))

    start = None
    for step in range(steps):
        if step == 1:  # the first step validates and warms up: not timed
            start = time.perf_counter()
        batch = torch.randperm(len(train), generator=order)[:args.batch_size * world]
        index = batch[rank::world].to(device)
        loss = module(train[index], index)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start if start is not None else float("nan")

    with torch.no_grad():  # held-out -ELBO per image, plain sampling
        evaluation = storch.StorchELBO(max_plate_nesting=1, num_particles=4)
        model.size = guide.size = len(test)
        index = torch.arange(len(test), device=device)
        test_loss = evaluation.loss(model, guide, test, index) / len(test)

    state = {name: float(value.detach().sum()) for name, value in
             pyro.get_param_store().items() if name.startswith("storch_pyro.")}
    if world > 1 and not args.no_sync_state:  # the estimator state is the same everywhere
        states = [None] * world
        tdist.all_gather_object(states, state)
        assert all(other == state for other in states), states
    if rank == 0:
        timed = max(steps - 1, 1)
        print("| ranks | estimator | steps | held-out -ELBO/image | steps/s | samples/s |")
        print("|---|---|---|---|---|---|")
        print(f"| {world} | {args.estimator} | {steps} | {test_loss:.2f} | "
              f"{timed / seconds:.1f} | {timed * args.batch_size * world / seconds:.0f} |")
    if world > 1:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
