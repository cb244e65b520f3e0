"""Per-step overhead of StorchELBO over a hand-written PyTorch surrogate of the same estimator.

The task: a discrete VAE on the 8x8 digits of scikit-learn (pixels/16 binarized at 0.5),
20 one-hot Categorical(10) latents, encoder MLP 64-128-200 (logits), decoder MLP 200-128-64
(Bernoulli logits). The estimator: score function on the latents with an exponential moving
average baseline (decay 0.9, a scalar: the batch-mean cost, updated after use); the decoder's
likelihood is differentiated directly. Implementations, each with its own copy of the same
networks (same initialization) and Adam (lr 1e-3):

- ``storch``:      ``StorchELBO`` in ``SVI``, estimator chosen by ``handlers.estimator``;
- ``storch (credit='data_flow')``: the same with ``StorchELBO(credit="data_flow")``;
- the same, but ``StorchELBO().differentiable_loss`` with one ``torch.optim.Adam`` (no
  ``SVI``/``pyro.optim``): separates the loss's overhead from Pyro's optimizer wrapper;
- ``hand-written``: plain PyTorch surrogate ``sum(log q(z) * (cost - b).detach() + cost)``;
- ``TraceGraph``:  Pyro's ``TraceGraph_ELBO`` with ``use_decaying_avg_baseline`` (its average
  is per data point, not a scalar; otherwise the same estimator);
- ``Trace``:       Pyro's ``Trace_ELBO`` (score function without baseline), for reference.

Blocks of ``--steps`` steps are timed in interleaved rounds (A, B, C, D, A, B, ...) in one
process after a warm-up; the table gives the median over rounds of the time per step.

    python -m benchmarks.overhead                      # batch 64, CPU, 1 thread
    python -m benchmarks.overhead --batch-sizes 1 64 1024 --device cuda
    python -m benchmarks.overhead --profile            # cProfile of the StorchELBO step
    python -m benchmarks.overhead --chain 10 100 1000  # sequential programs (benchmarks.chains)
    python -m benchmarks.overhead --enum-chain 10 16 20
"""

import argparse
import cProfile
import os
import pstats
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO
from sklearn.datasets import load_digits
from torch import nn

import storch_pyro as storch
from benchmarks import chains
from storch_pyro import baselines, estimators, handlers

N_LATENT, N_CAT, N_PIXEL, HIDDEN = 20, 10, 64, 128
DECAY, LR = 0.9, 1e-3


def load_data(batch_size: int, device: str) -> torch.Tensor:
    """A fixed batch of binarized digits (drawn with replacement if the batch is larger)."""
    images = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16.0
    data = (images > 0.5).float()
    generator = torch.Generator().manual_seed(0)
    if batch_size <= len(data):
        index = torch.randperm(len(data), generator=generator)[:batch_size]
    else:
        index = torch.randint(len(data), (batch_size,), generator=generator)
    return data[index].to(device)


def make_networks(device: str):
    """Encoder and decoder, identically initialized for every implementation."""
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Linear(N_PIXEL, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N_LATENT * N_CAT)
    )
    decoder = nn.Sequential(
        nn.Linear(N_LATENT * N_CAT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, N_PIXEL)
    )
    return encoder.to(device), decoder.to(device)


def make_pyro_step(
    prefix: str, loss, device: str, guide_infer=None, storch_config=None, torch_adam=False
):
    """``svi.step`` of a Pyro model/guide pair (under ``handlers.estimator`` if configured);
    with ``torch_adam``, ``loss.differentiable_loss`` and one ``torch.optim.Adam`` instead of
    ``SVI`` and ``pyro.optim`` (which keeps one Adam per parameter)."""
    encoder, decoder = make_networks(device)
    prior_logits = torch.zeros(N_LATENT, N_CAT, device=device)

    def model(x):
        pyro.module(prefix + ".decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.OneHotCategorical(logits=prior_logits).to_event(1))
            logits = decoder(z.reshape(x.shape[0], N_LATENT * N_CAT))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        pyro.module(prefix + ".encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            logits = encoder(x).reshape(x.shape[0], N_LATENT, N_CAT)
            pyro.sample(
                "z", dist.OneHotCategorical(logits=logits).to_event(1), infer=guide_infer or {}
            )

    if torch_adam:
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)

        def svi_step(x):
            surrogate = loss.differentiable_loss(model, guide, x)
            optimizer.zero_grad()
            surrogate.backward()
            optimizer.step()
            return surrogate.item()
    else:
        svi_step = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss=loss).step
    if storch_config is None:
        return svi_step

    def step(x):
        with handlers.estimator(config=storch_config):
            return svi_step(x)

    return step


def make_hand_written_step(device: str):
    """The same estimator in plain PyTorch: no Pyro anywhere."""
    encoder, decoder = make_networks(device)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    prior = torch.distributions.OneHotCategorical(
        logits=torch.zeros(N_LATENT, N_CAT, device=device)
    )
    state = {"baseline": None}

    def step(x):
        batch = x.shape[0]
        q = torch.distributions.OneHotCategorical(
            logits=encoder(x).reshape(batch, N_LATENT, N_CAT)
        )
        z = q.sample()
        log_q = q.log_prob(z).sum(-1)
        log_pz = prior.log_prob(z).sum(-1)
        x_logits = decoder(z.reshape(batch, N_LATENT * N_CAT))
        log_px = torch.distributions.Bernoulli(logits=x_logits).log_prob(x).sum(-1)
        cost = -log_px - log_pz + log_q
        baseline = state["baseline"]
        signal = cost.detach() if baseline is None else cost.detach() - baseline
        surrogate = (log_q * signal + cost).sum()
        optimizer.zero_grad()
        surrogate.backward()
        optimizer.step()
        mean_cost = cost.detach().mean()  # the EMA is updated after use
        if baseline is None:
            state["baseline"] = mean_cost
        else:
            state["baseline"] = DECAY * baseline + (1.0 - DECAY) * mean_cost
        return cost.detach().sum().item()

    return step


def make_steps(device: str):
    # Both storch rows keep their moving average under the param-store name of site "z", so
    # they share it; that changes no work per step.
    storch_config = {"z": estimators.ScoreFunction(baseline=baselines.MovingAverage(DECAY))}
    avg_baseline = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": DECAY}}
    return {
        "storch (StorchELBO)": make_pyro_step(
            "storch", storch.StorchELBO(), device, storch_config=storch_config
        ),
        "storch (StorchELBO, credit='data_flow')": make_pyro_step(
            "storch_flow", storch.StorchELBO(credit="data_flow"), device,
            storch_config=storch_config,
        ),
        "storch (differentiable_loss, torch Adam)": make_pyro_step(
            "storch_torch", storch.StorchELBO(), device, storch_config=storch_config,
            torch_adam=True,
        ),
        "hand-written": make_hand_written_step(device),
        "TraceGraph_ELBO": make_pyro_step(
            "tracegraph", TraceGraph_ELBO(), device, guide_infer=avg_baseline
        ),
        "Trace_ELBO (no baseline)": make_pyro_step("trace", Trace_ELBO(), device),
    }


def time_block(step, x, n_steps: int, device: str) -> float:
    """Seconds per step over a block of ``n_steps`` steps."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n_steps):
        step(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / n_steps


def benchmark(batch_size: int, args) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = load_data(batch_size, args.device)
    steps = make_steps(args.device)
    for step in steps.values():
        for _ in range(args.warmup):
            step(x)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_block(step, x, args.steps, args.device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(results: dict) -> None:
    print("| batch | implementation | ms/step | ratio vs hand-written |")
    print("|------:|:---------------|--------:|----------------------:|")
    for batch_size, medians in results.items():
        reference = medians["hand-written"]
        for name, seconds in medians.items():
            ratio = seconds / reference
            print(f"| {batch_size} | {name} | {1e3 * seconds:.3f} | {ratio:.2f}x |")


def profile(batch_size: int, args) -> None:
    """cProfile of ``args.steps * args.rounds`` StorchELBO steps (after the warm-up)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = load_data(batch_size, args.device)
    step = make_steps(args.device)["storch (StorchELBO)"]
    for _ in range(args.warmup):
        step(x)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps * args.rounds):
        step(x)
    profiler.disable()
    print(f"cProfile: {args.steps * args.rounds} StorchELBO steps, batch {batch_size}")
    pstats.Stats(profiler).strip_dirs().sort_stats("cumulative").print_stats(25)


def run_chains(args) -> None:
    """The sequential-program tables of :mod:`benchmarks.chains` (steps per block scaled
    down with T so that a block takes about as long at every length)."""
    load = os.getloadavg()[0]
    print(f"device: cpu, threads: {args.threads}, validation: {not args.no_validation}, "
          f"load average {load:.2f}, median of {args.rounds} rounds\n")
    for kind, lengths, make in (
        ("chain", args.chain, chains.make_chain_steps),
        ("enum-chain", args.enum_chain, chains.make_enum_chain_steps),
    ):
        if not lengths:
            continue
        results = {}
        for T in lengths:
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            n_steps = max(1, args.steps * 10 // T)
            results[T] = chains.time_steps(make(T), n_steps, args.rounds, min(args.warmup, 3))
        chains.print_chain_table(kind, results)
        print()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps per implementation")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-validation", action="store_true",
                        help="pyro.enable_validation(False) (on by default, as in Pyro)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the StorchELBO step (first batch size) instead")
    parser.add_argument("--chain", type=int, nargs="+", metavar="T",
                        help="time the score-function chain of T steps instead (see chains.py)")
    parser.add_argument("--enum-chain", type=int, nargs="+", metavar="T",
                        help="time the enumerated chain of T steps instead (see chains.py)")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.warmup = 2, 2, 1
    torch.set_num_threads(args.threads)
    pyro.enable_validation(not args.no_validation)
    if args.profile:
        profile(args.batch_sizes[0], args)
        return
    if args.chain or args.enum_chain:
        run_chains(args)
        return
    results = {b: benchmark(b, args) for b in args.batch_sizes}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device}, threads: {args.threads}, validation: {not args.no_validation}, "
          f"median of {args.rounds} rounds of {args.steps} steps\n")
    print_table(results)


if __name__ == "__main__":
    main()
