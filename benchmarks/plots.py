"""Matplotlib figures of a comparison run (needs matplotlib; the Agg backend, no display):

- ``training_curves.png``: train ELBO and test bound against steps, mean over seeds with a
  min–max band;
- ``gradient_variance.png``: the two variance measurements (log scale) against steps;
- ``time_per_step.png``: median milliseconds per step, mean over seeds with the seeds' range.
"""

from pathlib import Path
from typing import Dict, List

import numpy as np


def _curves(results: dict, key: str) -> Dict[str, tuple]:
    """Per method: steps and a ``(seeds, points)`` array of ``key`` (runs that finished)."""
    out = {}
    for label in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == label and "final" in r]
        if not runs:
            continue
        steps = [point["step"] for point in runs[0]["curve"]]
        values = np.array(
            [[np.nan if p.get(key) is None else p[key] for p in r["curve"]] for r in runs],
            dtype=float,
        )
        if np.isfinite(values).any():
            out[label] = (np.array(steps), values)
    return out


def _band(axis, results: dict, key: str, title: str, log: bool = False) -> None:
    for label, (steps, values) in _curves(results, key).items():
        if log:
            values = np.where(values > 0, values, np.nan)
        mean = np.nanmean(values, 0)
        line, = axis.plot(steps, mean, label=label, linestyle=_style(label))
        if len(values) > 1:
            axis.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0),
                              color=line.get_color(), alpha=0.2, linewidth=0)
    if log:
        axis.set_yscale("log")
    axis.set_title(title)
    axis.set_xlabel("step")


def _style(label: str) -> str:
    """Solid for storch_pyro, dashed for hand-written, dotted for Pyro's losses (twins that
    coincide stay visible)."""
    return {"torch": "--", "pyro": ":"}.get(label.split(":")[0], "-")


def write_all(results: dict, folder: Path) -> List[Path]:
    """Writes the three figures into ``folder``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    name = f"{config['model']} VAE, {config['dataset']}"
    paths = []

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _band(axes[0], results, "train_elbo", f"train ELBO ({name})")
    _band(axes[1], results, "test_bound", f"{config['test_samples']}-sample test bound")
    axes[1].legend(fontsize=7)
    paths.append(_save(figure, folder / "training_curves.png"))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _band(axes[0], results, "variance_fixed_batch",
          f"encoder gradient variance: trace, {config['var_samples']} estimates, fixed batch",
          log=True)
    _band(axes[1], results, "variance_running",
          f"mean coordinate variance, running moments (EMA {config['moment_decay']})", log=True)
    axes[1].legend(fontsize=7)
    paths.append(_save(figure, folder / "gradient_variance.png"))

    labels, means, lows, highs = [], [], [], []
    for label in results["methods"]:
        times = [r["final"]["ms_per_step"] for r in results["runs"]
                 if r["method"] == label and "final" in r]
        if times:
            labels.append(label)
            means.append(np.mean(times))
            lows.append(np.mean(times) - min(times))
            highs.append(max(times) - np.mean(times))
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(labels)), 4.5))
    axis.bar(range(len(labels)), means, yerr=[lows, highs], capsize=3)
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel("ms per step (median)")
    axis.set_title(f"time per step ({name}, batch {config['batch_size']}, {config['device']})")
    paths.append(_save(figure, folder / "time_per_step.png"))
    return paths


def _save(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
