"""Policy-gradient reinforcement learning on gymnasium's CartPole-v1, as a generative story.

A batch of ``k`` episodes is a Pyro model without a guide (a pure stochastic computation
graph): each action is a ``storch.sample`` site in a step loop, each reward a cost:

    with pyro.plate("episodes", k):
        for t in pyro.markov(range(500)):
            a_t ~ Categorical(policy(s_t))          # storch.sample(f"action_{t}", ...)
            s_{t+1}, r_t = env.step(a_t)
            add_cost(f"reward_{t}", -r_t)

``StorchELBO`` minimizes the expected cost, the negative return. Its credit assignment
gives each action's score term only the costs computed after it, in its own episode: the
*reward-to-go* :math:`\\sum_{t' \\ge t} r_{t'}`, with no code for it in the story. The
methods compared differ only in the baseline :math:`b` of the score-function estimator
:math:`\\hat g = \\sum_t (-\\text{reward-to-go}_t - b_t)\\nabla\\log\\pi(a_t \\mid s_t)`:

- ``none``: REINFORCE (Williams 1992);
- ``moving-average``: ``baselines.MovingAverage``, one average per step index ``t``;
- ``leave-one-out``: the mean reward-to-go at step ``t`` of the *other* episodes of the
  batch (RLOO across episodes, Kool et al. 2019), a small custom ``Baseline`` below;
- ``critic``: a learned state value :math:`V_\\psi(s_t)` (actor-critic, the ``nn_baseline``
  annotation of Pyro's ``TraceGraph_ELBO``; trained by squared error to the reward-to-go).

The baselines are installed from outside with ``storch_pyro.handlers.baseline`` (the critic
through the site's ``infer`` annotation, since it needs the state). Training is Pyro's
``SVI`` with ``guide=None``. For each method and seed the script reports the number of
episodes until the mean return of the last 50 episodes reaches 475 (CartPole-v1's
threshold), and plots the learning curves (``--out``, default ``examples/out/rl_cartpole``).

    python examples/rl_cartpole.py                          # all methods, 3 seeds
    python examples/rl_cartpole.py --methods critic --seeds 0 1 2 3 4
    python examples/rl_cartpole.py --smoke                  # a few updates
"""

import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional

import gymnasium as gym
import pyro
import pyro.distributions as dist
import torch
from _common import output_dir, save_curves
from torch import nn
from tqdm import tqdm

import storch_pyro as storch
from storch_pyro import baselines, handlers

MAX_STEPS = 500  # CartPole-v1 truncates episodes at 500 steps
SOLVED = 475.0
WINDOW = 50


class CartPoles:
    """``k`` CartPole-v1 environments stepped together (gymnasium's ``SyncVectorEnv``); a
    finished episode stays finished: its later rewards are zero and its state is frozen at
    its last observation (the vector environment resets it in the background, and this
    class ignores what it does after that)."""

    def __init__(self, k: int) -> None:
        self.envs = gym.make_vec("CartPole-v1", num_envs=k, vectorization_mode="sync")
        self.num_envs = k
        self.alive = torch.ones(k, dtype=torch.bool)
        self.state = torch.zeros(k, 4)
        self.returns = torch.zeros(k)  # of the current episodes

    def reset(self, seed: int) -> torch.Tensor:
        """Starts ``k`` episodes, environment ``i`` seeded with ``seed + i``."""
        observation, _ = self.envs.reset(seed=seed)
        self.state.copy_(torch.as_tensor(observation))
        self.alive.fill_(True)
        self.returns.zero_()
        return self.state.clone()

    def step(self, actions: torch.Tensor) -> torch.Tensor:
        """Steps the episodes; returns the rewards (zero for finished ones)."""
        observation, reward, terminated, truncated, _ = self.envs.step(actions.numpy())
        running = self.alive.clone()
        rewards = torch.as_tensor(reward, dtype=torch.float32) * running
        self.state[running] = torch.as_tensor(observation)[running]
        self.returns += rewards
        self.alive &= ~torch.as_tensor(terminated | truncated)
        return rewards

    def close(self) -> None:
        self.envs.close()


def episodes(policy: nn.Module, envs: CartPoles, seed: int,
             critic: Optional[nn.Module] = None) -> None:
    """The generative story of ``k`` episodes (``k`` environments in ``envs``)."""
    pyro.module("policy", policy)
    if critic is not None:
        pyro.module("critic", critic)
    state = envs.reset(seed)
    with pyro.plate("episodes", envs.num_envs):
        for t in pyro.markov(range(MAX_STEPS)):
            infer = {}
            if critic is not None:
                infer = {"baseline": {"nn_baseline": critic, "nn_baseline_input": state}}
            # A finished episode draws a dummy action from a fixed fair coin: its score
            # term has no gradient, so neither it nor its baseline adds variance.
            logits = torch.where(envs.alive[:, None].clone(), policy(state), torch.zeros(2))
            action = storch.sample(f"action_{t}", dist.Categorical(logits=logits), infer=infer)
            rewards = envs.step(action)
            storch.add_cost(f"reward_{t}", -rewards)
            state = envs.state.clone()
            if not envs.alive.any():
                break


class LeaveOtherEpisodesOut(baselines.Baseline):
    """For episode :math:`i` at step :math:`t`: the mean downstream cost (negative
    reward-to-go) of the other episodes still running at :math:`t`,

    .. math:: b_{i,t} = \\frac{1}{|R_t \\setminus \\{i\\}|}\\sum_{j \\in R_t, j \\ne i} D_{j,t},

    where :math:`R_t` are the episodes with a nonzero downstream cost (a running episode
    gets reward 1 per step, a finished one 0). Episodes are independent given the policy, so
    :math:`b_{i,t}` does not depend on episode :math:`i`'s actions: unbiased.
    ``baselines.LeaveOneOut`` does the same along a site's own sample dim; here the
    episodes are a plate (dim ``-1``), since each step's action needs the previous state.
    """

    def __call__(self, ctx: baselines.BaselineContext, downstream_cost: torch.Tensor):
        cost = downstream_cost.detach()
        running = (cost != 0).to(cost.dtype)
        others = (running.sum(-1, keepdim=True) - running).clamp(min=1)
        return ((cost * running).sum(-1, keepdim=True) - cost * running) / others


class Critic(nn.Module):
    """:math:`V_\\psi(s)`, a small MLP whose output is scaled to the size of the returns
    (up to 500), so that Adam's small steps can reach them. As an ``nn_baseline`` it is a
    baseline in Pyro's sign, of minus the downstream costs: the reward-to-go."""

    def __init__(self, scale: float = 100.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 1), nn.Flatten(0))
        self.scale = scale

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(state)


def make_networks(seed: int):
    torch.manual_seed(seed)
    policy = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 2))
    return policy, Critic()


def train(method: str, seed: int, args) -> List[float]:
    """Trains a fresh policy with ``method``; returns the return of every episode."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    policy, critic = make_networks(seed)
    envs = CartPoles(args.episodes_per_step)
    baseline = {
        "none": None,
        "moving-average": baselines.MovingAverage(0.9),
        "leave-one-out": LeaveOtherEpisodesOut(),
        "critic": None,
    }[method]
    critic_arg = critic if method == "critic" else None
    svi = pyro.infer.SVI(
        episodes, None, pyro.optim.Adam({"lr": args.lr}),
        loss=storch.StorchELBO(max_plate_nesting=1),
    )
    returns: List[float] = []
    progress = tqdm(range(args.max_updates), desc=f"{method} seed {seed}", file=sys.stdout,
                    disable=args.smoke, mininterval=2.0, leave=False)
    for update in progress:
        run_seed = 1000 * seed + update * args.episodes_per_step
        with handlers.baseline(config=lambda msg: baseline):
            svi.step(policy, envs, run_seed, critic_arg)
        returns.extend(envs.returns.tolist())
        recent = statistics.fmean(returns[-WINDOW:])
        progress.set_postfix(episodes=len(returns), mean_return=f"{recent:.0f}")
        if len(returns) >= WINDOW and recent >= SOLVED:
            break
    progress.close()
    envs.close()
    return returns


def episodes_to_solve(returns: List[float]) -> Optional[int]:
    """The number of episodes after which the mean of the last ``WINDOW`` returns first
    reaches ``SOLVED``, or ``None``."""
    for n in range(WINDOW, len(returns) + 1):
        if statistics.fmean(returns[n - WINDOW:n]) >= SOLVED:
            return n
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    methods = ["none", "moving-average", "leave-one-out", "critic"]
    parser.add_argument("--methods", nargs="+", default=methods, choices=methods)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--episodes-per-step", type=int, default=8)
    parser.add_argument("--max-updates", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", default=None, help="folder for the PNG")
    parser.add_argument("--smoke", action="store_true", help="a few updates, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.max_updates, args.episodes_per_step = [0], 3, 4
    torch.set_num_threads(1)

    curves: Dict[str, List[float]] = {}
    print(f"CartPole-v1, {args.episodes_per_step} episodes per update, Adam lr {args.lr}, "
          f"at most {args.max_updates} updates; solved: mean return of the last {WINDOW} "
          f"episodes >= {SOLVED:.0f}\n")
    print("| baseline | episodes to solve, per seed | median | seconds |")
    print("|:---------|:----------------------------|-------:|--------:|")
    for method in args.methods:
        solved_at = []
        start = time.perf_counter()
        for seed in args.seeds:
            returns = train(method, seed, args)
            solved_at.append(episodes_to_solve(returns))
            curves[f"{method}, seed {seed}"] = returns
        seconds = time.perf_counter() - start
        shown = ", ".join("-" if n is None else str(n) for n in solved_at)
        limit = args.max_updates * args.episodes_per_step
        ranked = sorted(n if n is not None else float("inf") for n in solved_at)
        median = ranked[len(ranked) // 2]
        median_text = f"> {limit}" if median == float("inf") else str(median)
        print(f"| {method} | {shown} | {median_text} | {seconds:.0f} |")
    out = output_dir(args.out, "rl_cartpole")
    smoothed = {
        name: [statistics.fmean(r[max(0, n - WINDOW):n]) for n in range(1, len(r) + 1)]
        for name, r in curves.items()
    }
    save_curves(smoothed, out / "returns.png",
                f"CartPole-v1: mean return of the last {WINDOW} episodes "
                f"(one line per seed)", "episodes", "return",
                groups={name: name.split(",")[0] for name in smoothed})
    print(f"\n'-': not solved within {args.max_updates} updates "
          f"({args.max_updates * args.episodes_per_step} episodes). Wrote {out / 'returns.png'}")


if __name__ == "__main__":
    main()
