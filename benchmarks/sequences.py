"""Per-step time of sequence training with :func:`storch_pyro.handlers.sequence`.

The task: a GRU decoder (vocab 32, hidden 64, embedding 32) conditioned on an input vector
per data point (batch 64 in ``pyro.plate``), ``k = 4`` sequences of length 20 per data point,
a sequence-level reward (a token-match score against a fixed reference), one Adam step per
training step. Implementations, each with its own copy of the same networks:

- ``hand-written RLOO``: plain PyTorch: sample ``k`` i.i.d. sequences, joint log-prob,
  ``sum((f - mean of the others).detach() * log p) / (k - 1)`` plus nothing else;
- ``storch RLOO``: ``StorchELBO().differentiable_loss`` with
  ``handlers.sequence(estimator=ScoreFunction(4, baseline=LeaveOneOut()))``;
- ``storch SBS``: the same with ``UnorderedSet(4)`` (stochastic beam search, unordered set
  estimator with exact leave-one-out ratios);
- ``hand-written SBS draw`` / ``hand-written i.i.d. draw``: only drawing the ``k``
  sequences (no gradient), to compare the cost of beam search with i.i.d. sampling.

Blocks of ``--steps`` steps are timed in interleaved rounds after a warm-up; the table
gives the median time per step over rounds, and the ratios the issue sets targets for
(storch RLOO / hand-written RLOO <= 1.3; storch SBS / storch RLOO <= 1.5).

    python -m benchmarks.sequences              # CPU, 1 thread
    python -m benchmarks.sequences --smoke      # tiny, for the tests
"""

import argparse
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.estimators._sequence_math import beam_step

VOCAB, HIDDEN, EMBED, INPUT = 32, 64, 32, 16


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.init = nn.Linear(INPUT, HIDDEN)
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.cell = nn.GRUCell(EMBED, HIDDEN)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def start(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.init(x))

    def step(self, h: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        emb = self.embed(tok)
        shape = torch.broadcast_shapes(emb.shape[:-1], h.shape[:-1])
        h = self.cell(emb.expand(shape + emb.shape[-1:]).reshape(-1, EMBED),
                      h.expand(shape + h.shape[-1:]).reshape(-1, HIDDEN))
        return h.reshape(shape + (HIDDEN,))


def reward(tokens: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Fraction of positions matching the reference ``[..., L]``."""
    return (tokens == reference).float().mean(-1)


def storch_model(decoder, x, reference, estimator, length):
    with pyro.plate("data", x.shape[0]):
        h = decoder.start(x)
        with handlers.sequence("y", estimator=estimator) as seq:
            for t in pyro.markov(range(length)):
                tok = storch.sample(f"tok_{t}", dist.Categorical(logits=decoder.out(h)))
                h = decoder.step(seq.reorder(h), tok)
        storch.add_cost("reward", -reward(seq.values(), reference))


def handwritten_rloo(decoder, x, reference, k, length):
    h = decoder.start(x).expand(k, -1, -1)  # [k, B, H]
    log_p, tokens = 0.0, []
    for _ in range(length):
        logits = torch.log_softmax(decoder.out(h), -1)
        tok = torch.distributions.Categorical(logits=logits.detach()).sample()
        log_p = log_p + logits.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
        tokens.append(tok)
        h = decoder.step(h, tok)
    cost = -reward(torch.stack(tokens, -1), reference)  # [k, B]
    baseline = (cost.sum(0, keepdim=True) - cost) / (k - 1)
    return (log_p * (cost - baseline).detach()).sum() / k + cost.mean(0).sum().detach() * 0


def draw_iid(decoder, x, k, length):
    with torch.no_grad():
        h = decoder.start(x).expand(k, -1, -1)
        for _ in range(length):
            tok = torch.distributions.Categorical(logits=decoder.out(h)).sample()
            h = decoder.step(h, tok)


def draw_sbs(decoder, x, k, length):
    with torch.no_grad():
        h = decoder.start(x).unsqueeze(-2).expand(-1, k, -1)  # [B, k, H]
        phi = torch.zeros(x.shape[0], k)
        top = torch.full((x.shape[0], k), float("-inf"))
        top[:, 0] = 0.0
        for _ in range(length):
            log_p = torch.log_softmax(decoder.out(h), -1)
            phi_ok = torch.where(top > float("-inf"), phi, torch.full_like(phi, float("-inf")))
            parents, tok, top, _ = beam_step(log_p, phi_ok, top, k)
            phi = phi.gather(-1, parents) + log_p.gather(
                -2, parents.unsqueeze(-1).expand(-1, -1, VOCAB)).gather(
                -1, tok.unsqueeze(-1)).squeeze(-1)
            h = decoder.step(h.gather(-2, parents.unsqueeze(-1).expand(-1, -1, HIDDEN)), tok)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.length, args.steps, args.rounds = 4, 3, 1, 1
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x = torch.randn(args.batch, INPUT)
    reference = torch.randint(VOCAB, (args.batch, args.length))
    k, length = args.k, args.length

    def make(loss_fn):
        torch.manual_seed(0)
        decoder = Decoder()
        optim = torch.optim.Adam(decoder.parameters(), lr=1e-3)

        def step():
            optim.zero_grad()
            loss_fn(decoder).backward()
            optim.step()

        return step, decoder

    elbo_rloo, elbo_sbs = storch.StorchELBO(), storch.StorchELBO()
    rloo = estimators.ScoreFunction(k, baseline=baselines.LeaveOneOut())
    sbs = estimators.UnorderedSet(k)
    impls = {
        "hand-written RLOO": make(lambda d: handwritten_rloo(d, x, reference, k, length))[0],
        "storch RLOO": make(lambda d: elbo_rloo.differentiable_loss(
            storch_model, None, d, x, reference, rloo, length))[0],
        "storch SBS (UnorderedSet)": make(lambda d: elbo_sbs.differentiable_loss(
            storch_model, None, d, x, reference, sbs, length))[0],
    }
    decoder = Decoder()
    impls["hand-written i.i.d. draw"] = lambda: draw_iid(decoder, x, k, length)
    impls["hand-written SBS draw"] = lambda: draw_sbs(decoder, x, k, length)
    for step in impls.values():  # warm-up (and the first, validated, StorchELBO steps)
        for _ in range(1 if args.smoke else 2):
            step()
    times = {name: [] for name in impls}
    for _ in range(args.rounds):
        for name, step in impls.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"batch {args.batch}, length {length}, k {k}, vocab {VOCAB}, hidden {HIDDEN}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds of {args.steps} steps\n")
    print("| implementation | ms / step | ratio |")
    print("|---|---|---|")
    base = median["hand-written RLOO"]
    for name, value in median.items():
        ref = median["hand-written i.i.d. draw"] if "draw" in name else base
        print(f"| {name} | {1000 * value:.2f} | {value / ref:.2f} |")
    print(f"\nstorch RLOO / hand-written RLOO: {median['storch RLOO'] / base:.2f} (target <= 1.3)")
    print(f"storch SBS / storch RLOO: "
          f"{median['storch SBS (UnorderedSet)'] / median['storch RLOO']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
