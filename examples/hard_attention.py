"""Hard attention trained on a non-differentiable reward: "find the digit".

Each input is a row of ``N`` handwritten 8x8 digits and a query class ``c`` (one of the
digits in the row has class ``c``). The network scores every position against the query
and attends to *one* of them, drawn from a Categorical (hard attention, as in Mnih et al.
2014 and Xu et al. 2015); the reward is 1 if the attended digit has class ``c``, else 0.
The reward is a lookup, with no gradient, so the attention needs a gradient estimator:

    with pyro.plate("rows", B):
        where ~ Categorical(softmax(score(images, c)))     # storch.sample("where", ...)
        add_cost("miss", -1[label[where] == c])

The story is written once; the estimator of ``where`` is swapped from outside with
``storch_pyro.handlers.estimator`` by name, each with ``k`` evaluations per row:

- ``ScoreFunction(k) + LeaveOneOut`` (RLOO; Kool et al. 2019): ``k`` samples with
  replacement;
- ``SumAndSample(k)`` (Liu et al. 2019): the ``k-1`` most probable positions summed, one
  sampled;
- ``UnorderedSet(k)`` (Kool, van Hoof & Welling 2020): ``k`` *distinct* positions, with its
  built-in baseline (used when ``storch_pyro.estimators`` provides it);
- ``Enumerate``: all ``N`` positions, the exact gradient (the reference).

For each, the script measures at the initial network the variance of the gradient (trace of
the covariance of one estimate) and its agreement with the exact gradient (the largest
|mean - exact| in standard errors: below ~4 when unbiased), then trains with SVI (Adam) and
reports the expected test accuracy of the attention (exact: sum over positions). Output: a
table and ``accuracy.png`` (``--out``).

    python examples/hard_attention.py            # about a minute
    python examples/hard_attention.py --estimators ScoreFunction UnorderedSet --k 3
    python examples/hard_attention.py --smoke
"""

import argparse
import sys
from typing import Dict, List, Tuple

import pyro
import pyro.distributions as dist
import torch
from _common import make_estimator, output_dir, registered_estimators, save_curves
from torch import nn
from tqdm import tqdm

import storch_pyro as storch
from storch_pyro import baselines, estimators, handlers
from storch_pyro.diagnostics import gradient_stats


class Rows:
    """Rows of ``n`` digits with a query class present in each row."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> None:
        self.images, self.labels, self.n = images, labels, n

    def batch(self, size: int, generator: torch.Generator):
        index = torch.randint(len(self.images), (size, self.n), generator=generator)
        labels = self.labels[index]
        target = torch.randint(self.n, (size,), generator=generator)
        query = labels.gather(1, target[:, None]).squeeze(1)
        return self.images[index], labels, query


def load_rows(n: int) -> Tuple[Rows, Rows]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    return Rows(images[:1400], labels[:1400], n), Rows(images[1400:], labels[1400:], n)


class Attention(nn.Module):
    """Scores each position: ``<glimpse(image_i), embed(query)>``."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.glimpse = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.embed = nn.Embedding(10, hidden)

    def forward(self, images: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        return (self.glimpse(images) * self.embed(query)[:, None, :]).sum(-1)


def find_the_digit(net: Attention, images, labels, query) -> None:
    """The story: attend to one position per row; cost = minus the (0/1) reward."""
    pyro.module("attention", net)
    n = images.shape[1]
    match = (labels == query[:, None]).to(images.dtype)  # (rows, n)
    with pyro.plate("rows", images.shape[0]):
        where = storch.sample("where", dist.Categorical(logits=net(images, query)))
        # Integer positions, or one-hot values from relaxed estimators (GumbelSoftmax, ...).
        attended = where if where.dtype.is_floating_point else nn.functional.one_hot(where, n)
        reward = (attended.to(match.dtype) * match).sum(-1)
        storch.add_cost("miss", -reward)


def expected_accuracy(net: Attention, rows: Rows, size: int = 1000) -> float:
    """:math:`\\mathbb{E}[\\text{reward}] = \\sum_i \\pi_i 1[\\text{label}_i = c]`, exactly."""
    images, labels, query = rows.batch(size, torch.Generator().manual_seed(123))
    with torch.no_grad():
        probs = torch.softmax(net(images, query), -1)
        return float((probs * (labels == query[:, None])).sum(-1).mean())


def estimator_for(name: str, k: int) -> estimators.Estimator:
    if name == "ScoreFunction":
        return estimators.ScoreFunction(n_samples=k, baseline=baselines.LeaveOneOut())
    return make_estimator(name, k)


def label_of(name: str, k: int) -> str:
    if name == "ScoreFunction":
        return f"ScoreFunction({k}) + LeaveOneOut"
    return "Enumerate (exact)" if name == "Enumerate" else f"{name}({k})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    available = registered_estimators()
    default = [name for name in ("ScoreFunction", "SumAndSample", "UnorderedSet", "Enumerate")
               if name in available]
    parser.add_argument("--estimators", nargs="+", default=default, choices=sorted(available))
    parser.add_argument("--k", type=int, default=3, help="evaluations per row")
    parser.add_argument("--positions", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--draws", type=int, default=400, help="gradient draws for variance")
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.draws = 5, 5
    torch.set_num_threads(1)
    train_rows, test_rows = load_rows(args.positions)
    elbo = storch.StorchELBO(max_plate_nesting=1)

    # Gradient variance at the initial network, on one fixed batch, against the exact one.
    torch.manual_seed(0)
    net = Attention()
    batch = train_rows.batch(args.batch_size, torch.Generator().manual_seed(1))
    params = list(net.parameters())

    def gradient(name: str, draws: int, exact=None):
        pyro.clear_param_store()
        with handlers.estimator(config={"where": estimator_for(name, args.k)}):
            return gradient_stats(
                lambda: elbo.differentiable_loss(find_the_digit, None, net, *batch),
                params, draws, exact,
            )

    pyro.set_rng_seed(0)
    exact = gradient("Enumerate", 2).mean  # zero variance: two draws give it
    variance: Dict[str, Tuple[float, float]] = {}
    for name in args.estimators:
        stats = gradient(name, 2 if name == "Enumerate" else args.draws, exact)
        # Coordinates whose gradient is zero up to float round-off (e.g. embeddings of
        # classes not queried) have no meaningful z-score: keep the others.
        informative = stats.std_error > 1e-5 * stats.std_error.max()
        z_scores = stats.z_scores[informative] if bool(informative.any()) else torch.zeros(1)
        variance[name] = (stats.total_variance, float(z_scores.abs().max()))

    curves: Dict[str, List[float]] = {}
    steps: Dict[str, List[int]] = {}
    for name in args.estimators:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        torch.manual_seed(0)
        net = Attention()
        label = label_of(name, args.k)
        svi = pyro.infer.SVI(find_the_digit, None, pyro.optim.Adam({"lr": args.lr}), loss=elbo)
        generator = torch.Generator().manual_seed(2)
        curves[label], steps[label] = [expected_accuracy(net, test_rows)], [0]
        with handlers.estimator(config={"where": estimator_for(name, args.k)}):
            for step in tqdm(range(1, args.steps + 1), desc=label, file=sys.stdout,
                             disable=args.smoke, leave=False, mininterval=1.0):
                svi.step(net, *train_rows.batch(args.batch_size, generator))
                if step % max(1, args.steps // 20) == 0:
                    curves[label].append(expected_accuracy(net, test_rows))
                    steps[label].append(step)

    print(f"find the digit: {args.positions} positions per row, k = {args.k} evaluations per "
          f"row ({args.positions} for Enumerate), batch {args.batch_size}; gradient at the "
          f"initial network over {args.draws} draws; {args.steps} SVI steps, Adam lr "
          f"{args.lr}\n")
    # The accuracy a quarter of the way (the first evaluation at or after steps / 4; never
    # the last one, which has its own column), and at the end.
    recorded = next(iter(steps.values()))
    quarter = next(i for i, step in enumerate(recorded) if step >= args.steps // 4)
    quarter = max(0, min(quarter, len(recorded) - 2))
    print(f"| estimator | grad. variance | max abs(mean - exact)/s.e. | test accuracy after "
          f"{recorded[quarter]} steps | after {recorded[-1]} |")
    print("|:--|--:|--:|--:|--:|")
    for name in args.estimators:
        label = label_of(name, args.k)
        total, z = variance[name]
        z_text = "-" if name == "Enumerate" or args.draws < 30 else f"{z:.2f}"
        print(f"| {label} | {total:.4g} | {z_text} | {curves[label][quarter]:.3f} "
              f"| {curves[label][-1]:.3f} |")
    out = output_dir(args.out, "hard_attention")
    save_curves(curves, out / "accuracy.png", "find the digit: hard attention",
                "SVI step", "expected test accuracy", x=steps)
    print(f"\nchance: {1 / args.positions:.2f} (or more with repeated classes). "
          f"Wrote {out / 'accuracy.png'}")


if __name__ == "__main__":
    main()
