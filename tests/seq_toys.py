"""A small autoregressive decoder and its exact expectation over all sequences, for the
sequence tests and benchmarks."""

import itertools

import pyro
import pyro.distributions as dist
import torch

import storch_pyro as storch
from storch_pyro import handlers

V, L, H = 3, 4, 4


def params(seed: int = 0, n_data: int = 3):
    g = torch.Generator().manual_seed(seed)
    p = {
        "W": torch.randn(H, H, generator=g) * 0.8,
        "E": torch.randn(V, H, generator=g),
        "U": torch.randn(H, V, generator=g),
        "C": torch.randn(2, H, generator=g),
    }
    x = torch.randn(n_data, 2, generator=g)
    return {k: v.requires_grad_() for k, v in p.items()}, x


def reward(tokens, x=None):
    """A nonlinear cost of whole sequences ``[..., L]`` (and of the input)."""
    count = (tokens == 2).float().sum(-1)
    f = (count - 1.5) ** 2 + 0.7 * (tokens[..., 0] == 1).float()
    if x is not None:
        f = f * (1.0 + x[..., 0].tanh())
    return f


def step_cost(tok, t):
    return 0.3 * (t + 1) * (tok == 1).float()


def model(p, x=None, estimator=None, eos=None, step_costs=False, length=L):
    """With ``x`` ([N, 2]) the decoder starts from ``tanh(x @ C)`` in ``plate('data', N)``."""
    if x is None:
        return _decode(p, torch.zeros(H), None, estimator, eos, step_costs, length)
    with pyro.plate("data", x.shape[0]):
        return _decode(p, torch.tanh(x @ p["C"]), x, estimator, eos, step_costs, length)


def _decode(p, state, x, estimator, eos, step_costs, length):
    with handlers.sequence("y", estimator=estimator, eos=eos) as seq:
        for t in pyro.markov(range(length)):
            logits = state @ p["U"]
            tok = storch.sample(f"tok_{t}", dist.Categorical(logits=logits))
            state = torch.tanh(seq.reorder(state) @ p["W"] + p["E"][tok])
            if step_costs:
                storch.add_cost(f"c_{t}", step_cost(tok, t))
    out = seq.values()
    tokens = out[0] if eos is not None else out
    storch.add_cost("f", reward(tokens, x))
    return out


def all_sequences(length=L):
    return torch.tensor(list(itertools.product(range(V), repeat=length)))


def exact(p, x=None, eos=None, step_costs=False, length=L):
    """E[cost] over all V^L sequences by direct computation (distinct padded sequences:
    after ``eos`` only ``eos`` has probability)."""
    seqs = all_sequences(length)  # [S, L]
    n = 1 if x is None else x.shape[0]
    state = torch.zeros(1, H) if x is None else torch.tanh(x @ p["C"])  # [n, H]
    state = state.unsqueeze(0).expand(seqs.shape[0], n, H)
    log_p = torch.zeros(seqs.shape[0], n)
    finished = torch.zeros(seqs.shape[0], dtype=torch.bool)
    total = torch.zeros(seqs.shape[0], n)
    for t in range(length):
        tok = seqs[:, t]
        lp = torch.log_softmax(state @ p["U"], -1).gather(
            -1, tok[:, None, None].expand(-1, n, 1)).squeeze(-1)
        if eos is not None:
            impossible = finished & (tok != eos)
            lp = torch.where(finished[:, None], torch.zeros_like(lp), lp)
            lp = torch.where(impossible[:, None], torch.full_like(lp, float("-inf")), lp)
            finished = finished | (tok == eos)
        log_p = log_p + lp
        state = torch.tanh(state @ p["W"] + p["E"][tok][:, None, :])
        if step_costs:
            total = total + step_cost(tok, t)[:, None]
    total = total + reward(seqs[:, None, :], x)
    prob = log_p.exp()
    return (prob * total).sum()
