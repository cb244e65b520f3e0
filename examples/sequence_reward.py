"""A GRU encoder-decoder trained on sentence-level BLEU: sequences as one stochastic node.

A toy "translation": the source is 3-8 words of a 12-word language, the reference is the
sentence reversed with each word translated by a fixed dictionary (``w3 -> t7`` ...), then
``<eos>``. A small GRU encoder-decoder (no attention) is pretrained briefly by maximum
likelihood (teacher forcing), then fine-tuned on the reward practitioners report: the
sentence-level BLEU of ``sacrebleu`` (a non-differentiable function of the decoded words).
Each decoded sentence is ONE stochastic node of ``L`` token choices
(``storch_pyro.handlers.sequence``)::

    with pyro.plate("sentences", B):
        state = encoder(src)                                             # [B, H]
        with handlers.sequence("translation", estimator=..., eos=EOS) as seq:
            for t in pyro.markov(range(max_len)):
                tok = storch.sample(f"tok_{t}", dist.Categorical(logits=out(state)))
                state = gru(embed(tok), seq.reorder(state))                 # [k, B, H]
        tokens, mask = seq.values()                                      # [k, B, L]
        storch.add_cost("bleu", -sentence_bleu(tokens, reference))      # [k, B]

The story is written once; three estimators at the same decode budget (4 sentences decoded
per source sentence and step):

- **RLOO(4)**: ``ScoreFunction(n_samples=4, baseline=LeaveOneOut())``, 4 i.i.d. sentences,
  each one's baseline the mean reward of the other three (Kool et al. 2019);
- **UnorderedSet(4)**: 4 *distinct* sentences by stochastic beam search (Kool, van Hoof &
  Welling 2019) and the unordered set estimator with its built-in baseline (Kool et al.
  2020);
- **SCST(3)**: self-critical sequence training (Rennie et al. 2017): the baseline of a
  sampled sentence is the reward of the model's greedy decode of the same source,
  ``ScoreFunction(n_samples=3, baseline=SelfCritical())`` with the greedy reward passed to
  the model (3 samples + 1 greedy decode = 4 decodes). Unbiased: the greedy decode does not
  depend on the samples.

A reference row continues the maximum-likelihood training for as many steps instead. With
``--handwritten`` the same RLOO and SCST gradients are also computed by a plain PyTorch
surrogate (no Pyro), as a check of the curves and of the time per step.

Reported: the corpus BLEU (``sacrebleu.corpus_bleu``) of greedy decodes of a held-out set
before and after fine-tuning, the mean sentence BLEU of the decoded training samples (for
``UnorderedSet`` the distinct sentences of the beam, not i.i.d. ones), seconds per step; curves in
``bleu.png`` (``--out``, default ``examples/out/sequence_reward``). Needs ``sacrebleu``
(``pip install -e ".[examples]"``).

    python examples/sequence_reward.py          # a few minutes on one CPU core
    python examples/sequence_reward.py --smoke  # seconds (the tests run it)
"""

import argparse
import sys
import time
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pyro
import pyro.distributions as dist
import torch
from _common import output_dir, save_curves
from torch import nn

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers

WORDS = 12  # source and target words
EOS = 0  # target ids: 0 = <eos>, 1..WORDS the target words
MIN_LEN, MAX_LEN = 3, 8
DECODE_LEN = MAX_LEN + 1  # room for <eos>


# ---- the task -------------------------------------------------------------------------------
class Task:
    """Random source sentences and their references (reverse, then translate each word by a
    fixed random dictionary). Source ids ``1..WORDS`` (0 pads), target ids ``1..WORDS``."""

    def __init__(self, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.dictionary = torch.randperm(WORDS, generator=generator) + 1  # source w -> target

    def batch(self, size: int, generator: torch.Generator):
        """``(src [B, MAX_LEN], lengths [B], target [B, DECODE_LEN])``: target is the reference
        followed by ``<eos>`` (and ``<eos>`` padding)."""
        lengths = torch.randint(MIN_LEN, MAX_LEN + 1, (size,), generator=generator)
        words = torch.randint(1, WORDS + 1, (size, MAX_LEN), generator=generator)
        position = torch.arange(MAX_LEN)
        src = torch.where(position < lengths.unsqueeze(-1), words, 0)
        # reversed: target position j holds source position length - 1 - j
        index = (lengths.unsqueeze(-1) - 1 - position).clamp(min=0)
        reference = self.dictionary[src.gather(-1, index) - 1]
        target = torch.full((size, DECODE_LEN), EOS)
        target[:, :MAX_LEN] = torch.where(position < lengths.unsqueeze(-1), reference, EOS)
        return src, lengths, target


def sentence(tokens: Sequence[int]) -> str:
    """The words up to the first ``<eos>``, as a string ``"t3 t11 ..."``."""
    words = []
    for token in tokens:
        if token == EOS:
            break
        words.append(f"t{token}")
    return " ".join(words)


@lru_cache(maxsize=200_000)
def _bleu(hypothesis: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100.0


def sentence_bleu(tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sentence BLEU in [0, 1] of each decoded sentence ``tokens [..., B, L]`` against its
    reference ``target [B, L']`` (sacrebleu's defaults: 13a tokenization, exp smoothing)."""
    references = [sentence(row) for row in target.tolist()]
    flat = tokens.reshape(-1, tokens.shape[-2], tokens.shape[-1]).tolist()
    scores = [[_bleu(sentence(row), ref) for row, ref in zip(rows, references)] for rows in flat]
    return torch.tensor(scores, dtype=torch.float32).reshape(tokens.shape[:-1])


#: a reward of decoded tokens ``[..., B, L]`` given the targets ``[B, L']``: ``[..., B]``
#: (``None``: :func:`sentence_bleu`).
Reward = Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


# ---- the model --------------------------------------------------------------------------------
class Translator(nn.Module):
    """GRU encoder, GRU-cell decoder whose first state is the encoder's last one; the
    decoder reads the token it just emitted: ``h_{t+1} = GRU(embed(y_t), h_t)``,
    ``p(y_t | y_{<t}, x) = softmax(W h_t)``."""

    def __init__(self, words: int = WORDS, decode_len: int = DECODE_LEN, hidden: int = 64,
                 embedding: int = 32) -> None:
        super().__init__()
        self.decode_len = decode_len
        self.source_embedding = nn.Embedding(words + 1, embedding, padding_idx=0)
        self.encoder = nn.GRU(embedding, hidden, batch_first=True)
        self.target_embedding = nn.Embedding(words + 1, embedding)
        self.cell = nn.GRUCell(embedding, hidden)
        self.out = nn.Linear(hidden, words + 1)

    def encode(self, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(
            self.source_embedding(src), lengths, batch_first=True, enforce_sorted=False)
        return self.encoder(packed)[1][0]  # [B, H]

    def step(self, state: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        """The next state for tokens ``[*S]`` and states broadcastable to ``[*S, H]``."""
        x = self.target_embedding(token)
        state = state.expand(x.shape[:-1] + state.shape[-1:])
        hidden = self.cell(x.reshape(-1, x.shape[-1]), state.reshape(-1, state.shape[-1]))
        return hidden.reshape(state.shape)

    def nll(self, src, lengths, target) -> torch.Tensor:
        """Teacher-forced negative log-likelihood of the targets (summed over words, mean
        over sentences), ``<eos>`` included, padding after it excluded."""
        state = self.encode(src, lengths)
        total = torch.zeros(())
        for t in range(self.decode_len):
            logits = self.out(state)
            total = total + nn.functional.cross_entropy(
                logits, target[:, t], reduction="none")[t <= lengths].sum()
            state = self.step(state, target[:, t])
        return total / src.shape[0]

    @torch.no_grad()
    def greedy(self, src, lengths) -> torch.Tensor:
        """Greedy decodes ``[B, decode_len]`` (``<eos>`` after the first ``<eos>``)."""
        state = self.encode(src, lengths)
        finished = torch.zeros(src.shape[0], dtype=torch.bool)
        tokens = []
        for _ in range(self.decode_len):
            token = torch.where(finished, EOS, self.out(state).argmax(-1))
            finished = finished | (token == EOS)
            tokens.append(token)
            state = self.step(state, token)
        return torch.stack(tokens, -1)


# ---- the generative story ---------------------------------------------------------------
def translation(model: Translator, src, lengths, target, estimator,
                greedy_cost: Optional[torch.Tensor] = None,
                rewards: Optional[List[torch.Tensor]] = None, reward_fn: Reward = None) -> None:
    """The story: decode a sentence per source, pay minus its BLEU (or ``reward_fn(tokens,
    target)``). ``greedy_cost`` (minus the greedy decode's reward, ``[B]``) is read by
    :class:`SelfCritical`; the rewards ``[k, B]`` are appended to ``rewards`` if given."""
    with pyro.plate("sentences", src.shape[0]):
        state = model.encode(src, lengths)
        with handlers.sequence("translation", estimator=estimator, eos=EOS) as seq:
            for t in pyro.markov(range(model.decode_len)):
                token = storch.sample(f"tok_{t}", dist.Categorical(logits=model.out(state)))
                state = model.step(seq.reorder(state), token)
        tokens, _ = seq.values()  # [k, B, L], <eos> after the first <eos>
        reward = (reward_fn or sentence_bleu)(tokens, target)
        storch.add_cost("bleu", -reward)
    if rewards is not None:
        rewards.append(reward)


class SelfCritical(baselines.Baseline):
    """SCST's baseline (Rennie et al. 2017): the cost of the model's greedy decode of the
    same source, ``b = -BLEU(greedy)``, given to the model as ``greedy_cost=``. It does not
    depend on the samples, so the estimator stays unbiased."""

    def __call__(self, ctx: baselines.BaselineContext, downstream_cost: torch.Tensor):
        greedy_cost = ctx.kwargs.get("greedy_cost")
        if greedy_cost is None:
            raise ValueError("SelfCritical: call the model with greedy_cost=-BLEU(greedy decode)")
        return greedy_cost

    def __repr__(self) -> str:
        return "SelfCritical()"


# ---- the same estimators by hand (plain PyTorch) --------------------------------------------
def sample_by_hand(model: Translator, src, lengths, k: int):
    """``k`` i.i.d. sentences per source: tokens ``[k, B, L]`` and their log-probabilities
    ``[k, B]`` (steps after ``<eos>`` are ``<eos>`` and count 0)."""
    state = model.encode(src, lengths)
    finished = torch.zeros((k, src.shape[0]), dtype=torch.bool)
    log_prob = torch.zeros((k, src.shape[0]))
    tokens = []
    for _ in range(model.decode_len):
        step = torch.distributions.Categorical(logits=model.out(state))
        token = torch.where(finished, EOS, step.sample(() if state.dim() == 3 else (k,)))
        log_prob = log_prob + torch.where(finished, 0.0, step.log_prob(token))
        finished = finished | (token == EOS)
        tokens.append(token)
        state = model.step(state, token)
    return torch.stack(tokens, -1), log_prob


def rloo_by_hand(model, src, lengths, target, k: int = 4,
                 reward_fn: Reward = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """RLOO's surrogate :math:`\\sum_b \\frac1k\\sum_i (-R_i + \\bar R_{-i}) \\log p(y_i)` and
    the rewards ``[k, B]`` (BLEU, or ``reward_fn(tokens, target)``)."""
    tokens, log_prob = sample_by_hand(model, src, lengths, k)
    reward = (reward_fn or sentence_bleu)(tokens, target)
    others = (reward.sum(0, keepdim=True) - reward) / (k - 1)
    return (-(reward - others) * log_prob).mean(0).sum(), reward


def scst_by_hand(model, src, lengths, target, k: int = 3,
                 reward_fn: Reward = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """SCST's surrogate :math:`\\sum_b \\frac1k\\sum_i -(R_i - R_{\\text{greedy}})\\log p(y_i)`."""
    reward_fn = reward_fn or sentence_bleu
    greedy_reward = reward_fn(model.greedy(src, lengths), target)
    tokens, log_prob = sample_by_hand(model, src, lengths, k)
    reward = reward_fn(tokens, target)
    return (-(reward - greedy_reward) * log_prob).mean(0).sum(), reward


# ---- training and evaluation -------------------------------------------------------------
def corpus_bleu(model: Translator, data) -> float:
    """sacrebleu's corpus BLEU (0-100) of the greedy decodes of ``data``."""
    import sacrebleu

    src, lengths, target = data
    hypotheses = [sentence(row) for row in model.greedy(src, lengths).tolist()]
    references = [sentence(row) for row in target.tolist()]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def pretrain(model: Translator, task: Task, steps: int, batch_size: int, lr: float) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        model.nll(*task.batch(batch_size, generator)).backward()
        optimizer.step()


Method = Callable[[Translator, tuple], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def storch_method(estimator: estimators.Estimator, self_critical: bool = False) -> Method:
    """A step's surrogate by ``StorchELBO`` (SCG mode: no guide) and the rewards."""
    elbo = storch.StorchELBO(max_plate_nesting=1)

    def surrogate(model, batch):
        src, lengths, target = batch
        kwargs = {}
        if self_critical:
            kwargs["greedy_cost"] = -sentence_bleu(model.greedy(src, lengths), target)
        rewards: List[torch.Tensor] = []
        loss = elbo.differentiable_loss(translation, None, model, src, lengths, target,
                                        estimator, rewards=rewards, **kwargs)
        return loss, rewards[-1]

    return surrogate


def methods(handwritten: bool) -> Dict[str, Tuple[Method, int]]:
    """Name -> (surrogate function, sentences decoded per source and step). The reference
    row continues maximum-likelihood training instead (no decoding, no BLEU)."""
    table: Dict[str, Tuple[Method, int]] = {
        "RLOO(4)": (storch_method(estimators.ScoreFunction(
            n_samples=4, baseline=baselines.LeaveOneOut())), 4),
        "UnorderedSet(4)": (storch_method(estimators.UnorderedSet(n_samples=4)), 4),
        "SCST(3) + greedy": (storch_method(estimators.ScoreFunction(
            n_samples=3, baseline=SelfCritical()), self_critical=True), 4),
    }
    table["MLE continued (reference)"] = (lambda m, b: (m.nll(*b), None), 0)
    if handwritten:
        table["RLOO(4), by hand"] = (lambda m, b: rloo_by_hand(m, *b, k=4), 4)
        table["SCST(3) + greedy, by hand"] = (lambda m, b: scst_by_hand(m, *b, k=3), 4)
    return table


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=150)
    parser.add_argument("--steps", type=int, default=300, help="BLEU fine-tuning steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the fine-tuning (samples and batches; not pretraining)")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--handwritten", action="store_true",
                        help="also train with the hand-written RLOO and SCST surrogates")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    try:
        import sacrebleu  # noqa: F401
    except ImportError:
        sys.exit("examples/sequence_reward.py needs sacrebleu: pip install -e \".[examples]\"")
    if args.smoke:
        args.pretrain_steps, args.steps, args.batch_size, args.test_size = 5, 3, 8, 50
        args.handwritten = True
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    task = Task(seed=0)
    test = task.batch(args.test_size, torch.Generator().manual_seed(123))
    model = Translator()
    start = time.perf_counter()
    pretrain(model, task, args.pretrain_steps, 64, 3e-3)
    pretrain_seconds = time.perf_counter() - start
    pretrained = {name: value.clone() for name, value in model.state_dict().items()}
    before = corpus_bleu(model, test)

    every = max(1, args.steps // 15)
    curves: Dict[str, List[float]] = {}
    steps: Dict[str, List[int]] = {}
    results = {}
    for label, (surrogate, decodes) in methods(args.handwritten).items():
        model.load_state_dict(pretrained)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        pyro.clear_param_store()
        pyro.set_rng_seed(args.seed)
        # the same batches for every method
        generator = torch.Generator().manual_seed(2 + 1000 * args.seed)
        curves[label], steps[label] = [before], [0]
        rewards, seconds = [], 0.0
        for step in range(1, args.steps + 1):
            batch = task.batch(args.batch_size, generator)
            start = time.perf_counter()
            optimizer.zero_grad()
            loss, reward = surrogate(model, batch)
            loss.backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            if reward is not None:
                rewards.append(float(reward.mean()))
            if step % every == 0 or step == args.steps:
                curves[label].append(corpus_bleu(model, test))
                steps[label].append(step)
        tail = rewards[-max(1, len(rewards) // 5):]
        results[label] = (decodes, curves[label][-1],
                          f"{100 * sum(tail) / len(tail):.1f}" if tail else "-",
                          seconds / args.steps)

    print(f"toy translation (reverse + dictionary, {MIN_LEN}-{MAX_LEN} words, vocabulary "
          f"{WORDS}); MLE pretraining {args.pretrain_steps} steps ({pretrain_seconds:.0f} s), "
          f"then {args.steps} steps on sentence BLEU, batch {args.batch_size}, Adam lr "
          f"{args.lr}, seed {args.seed}; corpus BLEU of greedy decodes of {args.test_size} "
          f"held-out sentences\n")
    print("| method | decodes per source and step | test BLEU before | test BLEU after "
          "| BLEU of decoded samples (last 20% of steps) | s / step |")
    print("|:--|--:|--:|--:|--:|--:|")
    for label, (decodes, after, reward, per_step) in results.items():
        print(f"| {label} | {decodes} | {before:.1f} | {after:.1f} | {reward} "
              f"| {per_step:.3f} |")
    out = output_dir(args.out, "sequence_reward")
    save_curves(curves, out / "bleu.png", "toy translation: fine-tuning on sentence BLEU",
                "step", "test corpus BLEU (greedy)", x=steps)
    print(f"\nWrote {out / 'bleu.png'}")


if __name__ == "__main__":
    main()
