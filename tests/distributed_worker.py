"""The training runs of tests/test_distributed.py: run in one process on the global batch
(``world_size=1``, no ``torch.distributed``), or as one rank of a gloo process group
(``python -m tests.distributed_worker RANK WORLD PORT OUT``).

Draws are made equal between the runs, per data point: the vectorized model's Bernoulli
draws compare pre-drawn uniforms with the probabilities (:class:`NoisyBernoulli`, for
ScoreFunction's ``fn.sample``), and the sequential model (one site per data point, for
estimators that draw their own noise: DisARM, RELAX) seeds torch's generator with
(step, data point) right before each site. Costs of a data point depend on its own draw
only, so each data point's terms are the same whichever process computes them.

DDP averages gradients over the R ranks, and a rank's loss sums its b = B/R data points, so
R ranks at learning rate ``R * LR`` take the steps of one process at ``LR`` on the B points.
"""

import math
import os
import sys
from datetime import timedelta
from typing import Dict

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as tdist
from pyro.nn import PyroModule
from torch.nn.parallel import DistributedDataParallel

import storch_pyro as storch
from storch_pyro import baselines, estimators

B = 4  # global batch
STEPS = 3
LR = 0.1
K = 3  # samples per site for RLOO
CASES = ("score_function_moving_average", "rloo", "learned", "disarm", "relax",
         "relax_outside_ddp", "rebar", "learned_pyromodule", "relax_pyromodule")
#: Estimators drawing their own noise: the sequential model, seeded per data point.
SEQUENTIAL = ("disarm", "relax", "relax_outside_ddp", "rebar", "relax_pyromodule")


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, generator=g)
    y = torch.rand(B, generator=g)
    noise = torch.rand(STEPS, K, B, generator=g)  # per step, sample and data point
    return x, y, noise


class NoisyBernoulli(dist.Bernoulli):
    """A Bernoulli whose ``sample`` replays given uniforms ``noise`` (shape ``(K,) +
    batch_shape``): a data point's draws do not depend on which process draws them."""

    def __init__(self, logits, noise):
        super().__init__(logits=logits)
        self.noise = noise

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise ValueError("NoisyBernoulli: give logits of the plate's full shape")
        return self

    def sample(self, sample_shape=torch.Size()):
        n = math.prod(sample_shape)
        u = self.noise[:n].reshape(torch.Size(sample_shape) + self.batch_shape)
        return (u < self.probs.detach()).to(self.logits.dtype)


class ControlVariate(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(),
                                       torch.nn.Linear(4, 1))

    def forward(self, z):
        return self.net(z.unsqueeze(-1)).squeeze(-1)


class Objective(torch.nn.Module):
    """Everything trained (encoder, baseline network, control variate): DDP averages the
    gradients of all of them."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        self.encoder = torch.nn.Linear(3, 1)
        self.elbo = storch.StorchELBO(max_plate_nesting=1)
        if case == "score_function_moving_average":
            self.estimator = estimators.ScoreFunction(baseline=baselines.MovingAverage(0.8))
        elif case == "rloo":
            self.estimator = estimators.ScoreFunction(
                n_samples=K, baseline=baselines.LeaveOneOut())
        elif case in ("learned", "learned_pyromodule"):
            self.baseline = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
            self.estimator = estimators.ScoreFunction(baseline=baselines.Learned(
                self.baseline, input_fn=lambda x, *rest: x, name="baseline"))
        elif case == "disarm":
            self.estimator = estimators.DisARM()
        elif case in ("relax", "relax_pyromodule"):
            self.control_variate = ControlVariate()
            self.estimator = estimators.RELAX(self.control_variate, name="cv")
        elif case == "relax_outside_ddp":  # in Pyro's param store only: not a submodule
            self.estimator = estimators.RELAX(ControlVariate(), name="cv")
        elif case == "rebar":  # eta, temperature: pyro.param per site
            self.estimator = estimators.REBAR()
        else:
            raise ValueError(case)

    def vectorized(self, x, y, noise, first):
        logits = self.encoder(x).squeeze(-1)
        with pyro.plate("data", x.shape[0]):
            z = storch.sample("z", NoisyBernoulli(logits, noise), estimator=self.estimator)
            storch.add_cost("cost", (z - y) ** 2 * (1.0 + x[:, 0] ** 2))

    def sequential(self, x, y, step, first):
        logits = self.encoder(x).squeeze(-1)
        for i in pyro.plate("data", x.shape[0]):  # independent: no credit across points
            torch.manual_seed(1000 * step + first + i)
            z = storch.sample(f"z{first + i}", dist.Bernoulli(logits=logits[i]),
                              estimator=self.estimator)
            storch.add_cost(f"cost{first + i}", (z - y[i]) ** 2 * (1.0 + x[i, 0] ** 2))

    def forward(self, x, y, draws, first):
        if self.case in SEQUENTIAL:
            return self.elbo.differentiable_loss(self.sequential, None, x, y, draws, first)
        return self.elbo.differentiable_loss(self.vectorized, None, x, y, draws, first)


class PyroObjective(Objective, PyroModule):
    """With ``module_local_params=True`` (Pyro's Lightning recipe): ``pyro.module`` inside
    it keeps the networks out of the global param store, so only DDP averages their
    gradients (the variance gradient included)."""


def make_objective(case: str) -> Objective:
    if case.endswith("_pyromodule"):
        return PyroObjective(case)
    return Objective(case)


def train(case: str, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """Trains ``case`` for STEPS steps on this rank's share of the batch; returns the
    parameters and the estimator state."""
    with pyro.settings.context(module_local_params=case.endswith("_pyromodule")):
        return _train(case, rank, world)


def _train(case: str, rank: int, world: int) -> Dict[str, torch.Tensor]:
    pyro.clear_param_store()
    torch.manual_seed(0)
    objective = make_objective(case)
    module = DistributedDataParallel(objective) if world > 1 else objective
    optimizer = None
    x, y, noise = data()
    b = B // world
    first = rank * b
    local = slice(first, first + b)
    for step in range(STEPS):
        draws = step if case in SEQUENTIAL else noise[step][:, local]
        if optimizer is not None:
            optimizer.zero_grad()
        loss = module(x[local], y[local], draws, first)
        loss.backward()
        if optimizer is None:  # the module's parameters and those in Pyro's param store
            params = {id(p): p for p in objective.parameters()}
            params.update((id(p), p) for p in pyro.get_param_store()._params.values())
            optimizer = torch.optim.SGD(list(params.values()), lr=LR * world)
        optimizer.step()
    result = {f"param:{k}": v.detach().clone() for k, v in objective.state_dict().items()}
    store = pyro.get_param_store()
    result.update({f"store:{k}": store[k].detach().clone() for k in store.keys()})
    return result


def free_draws(rank: int, world: int) -> Dict[str, torch.Tensor]:
    """Free (different) draws on every rank, state shared by name: a moving average and a
    GumbelSoftmax schedule."""
    pyro.clear_param_store()
    torch.manual_seed(100 + rank)
    logits = torch.zeros(3, requires_grad=True)
    schedule = estimators.GumbelSoftmax(lambda step: 1.0 / (1 + step), name="tau")

    def model():
        with pyro.plate("data", 3):
            z = storch.sample("z", dist.Bernoulli(logits=logits), estimator=estimators.
                              ScoreFunction(baseline=baselines.MovingAverage(0.5)))
            r = storch.sample("r", dist.Bernoulli(logits=logits), estimator=schedule)
            storch.add_cost("cost", (z + r - 0.7) ** 2)

    def unsynchronized():
        with pyro.plate("data", 3):
            w = storch.sample("w", dist.Bernoulli(logits=logits), estimator=estimators.
                              ScoreFunction(baseline=baselines.MovingAverage(0.5)))
            storch.add_cost("cost", (w - 0.7) ** 2)

    elbo = storch.StorchELBO(max_plate_nesting=1)
    per_rank = storch.StorchELBO(max_plate_nesting=1, sync_state=False)  # the control
    gathers = []
    all_gather_object = tdist.all_gather_object

    def counted(*args, **kwargs):
        gathers.append(1)
        return all_gather_object(*args, **kwargs)

    tdist.all_gather_object = counted
    try:
        for _ in range(STEPS):
            elbo.differentiable_loss(model, None).backward()
            per_rank.differentiable_loss(unsynchronized, None).backward()
    finally:
        tdist.all_gather_object = all_gather_object
    store = pyro.get_param_store()
    result = {f"store:{k}": store[k].detach().clone() for k in store.keys()}
    result["gathers"] = torch.tensor(len(gathers))
    return result


def episodes(rank: int, world: int) -> Dict[str, torch.Tensor]:
    """Episodes whose length differs between ranks and steps (one site per time step, a
    moving average per site), and a step in which rank 1 records no state at all;
    synchronized over a process group given as ``sync_state``."""
    pyro.clear_param_store()
    torch.manual_seed(200 + rank)
    logits = torch.zeros((), requires_grad=True)
    estimator = estimators.ScoreFunction(baseline=baselines.MovingAverage(0.5))

    def episode(length):
        for t in range(length):
            a = storch.sample(f"a{t}", dist.Bernoulli(logits=logits), estimator=estimator)
            storch.add_cost(f"r{t}", a - 0.5)

    def stateless():
        a = storch.sample("n", dist.Normal(logits, 1.0))
        storch.add_cost("c", a ** 2)

    group = tdist.new_group(list(range(world)))  # sync_state=<a ProcessGroup>
    elbo = storch.StorchELBO(max_plate_nesting=0, sync_state=group)
    for step in range(STEPS + 1):
        if rank == 1 and step == 1:
            loss = elbo.differentiable_loss(stateless, None)
        else:
            loss = elbo.differentiable_loss(episode, None, 1 + rank + step)
        loss.backward()
    store = pyro.get_param_store()
    return {f"store:{k}": store[k].detach().clone() for k in store.keys()}


def main(rank: int, world: int, port: int, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                             world_size=world, timeout=timedelta(seconds=30))
    try:
        results = {case: train(case, rank, world) for case in CASES}
        results["free_draws"] = free_draws(rank, world)
        results["episodes"] = episodes(rank, world)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
