"""Enumerated ``pyro.markov`` chains in a guide (ELBO mode) and under ``credit="data_flow"``:
seconds per step and peak memory against ``T``.

- **guide**: an HMM (binary states, a Normal observation per step), the guide
  :math:`q(z_t \\mid z_{t-1}, x_t)` a chain with every site ``Enumerate()``; rows:
  ``StorchELBO``, ``TraceEnum_ELBO`` (the guide under ``config_enumerate``), and the exact
  loss by the forward algorithm written by hand.
- **data_flow**: the SCG chain of :func:`benchmarks.chains.make_enum_chain_steps` with
  ``credit="data_flow"``.

Each (row, T) runs in its own process (peak RSS from ``getrusage``, minus that of the
process before the step), one torch thread: ``python -m benchmarks.guide_chain --T 10 100 1000``.
Run against another checkout with ``PYTHONPATH`` set to it (the "before" figures).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

K = 2


def _hmm(T: int):
    import pyro
    import pyro.distributions as dist
    import torch

    generator = torch.Generator().manual_seed(0)
    params = {name: torch.randn(shape, generator=generator).requires_grad_()
              for name, shape in [("init", (K,)), ("trans", (K, K)), ("locs", (K,)),
                                  ("q0", (K,)), ("qtrans", (K, K))]}
    data = torch.randn(T, generator=generator)

    def model(p):
        z = pyro.sample("z_0", dist.Categorical(logits=p["init"]))
        pyro.sample("x_0", dist.Normal(p["locs"][z], 1.0), obs=data[0])
        for t in pyro.markov(range(1, T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=p["trans"][z]))
            pyro.sample(f"x_{t}", dist.Normal(p["locs"][z], 1.0), obs=data[t])

    def guide(p):
        z = pyro.sample("z_0", dist.Categorical(logits=p["q0"]))
        for t in pyro.markov(range(1, T)):
            z = pyro.sample(f"z_{t}", dist.Categorical(logits=p["qtrans"][z] + data[t]))

    def forward(p):
        log_lik = dist.Normal(p["locs"], 1.0).log_prob(data[:, None])
        log_q0, log_p0 = p["q0"].log_softmax(-1), p["init"].log_softmax(-1)
        alpha = log_q0.exp()
        loss = (alpha * (log_q0 - log_p0 - log_lik[0])).sum()
        log_trans = p["trans"].log_softmax(-1)
        for t in range(1, T):
            log_q = (p["qtrans"] + data[t]).log_softmax(-1)
            pair = alpha[:, None] * log_q.exp()
            alpha = pair.sum(0)
            loss = loss + (pair * (log_q - log_trans)).sum() - (alpha * log_lik[t]).sum()
        return loss

    return params, model, guide, forward


def _loss_fn(row: str, T: int):
    from pyro.infer import TraceEnum_ELBO, config_enumerate

    import storch_pyro as storch
    from storch_pyro import estimators

    if row == "data_flow":
        import pyro
        import pyro.distributions as dist
        import torch

        torch.manual_seed(0)
        params = {"transition": torch.randn(2, 2).requires_grad_(),
                  "init": torch.randn(2).requires_grad_()}
        cost = torch.tensor([0.3, -0.7])

        def program(p):
            z = storch.sample("z_0", dist.Categorical(logits=p["init"]))
            storch.add_cost("c_0", cost[z])
            for t in pyro.markov(range(1, T)):
                z = storch.sample(f"z_{t}", dist.Categorical(logits=p["transition"][z]))
                storch.add_cost(f"c_{t}", cost[z])

        elbo = storch.StorchELBO(max_plate_nesting=0, credit="data_flow",
                                 default_estimator=estimators.Enumerate())
        return params, lambda p: elbo.differentiable_loss(program, None, p)
    params, model, guide, forward = _hmm(T)
    if row == "storch":
        elbo = storch.StorchELBO(max_plate_nesting=0, default_estimator=estimators.Enumerate())
        return params, lambda p: elbo.differentiable_loss(model, guide, p)
    if row == "trace_enum":
        elbo = TraceEnum_ELBO(max_plate_nesting=0)
        enumerated = config_enumerate(guide)
        return params, lambda p: elbo.differentiable_loss(model, enumerated, p)
    return params, forward


def measure(row: str, T: int, steps: int) -> dict:
    """Seconds of the first step (validated), median seconds per later step (loss and
    backward), and peak RSS growth in MB, in this process."""
    import torch

    torch.set_num_threads(1)
    params, loss_fn = _loss_fn(row, T)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = loss_fn(params)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"row": row, "T": T, "loss": float(loss.detach()), "first_s": times[0],
            "step_s": statistics.median(times[1:]) if steps else times[0],
            "peak_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--T", type=int, nargs="+", default=[10, 20, 100, 1000])
    parser.add_argument("--rows", nargs="+", default=["storch", "trace_enum", "forward"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.steps)))
        return
    print("| row | T | first step (s) | s/step | peak RSS growth (MB) | loss |")
    print("|:--|--:|--:|--:|--:|--:|")
    for row in args.rows:
        for T in args.T:
            command = [sys.executable, "-m", "benchmarks.guide_chain", "--one", row, str(T),
                       "--steps", str(args.steps)]
            try:
                out = subprocess.run(command, capture_output=True, text=True,
                                     timeout=args.timeout, check=True).stdout
            except subprocess.TimeoutExpired:
                print(f"| {row} | {T} | > {args.timeout:.0f} | | | |", flush=True)
                continue
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {row} | {T} | {r['first_s']:.3f} | {r['step_s']:.4f} | "
                  f"{r['peak_mb']:.0f} | {r['loss']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
