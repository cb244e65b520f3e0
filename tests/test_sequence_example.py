"""The sequence example's estimators and the benchmark's hand-written twin are unbiased.

``examples/sequence_reward.py`` trains with SCST through storch (``ScoreFunction(n_samples=3,
baseline=SelfCritical())``, the greedy decode's cost as baseline) and compares with RLOO and
SCST written by hand; ``benchmarks/sequences.py`` has the hand-written RLOO that
``handlers.sequence`` is timed against. Each mean gradient over many draws must match the
exact gradient, from ``Enumerate()`` over every sequence (a tiny GRU: vocabulary 3 with
``<eos>``, length 3, two source sentences in a plate), within 4.5 standard errors per
coordinate. The rewards are tensor functions (no ``sacrebleu`` needed).
"""

import sys
from pathlib import Path

import pyro
import torch

import storch_pyro as storch
from benchmarks import sequences
from storch_pyro import estimators
from storch_pyro.diagnostics import flat_grad, gradient_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sequence_reward as example  # noqa: E402

#: decode length and position weights of the test reward
LENGTH = 3
WEIGHTS = torch.tensor([1.0, 0.6, 0.3])
#: each source sentence is repeated COPIES times in the plate: one draw of the gradient sums
#: COPIES independent estimates (vectorized), so few draws give a small standard error.
COPIES = 200
DRAWS = 60


def reward(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Weighted matches with the target, position by position (``<eos>`` included)."""
    return ((tokens == target).float() * WEIGHTS).sum(-1)


def _example_setup():
    torch.manual_seed(0)
    model = example.Translator(words=2, decode_len=LENGTH, hidden=4, embedding=4)
    for parameter in model.parameters():  # away from uniform, so the gradient is informative
        parameter.data.mul_(2.0)
    src = torch.tensor([[1, 2, 0], [2, 2, 1]]).repeat(COPIES, 1)
    lengths = torch.tensor([2, 3]).repeat(COPIES)
    target = torch.tensor([[2, 1, 0], [1, 2, 2]]).repeat(COPIES, 1)
    return model, (src, lengths, target), list(model.parameters())


def _assert_unbiased(stats, name):
    # Coordinates with (near) zero variance, e.g. the padding embedding, have no z-score.
    informative = stats.std_error > 1e-6
    z = stats.z_scores[informative].abs().max()
    assert z < 4.5, f"{name}: max |mean - exact| / s.e. = {z:.2f}"


def test_example_estimators_unbiased():
    """SCST through storch, RLOO and SCST by hand (the example's code) against Enumerate.

    Power: DRAWS draws of COPIES x 2 sentences; the s.e. of the mean gradient is asserted
    below 3% of the exact gradient's largest coordinate (measured 2.1-2.2%), so a bias of
    13.5% of that coordinate on any coordinate fails."""
    model, (src, lengths, target), params = _example_setup()
    elbo = storch.StorchELBO(max_plate_nesting=1)
    pyro.set_rng_seed(0)
    exact = flat_grad(elbo.differentiable_loss(
        example.translation, None, model, src, lengths, target, estimators.Enumerate(),
        reward_fn=reward), params)
    assert exact.abs().max() > 0.05
    greedy_cost = -reward(model.greedy(src, lengths), target)
    scst = estimators.ScoreFunction(n_samples=3, baseline=example.SelfCritical())
    draws = {
        "SCST (storch)": lambda: elbo.differentiable_loss(
            example.translation, None, model, src, lengths, target, scst,
            greedy_cost=greedy_cost, reward_fn=reward),
        "RLOO by hand": lambda: example.rloo_by_hand(
            model, src, lengths, target, k=4, reward_fn=reward)[0],
        "SCST by hand": lambda: example.scst_by_hand(
            model, src, lengths, target, k=3, reward_fn=reward)[0],
    }
    for name, loss_fn in draws.items():
        stats = gradient_stats(loss_fn, params, DRAWS, exact)
        assert float(stats.std_error.max()) < 0.03 * float(exact.abs().max()), name
        _assert_unbiased(stats, name)


class TinyDecoder(torch.nn.Module):
    """The interface of ``benchmarks.sequences.Decoder`` (start, out, step), vocabulary 3."""

    def __init__(self) -> None:
        super().__init__()
        self.init = torch.nn.Linear(2, 4)
        self.embed = torch.nn.Embedding(3, 4)
        self.cell = torch.nn.GRUCell(4, 4)
        self.out = torch.nn.Linear(4, 3)

    def start(self, x):
        return torch.tanh(self.init(x))

    def step(self, h, tok):
        emb = self.embed(tok)
        shape = torch.broadcast_shapes(emb.shape[:-1], h.shape[:-1])
        h = self.cell(emb.expand(shape + (4,)).reshape(-1, 4),
                      h.expand(shape + (4,)).reshape(-1, 4))
        return h.reshape(shape + (4,))


def test_benchmark_handwritten_rloo_unbiased():
    """``benchmarks/sequences.py``'s hand-written RLOO(4), the reference storch is timed
    against, is unbiased: against Enumerate over its own story (a tiny decoder with its
    interface: vocabulary 3, length 3, no ``<eos>``).

    Power: as above (s.e. asserted below 3% of the largest exact coordinate, measured 1.0%):
    a bias of 13.5% of it fails; e.g. averaging with the sample's own reward in the baseline
    (the mean of all k, not of the other k - 1) shrinks the gradient by 25%, and fails."""
    torch.manual_seed(1)
    decoder = TinyDecoder()
    for parameter in decoder.parameters():
        parameter.data.mul_(2.0)
    params = list(decoder.parameters())
    x = torch.randn(2, 2).repeat(COPIES, 1)
    reference = torch.tensor([[0, 1, 2], [2, 2, 1]]).repeat(COPIES, 1)
    elbo = storch.StorchELBO(max_plate_nesting=1)
    exact = flat_grad(elbo.differentiable_loss(
        sequences.storch_model, None, decoder, x, reference, estimators.Enumerate(), LENGTH),
        params)
    pyro.set_rng_seed(0)
    stats = gradient_stats(
        lambda: sequences.handwritten_rloo(decoder, x, reference, 4, LENGTH), params, DRAWS,
        exact)
    assert float(stats.std_error.max()) < 0.03 * float(exact.abs().max())
    _assert_unbiased(stats, "hand-written RLOO")

