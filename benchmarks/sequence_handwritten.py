"""Hand-written PyTorch twin of a sequence trainer step (RLOO over k i.i.d. sequences): the
reference that ``handlers.sequence`` is timed against (issue 14: ≤ 1.3× at batch 64,
length 20, k = 4). No Pyro in the hand-written step.

The task: ``B`` random source sequences of ``L`` tokens over a vocabulary of ``V``; the
target is the source reversed; the reward of a decoded sequence is the fraction of positions
equal to the target (a tensor op, so that the timing measures the estimator and not the
metric). The model is the GRU encoder-decoder of ``examples/sequence_reward.py``: a GRU
encoder, a GRU-cell decoder started at the encoder's last state and fed the token it just
emitted, :math:`p(y_t \\mid y_{<t}, x) = \\mathrm{softmax}(W h_t)`,
:math:`h_{t+1} = \\mathrm{GRU}(\\mathrm{embed}(y_t), h_t)`; fixed length ``L`` (no ``<eos>``).

The hand-written RLOO surrogate (Kool et al. 2019) with :math:`k` sequences
:math:`y_i \\sim p(\\cdot \\mid x)` and rewards :math:`R_i`:

.. math:: \\sum_{b} \\frac1k \\sum_i \\bot\\Big(-R_i + \\frac{1}{k-1}\\sum_{j\\ne i} R_j\\Big)
    \\log p(y_i \\mid x),

the gradient of minus the expected reward summed over the batch, as ``StorchELBO`` gives for
:func:`story` with ``ScoreFunction(n_samples=k, baseline=LeaveOneOut())``.

    python -m benchmarks.sequence_handwritten          # batch 64, length 20, k 4, CPU
    python -m benchmarks.sequence_handwritten --smoke
"""

import argparse
from typing import Callable, Dict, Optional, Tuple

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import storch_pyro as storch
from benchmarks.chains import time_steps
from storch_pyro import baselines, estimators, handlers

VOCAB, HIDDEN, EMBEDDING, LR = 16, 64, 32, 1e-3


class Seq2Seq(nn.Module):
    """The GRU encoder-decoder (fixed decoding length ``length``)."""

    def __init__(self, vocab: int = VOCAB, length: int = 20, hidden: int = HIDDEN,
                 embedding: int = EMBEDDING) -> None:
        super().__init__()
        self.vocab, self.length = vocab, length
        self.source_embedding = nn.Embedding(vocab, embedding)
        self.encoder = nn.GRU(embedding, hidden, batch_first=True)
        self.target_embedding = nn.Embedding(vocab, embedding)
        self.cell = nn.GRUCell(embedding, hidden)
        self.out = nn.Linear(hidden, vocab)

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The encoder's last state ``[B, H]`` for sources ``[B, L]``."""
        return self.encoder(self.source_embedding(src))[1][0]

    def step(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The next state for tokens ``[*S]`` and states broadcastable to ``[*S, H]``."""
        x = self.target_embedding(token)
        state = state.expand(x.shape[:-1] + state.shape[-1:])
        hidden = self.cell(x.reshape(-1, x.shape[-1]), state.reshape(-1, state.shape[-1]))
        return hidden.reshape(state.shape)


def make_batch(batch_size: int, length: int, vocab: int = VOCAB,
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(src, target)``, both ``[B, L]``: random tokens and their reversal."""
    src = torch.randint(vocab, (batch_size, length), generator=generator)
    return src, src.flip(-1)


def match_reward(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of positions where ``tokens [..., B, L]`` equals ``target [B, L]``."""
    return (tokens == target).float().mean(-1)


def rloo_handwritten(model: Seq2Seq, src: torch.Tensor, target: torch.Tensor, k: int = 4,
                     reward: Callable = match_reward) -> Tuple[torch.Tensor, torch.Tensor]:
    """The RLOO surrogate of the module docstring and the rewards ``[k, B]``: ``k``
    sequences per source drawn step by step from the decoder (all ``k * B`` rows at once)."""
    state = model.encode(src)  # [B, H]: broadcast over the k rows at the first step
    log_prob = torch.zeros(())
    tokens = []
    for t in range(model.length):
        step = torch.distributions.Categorical(logits=model.out(state))
        token = step.sample((k,) if t == 0 else ())  # [k, B]
        log_prob = log_prob + step.log_prob(token)
        tokens.append(token)
        state = model.step(state, token)
    value = reward(torch.stack(tokens, -1), target)  # [k, B]
    leave_one_out = (value.sum(0, keepdim=True) - value) / (k - 1)
    return ((leave_one_out - value) * log_prob).mean(0).sum(), value


def story(model: Seq2Seq, src: torch.Tensor, target: torch.Tensor,
          estimator: estimators.Estimator, reward: Callable = match_reward) -> None:
    """The same program for ``StorchELBO`` (no guide): one sequence node, cost minus the
    reward."""
    with pyro.plate("sources", src.shape[0]):
        state = model.encode(src)
        with handlers.sequence("y", estimator=estimator) as seq:
            for t in pyro.markov(range(model.length)):
                token = storch.sample(f"y_{t}", dist.Categorical(logits=model.out(state)))
                state = model.step(seq.reorder(state), token)
        storch.add_cost("reward", -reward(seq.values(), target))


def make_sequence_steps(batch_size: int = 64, length: int = 20, k: int = 4,
                        seed: int = 0) -> Dict[str, Callable[[], float]]:
    """Trainer steps (surrogate, backward, Adam) on one fixed batch, each with its own copy
    of the same network: ``hand-written RLOO``, ``StorchELBO RLOO`` and ``StorchELBO
    UnorderedSet`` (stochastic beam search)."""
    torch.manual_seed(seed)
    reference = Seq2Seq(length=length)
    src, target = make_batch(batch_size, length, generator=torch.Generator().manual_seed(seed))
    elbo = storch.StorchELBO(max_plate_nesting=1)

    def with_adam(surrogate):
        model = Seq2Seq(length=length)
        model.load_state_dict(reference.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)

        def step() -> float:
            loss = surrogate(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        return step

    rloo = estimators.ScoreFunction(n_samples=k, baseline=baselines.LeaveOneOut())
    beam = estimators.UnorderedSet(n_samples=k)
    return {
        "hand-written RLOO": with_adam(lambda m: rloo_handwritten(m, src, target, k)[0]),
        "StorchELBO RLOO": with_adam(
            lambda m: elbo.differentiable_loss(story, None, m, src, target, rloo)),
        "StorchELBO UnorderedSet": with_adam(
            lambda m: elbo.differentiable_loss(story, None, m, src, target, beam)),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch_size, args.length, args.steps, args.rounds = 8, 5, 2, 1
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    steps = make_sequence_steps(args.batch_size, args.length, args.k)
    medians = time_steps(steps, args.steps, args.rounds, warmup=2)
    reference = medians["hand-written RLOO"]
    print(f"sequence trainer step: batch {args.batch_size}, length {args.length}, vocabulary "
          f"{VOCAB}, k = {args.k}, GRU hidden {HIDDEN}; median of {args.rounds} interleaved "
          f"rounds of {args.steps} steps, 1 CPU thread\n")
    print("| implementation | ms/step | ratio vs hand-written RLOO |")
    print("|:---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / reference:.2f}x |")


if __name__ == "__main__":
    main()
