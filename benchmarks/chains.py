"""Per-step time of StorchELBO on sequential programs, against hand-written twins.

Two chains (``python -m benchmarks.overhead --chain 10 100 1000`` and ``--enum-chain ...``):

- **Score-function chain** (RL-like): 16 episodes in a plate, ``T`` Bernoulli actions
  :math:`a_t \\sim \\mathrm{Bern}(\\sigma(w_0 s_t + w_1))`, state :math:`s_{t+1} = s_t + a_t -
  \\tfrac12`, a cost :math:`s_{t+1}^2` per step, ``ScoreFunction()`` (credit: each action gets
  the costs from its step on). Rows: ``StorchELBO().differentiable_loss`` with one torch Adam;
  the same REINFORCE with reward-to-go written by hand; and a *Pyro-only* twin that runs the
  same program through ``pyro.sample`` / ``pyro.factor`` under ``poutine.trace`` and builds the
  same surrogate from the trace (the floor Pyro's own stack sets).
- **Enumerated chain** (HMM-like, a pure stochastic computation graph): ``T`` binary states
  :math:`z_t \\sim \\mathrm{Cat}(\\mathrm{softmax}(W_{z_{t-1}}))` under ``pyro.markov``, every
  one ``Enumerate()``, a cost :math:`c_{z_t}` per step. Rows: StorchELBO, the forward
  algorithm by hand (exact :math:`\\mathbb{E}[\\sum_t c_{z_t}]`), and Pyro's ``TraceEnum_ELBO``
  on the same-size HMM (an observation per step instead of a cost).
"""

import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

import storch_pyro as storch
from storch_pyro import estimators

N_EPISODES, LR = 16, 1e-2


# ---- score-function chain --------------------------------------------------------------------
def _policy_logits(w: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    return w[0] * state + w[1]


def make_chain_steps(T: int) -> dict:
    """One training step per implementation (each with its own parameters and Adam)."""

    def storch_program(w):
        state = torch.zeros(N_EPISODES)
        with pyro.plate("episodes", N_EPISODES):
            for t in range(T):
                a = storch.sample(f"a_{t}", dist.Bernoulli(logits=_policy_logits(w, state)))
                state = state + a - 0.5
                storch.add_cost(f"c_{t}", state ** 2)

    def pyro_program(w):
        state = torch.zeros(N_EPISODES)
        with pyro.plate("episodes", N_EPISODES):
            for t in range(T):
                a = pyro.sample(f"a_{t}", dist.Bernoulli(logits=_policy_logits(w, state)))
                state = state + a - 0.5
                pyro.factor(f"c_{t}", -(state ** 2))

    def reward_to_go_surrogate(log_probs, costs):
        log_probs, costs = torch.stack(log_probs), torch.stack(costs)  # (T, episodes)
        to_go = costs.detach().flip(0).cumsum(0).flip(0)
        return (log_probs * to_go).sum() + costs.sum()

    def hand_written(w):
        state = torch.zeros(N_EPISODES)
        log_probs, costs = [], []
        for _ in range(T):
            q = torch.distributions.Bernoulli(logits=_policy_logits(w, state))
            a = q.sample()
            log_probs.append(q.log_prob(a))
            state = state + a - 0.5
            costs.append(state ** 2)
        return reward_to_go_surrogate(log_probs, costs)

    def pyro_only(w):
        trace = poutine.trace(pyro_program).get_trace(w)
        log_probs, costs = [], []
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name.startswith("a_"):
                log_probs.append(site["fn"].log_prob(site["value"]))
            elif name.startswith("c_"):
                costs.append(-site["fn"].log_factor)
        return reward_to_go_surrogate(log_probs, costs)

    elbo = storch.StorchELBO(max_plate_nesting=1)

    def storch_loss(w):
        return elbo.differentiable_loss(storch_program, None, w)

    return {
        "StorchELBO (differentiable_loss)": _with_adam(storch_loss),
        "hand-written": _with_adam(hand_written),
        "Pyro-only (poutine.trace + factor)": _with_adam(pyro_only),
    }


# ---- enumerated chain ------------------------------------------------------------------------
def _chain_params():
    torch.manual_seed(0)
    transition = torch.randn(2, 2)
    init = torch.randn(2)
    cost = torch.tensor([0.3, -0.7])
    return transition, init, cost


def forward_expected_cost(transition, init, cost, T: int) -> torch.Tensor:
    """Exact :math:`\\mathbb{E}[\\sum_t c_{z_t}]` for :math:`z_0 \\sim \\mathrm{softmax}(init)`,
    :math:`z_t \\mid z_{t-1} \\sim \\mathrm{softmax}(W_{z_{t-1}})`: the forward recursion over
    marginals."""
    marginal = init.softmax(-1)
    matrix = transition.softmax(-1)
    total = (marginal * cost).sum()
    for _ in range(1, T):
        marginal = marginal @ matrix
        total = total + (marginal * cost).sum()
    return total


def make_enum_chain_steps(T: int, pyro_row: bool = True) -> dict:
    transition0, init0, cost = _chain_params()

    def storch_program(transition, init):
        z = storch.sample("z_0", dist.Categorical(logits=init))
        storch.add_cost("c_0", cost[z])
        for t in pyro.markov(range(1, T)):
            z = storch.sample(f"z_{t}", dist.Categorical(logits=transition[z]))
            storch.add_cost(f"c_{t}", cost[z])

    elbo = storch.StorchELBO(max_plate_nesting=0, default_estimator=estimators.Enumerate())

    def storch_loss(transition, init):
        return elbo.differentiable_loss(storch_program, None, transition, init)

    def forward_algorithm(transition, init):
        return forward_expected_cost(transition, init, cost, T)

    steps = {
        "StorchELBO (Enumerate)": _with_adam(storch_loss, transition0, init0),
        "forward algorithm (hand-written)": _with_adam(forward_algorithm, transition0, init0),
    }
    if pyro_row:
        data = torch.zeros(T, dtype=torch.long)

        def hmm(transition, init):
            z = pyro.sample("z_0", dist.Categorical(logits=init),
                            infer={"enumerate": "parallel"})
            pyro.sample("x_0", dist.Bernoulli(logits=cost[z]), obs=data[0].float())
            for t in pyro.markov(range(1, T)):
                z = pyro.sample(f"z_{t}", dist.Categorical(logits=transition[z]),
                                infer={"enumerate": "parallel"})
                pyro.sample(f"x_{t}", dist.Bernoulli(logits=cost[z]), obs=data[t].float())

        enum_elbo = TraceEnum_ELBO(max_plate_nesting=0)

        def trace_enum(transition, init):
            return enum_elbo.differentiable_loss(hmm, lambda *_: None, transition, init)

        steps["TraceEnum_ELBO (HMM, same size)"] = _with_adam(trace_enum, transition0, init0)
    return steps


# ---- timing ----------------------------------------------------------------------------------
def _with_adam(loss_fn, *initial):
    params = [p.clone().requires_grad_() for p in (initial or (torch.tensor([0.1, 0.0]),))]
    optimizer = torch.optim.Adam(params, lr=LR)

    def step():
        loss = loss_fn(*params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def time_steps(steps: dict, n_steps: int, rounds: int, warmup: int) -> dict:
    """Median seconds per step over interleaved rounds of ``n_steps`` steps."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(n_steps):
                step()
            times[name].append((time.perf_counter() - start) / n_steps)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_chain_table(kind: str, results: dict) -> None:
    print(f"| {kind} T | implementation | ms/step | ratio vs hand-written |")
    print("|---:|:---|---:|---:|")
    for T, medians in results.items():
        reference = next(v for k, v in medians.items() if "hand-written" in k)
        for name, seconds in medians.items():
            print(f"| {T} | {name} | {1e3 * seconds:.3f} | {seconds / reference:.2f}x |")


# ---- contraction order -----------------------------------------------------------------------
def compare_contraction(T: int) -> dict:
    """Seconds to sum a chain of ``T`` binary sites out of its log-factors: one
    ``pyro.ops.contract.contract_to_tensor`` call over all ``T`` factors (what contracting at
    the end of a run would do, before any cost is attached) against the sequential
    elimination in ``pyro.markov`` order that :mod:`storch_pyro.contraction` does as the
    program runs. ``python -c "import torch; torch.set_num_threads(1); from
    benchmarks.chains import compare_contraction as c; print(c(1000))"``."""
    from collections import OrderedDict

    import opt_einsum
    from pyro.ops.contract import contract_to_tensor
    from pyro.ops.rings import LogRing

    transition, init, _ = _chain_params()
    transition, init = transition.log_softmax(-1), init.log_softmax(-1)
    symbols = [opt_einsum.get_symbol(i) for i in range(T)]
    factors = [init.clone()]
    factors[0]._pyro_dims = symbols[0]
    for t in range(1, T):
        factor = transition.clone()
        factor._pyro_dims = symbols[t - 1] + symbols[t]
        factors.append(factor)
    start = time.perf_counter()
    contract_to_tensor(OrderedDict([(frozenset(), factors)]), set(symbols), ring=LogRing())
    contracted = time.perf_counter() - start
    start = time.perf_counter()
    belief = init
    for _ in range(1, T):
        belief = (belief.unsqueeze(-1) + transition).logsumexp(0)
    belief.logsumexp(0)
    sequential = time.perf_counter() - start
    return {"pyro.ops.contract (one call)": contracted, "sequential elimination": sequential}
