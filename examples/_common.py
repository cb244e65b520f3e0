"""Helpers shared by the examples: estimators chosen by name, output folders, plots.

Not part of the library: each example imports it as a sibling module (``python
examples/NAME.py`` puts ``examples/`` on ``sys.path``).
"""

import argparse
import copy
import inspect
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Type

import pyro
import pyro.distributions as dist
import torch

from storch_pyro import baselines, estimators
from storch_pyro.errors import UnsupportedDistributionError
from storch_pyro.estimators import Site

EXAMPLES_DIR = Path(__file__).resolve().parent
BASELINES = {
    "none": lambda: None,
    "moving-average": lambda: baselines.MovingAverage(0.9),
    "leave-one-out": lambda: baselines.LeaveOneOut(),
}


def registered_estimators() -> Dict[str, Type[estimators.Estimator]]:
    """Every public estimator class, by name (``Estimator.registry``)."""
    return {cls.__name__: cls for cls in estimators.Estimator.registry}


def make_estimator(name: str, n_samples: int = 1) -> estimators.Estimator:
    """An instance of the registered estimator ``name``, given ``n_samples`` (or ``k``) if
    its constructor takes it; the other arguments keep their defaults."""
    classes = registered_estimators()
    if name not in classes:
        raise SystemExit(f"unknown estimator {name!r}; registered: {', '.join(sorted(classes))}")
    cls = classes[name]
    parameters = inspect.signature(cls).parameters
    for keyword in ("n_samples", "k"):
        if keyword in parameters:
            return cls(**{keyword: n_samples})
    return cls()


def estimator_arguments(parser: argparse.ArgumentParser, default: str, n_samples: int) -> None:
    """Adds ``--estimator``, ``--n-samples`` and ``--baseline`` to ``parser``."""
    parser.add_argument(
        "--estimator", default=default, choices=sorted(registered_estimators()),
        help=f"gradient estimator of the discrete sites (default {default})",
    )
    parser.add_argument(
        "--n-samples", type=int, default=n_samples,
        help="samples (k) per site, for estimators that take n_samples or k",
    )
    parser.add_argument(
        "--baseline", default="leave-one-out", choices=sorted(BASELINES),
        help="baseline of score-function estimators (leave-one-out needs --n-samples >= 2)",
    )


def _probes(estimator: estimators.Estimator):
    """Distributions to probe ``estimator`` on (:func:`takes_baseline`), in this order."""
    yield dist.Bernoulli(logits=torch.zeros(2))
    yield dist.Categorical(logits=torch.zeros(2, estimator.n_samples + 2))
    yield dist.Normal(torch.zeros(2), 1.0)


def _accepts(estimator: estimators.Estimator, fn: torch.distributions.Distribution) -> bool:
    try:
        estimator.check("baseline_probe", fn)
    except UnsupportedDistributionError:
        return False
    return True


def takes_baseline(estimator: estimators.Estimator,
                   fn: Optional[torch.distributions.Distribution] = None) -> bool:
    """Whether a baseline from :mod:`storch_pyro.baselines` applies to ``estimator``: as the
    loss decides it, whether the estimator's :class:`~storch_pyro.estimators.Draw` has a
    ``score`` and no ``builtin_baseline``. Found by one draw at a probe site of distribution
    ``fn`` (default: the first of a Bernoulli, a Categorical, a Normal that the estimator
    accepts; ``False`` if it accepts none, as a sequence estimator), on a deep copy of the
    estimator, without autograd (not a training step), with Pyro's RNGs and param store
    left as they were. So a new estimator needs no entry here."""
    estimator = copy.deepcopy(estimator)  # check() and for_site() may name it after the site
    if fn is None:
        fn = next((f for f in _probes(estimator) if _accepts(estimator, f)), None)
        if fn is None:
            return False
    rng = pyro.util.get_rng_state()
    try:
        with pyro.get_param_store().scope(), torch.no_grad():
            site = Site("baseline_probe", fn, sample_dim=-1 - len(fn.batch_shape),
                        plate_nesting=0)
            draw = estimator.for_site(site.name).draw(site)
    finally:
        pyro.util.set_rng_state(rng)
    return draw.score is not None and not draw.builtin_baseline


def make_baseline(name: str, estimator: estimators.Estimator) -> Optional[baselines.Baseline]:
    """The baseline ``name`` if ``estimator`` has a score term that takes one (not e.g.
    ``UnorderedSet``, which has its own), else ``None``."""
    if not takes_baseline(estimator):
        return None
    if name == "leave-one-out" and estimator.n_samples < 2:
        return None
    return BASELINES[name]()


def method_label(estimator: estimators.Estimator,
                 baseline: Optional[baselines.Baseline]) -> str:
    """How the tables name an estimator and the baseline installed next to it, e.g.
    ``ScoreFunction(n_samples=4) + LeaveOneOut()`` or ``ScoreFunction(n_samples=1), no
    baseline`` (the estimator's own repr shows ``baseline=None`` when the baseline comes
    from a handler)."""
    text = repr(estimator).replace(", baseline=None", "")
    if baseline is not None:
        return f"{text} + {baseline!r}"
    if takes_baseline(estimator):
        return f"{text}, no baseline"
    return text


def output_dir(path: Optional[str], example: str) -> Path:
    """``path``, or ``examples/out/<example>``, created."""
    folder = Path(path) if path else EXAMPLES_DIR / "out" / example
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_image_grid(images: torch.Tensor, path: Path, title: str, rows: int) -> None:
    """Saves ``images`` (``(n, h, w)``, values in [0, 1]) as a grid of ``rows`` rows."""
    plt = pyplot()
    n = images.shape[0]
    cols = (n + rows - 1) // rows
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8 + 0.4))
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image.detach().cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def save_curves(
    curves: Dict[str, Sequence[float]], path: Path, title: str, xlabel: str, ylabel: str,
    x: Optional[Dict[str, Sequence[float]]] = None, log_y: bool = False,
    groups: Optional[Dict[str, str]] = None,
) -> None:
    """Saves one line per entry of ``curves`` (optionally against ``x[name]``); curves with
    the same ``groups[name]`` share a colour and one legend entry."""
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    colours: Dict[str, str] = {}
    for name, values in curves.items():
        xs = x[name] if x is not None else range(len(values))
        group = groups[name] if groups is not None else name
        first = group not in colours
        if first:
            colours[group] = f"C{len(colours) % 10}"
        ax.plot(list(xs), list(values), color=colours[group], label=group if first else None,
                linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
