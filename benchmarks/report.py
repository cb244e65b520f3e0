"""The markdown table of a comparison run: one row per method, mean ± standard error over
seeds of the final measurements."""

import math
import statistics
from typing import Dict, List, Optional


def summarize(values: List[Optional[float]]) -> Optional[tuple]:
    """``(mean, standard error, n)`` of the finite values, or ``None``."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), error, len(values)


def _fmt(summary: Optional[tuple], digits: int = 2) -> str:
    if summary is None:
        return "n/a"
    mean, error, n = summary
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {error:.{digits}f}"


def _twin_note(twins: Dict[str, str], run: List[str]) -> str:
    """The footnote of the "ms/step vs hand-written twin" column (``run``: the methods with
    results)."""
    from benchmarks.specs import TWINS

    presets = ", ".join(name for name in TWINS if "(" not in name)
    pairs = ", ".join(f"{a} / {b}" for a, b in twins.items() if a in run and b in run)
    return ("ms/step vs hand-written twin: this method's median ms/step over that of the "
            "hand-written PyTorch estimator of the same estimate, in this run "
            f"({pairs or 'no such pair here'}). '—': the method has no hand-written twin "
            f"(only {presets} have one: torch:<name>), or its twin was not run.")


def _over_seeds(n_seeds: int) -> str:
    """How the table's values summarize the seeds."""
    if n_seeds == 1:
        return ("One seed: single values, no standard error (give several seeds, e.g. "
                "--seeds 0 1 2, for mean ± s.e.).")
    return f"Mean ± s.e. over {n_seeds} seeds."


def _log10(value: Optional[float]) -> Optional[float]:
    return math.log10(value) if value is not None and value > 0 else None


def method_summaries(results: dict) -> Dict[str, dict]:
    """Per method: the summaries of every final measurement, and the errors if any."""
    by_method: Dict[str, dict] = {}
    for label in results["methods"]:
        runs = [r for r in results["runs"] if r["method"] == label]
        finals = [r["final"] for r in runs if "final" in r]
        errors = sorted({r["error"] for r in runs if "error" in r})

        def column(key, transform=lambda v: v, finals=finals):
            return summarize([transform(f.get(key)) for f in finals])

        biases = [f["bias"] for f in finals if "bias" in f]
        by_method[label] = {
            "runs": len(finals),
            "errors": errors,
            "train_elbo": column("train_elbo"),
            "test_bound": column("test_bound"),
            "log10_variance_fixed_batch": column("variance_fixed_batch", _log10),
            "log10_variance_running": column("variance_running", _log10),
            "ms_per_step": column("ms_per_step"),
            "saved_tensor_mb": column("saved_tensor_mb"),
            "cuda_peak_mb": column("cuda_peak_mb"),
            "bias_mean_z2": summarize([b["mean_z2"] for b in biases]),
            "relative_bias": summarize([b["relative_bias"] for b in biases]),
        }
    return by_method


#: Orderings reported in the literature, (better, worse): DisARM paper (Dong et al. 2020) for
#: the first two, Kool et al. (2020) for the unordered-set estimator against RLOO.
DEFAULT_PAIRS = (("disarm", "arm"), ("rloo", "sf-ma"), ("unordered4", "rloo4"),
                 ("torch:disarm", "torch:arm"), ("torch:rloo", "torch:sf-ma"))
_PAIRED = (("train ELBO", "train_elbo", 1.0), ("test bound", "test_bound", 1.0),
           ("log10 var (fixed)", "variance_fixed_batch", -1.0),
           ("log10 var (running)", "variance_running", -1.0))


def paired_differences(results: dict, better: str, worse: str) -> Dict[str, Optional[tuple]]:
    """Per measurement, the mean ± s.e. over seeds of the seed-paired difference
    ``better - worse`` (variances as log10), with the sign flipped for variances so that a
    positive value always means ``better`` is better."""
    finals = {}
    for label in (better, worse):
        finals[label] = {r["seed"]: r["final"] for r in results["runs"]
                         if r["method"] == label and "final" in r}
    seeds = sorted(set(finals[better]) & set(finals[worse]))
    out = {}
    for title, key, sign in _PAIRED:
        values = []
        for seed in seeds:
            a, b = finals[better][seed].get(key), finals[worse][seed].get(key)
            if a is None or b is None:
                continue
            if key.startswith("variance"):
                a, b = _log10(a), _log10(b)
                if a is None or b is None:
                    continue
            values.append(sign * (a - b))
        out[title] = summarize(values)
    return out


def markdown(results: dict) -> str:
    """The table, preceded by the run's configuration."""
    config = results["config"]
    summaries = method_summaries(results)
    lines = [
        f"# {config['model']} VAE on {config['dataset']}",
        "",
        f"{config['date']}, {config['device']} ({config['threads']} thread(s)), torch "
        f"{config['torch']}, pyro {config['pyro']}; {config['steps']} steps, batch "
        f"{config['batch_size']}, Adam lr {config['lr']}, seeds {config['seeds']}; test bound "
        f"with {config['test_samples']} samples on {config['test_size']} test images; "
        f"variance of the encoder gradient: fixed batch = log10 trace of the covariance of "
        f"{config['var_samples']} estimates, running = log10 mean coordinate variance "
        f"(EMA {config['moment_decay']}). {_over_seeds(len(config['seeds']))}",
        "",
    ]
    has_bias = any(s["bias_mean_z2"] for s in summaries.values())
    has_cuda = any(s["cuda_peak_mb"] for s in summaries.values())
    header = ["method", "train ELBO", "test bound", "log10 var (fixed)", "log10 var (running)",
              "ms/step", "ms/step vs hand-written twin", "saved MB"]
    if has_cuda:
        header.append("CUDA peak MB")
    if has_bias:
        header += ["bias: mean z²", "relative bias"]
    rule = "|" + "|".join(["---"] + ["--:"] * (len(header) - 1)) + "|"
    lines += ["| " + " | ".join(header) + " |", rule]
    twins = results.get("twins", {})
    for label, summary in summaries.items():
        if not summary["runs"]:
            lines.append(f"| {label} | " + " | ".join(["—"] * (len(header) - 1)) + " |")
            continue
        ratio = "—"
        twin = summaries.get(twins.get(label, ""), {})
        if twin.get("ms_per_step") and summary["ms_per_step"]:
            ratio = f"{summary['ms_per_step'][0] / twin['ms_per_step'][0]:.2f}×"
        row = [label, _fmt(summary["train_elbo"]), _fmt(summary["test_bound"]),
               _fmt(summary["log10_variance_fixed_batch"]),
               _fmt(summary["log10_variance_running"]), _fmt(summary["ms_per_step"]), ratio,
               _fmt(summary["saved_tensor_mb"])]
        if has_cuda:
            row.append(_fmt(summary["cuda_peak_mb"], 1))
        if has_bias:
            row += [_fmt(summary["bias_mean_z2"]), _fmt(summary["relative_bias"], 3)]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", _twin_note(twins, [m for m, v in summaries.items() if v["runs"]])]
    pairs = [(a, b) for a, b in DEFAULT_PAIRS
             if summaries.get(a, {}).get("runs") and summaries.get(b, {}).get("runs")]
    if pairs:
        lines += ["", "Seed-paired differences (positive: the first is better; variances: "
                  "log10 of the second minus log10 of the first). "
                  f"{_over_seeds(len(results['config']['seeds']))}", "",
                  "| ordering | " + " | ".join(t for t, _, _ in _PAIRED) + " |",
                  "|---|" + "--:|" * len(_PAIRED)]
        for better, worse in pairs:
            differences = paired_differences(results, better, worse)
            lines.append(f"| {better} ≥ {worse} | "
                         + " | ".join(_fmt(differences[t]) for t, _, _ in _PAIRED) + " |")
    failures = [(label, s["errors"]) for label, s in summaries.items() if s["errors"]]
    if failures:
        lines += ["", "Failed or not applicable:", ""]
        lines += [f"- {label}: {'; '.join(errors)}" for label, errors in failures]
    return "\n".join(lines) + "\n"


def merge(parts: List[dict]) -> dict:
    """One results dict from several runs of the harness with the same settings (e.g. one
    process per method and seed, run in parallel): runs concatenated, methods and seeds in
    first-seen order, the first part's configuration otherwise."""
    if not parts:
        raise ValueError("merge: no results given")
    merged = {"config": dict(parts[0]["config"]), "methods": [], "twins": {}, "runs": []}
    seeds: List[int] = []
    for part in parts:
        mismatched = [key for key in ("model", "dataset", "steps", "batch_size", "lr")
                      if part["config"][key] != merged["config"][key]]
        if mismatched:
            raise ValueError(f"merge: the results differ in {mismatched}; merge only runs of "
                             "the same settings")
        merged["methods"] += [m for m in part["methods"] if m not in merged["methods"]]
        merged["twins"].update(part["twins"])
        merged["runs"] += part["runs"]
        seeds += [s for s in part["config"]["seeds"] if s not in seeds]
    merged["config"]["seeds"] = seeds
    return merged


def main(argv=None) -> None:
    """``python -m benchmarks.report OUT/results.json ...``: rewrites each ``results.md``
    (and the plots, with ``--plots``); with ``--merge DEST``, merges the given results into
    ``DEST/results.json`` and writes its ``results.md``."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("--plots", action="store_true")
    parser.add_argument("--merge", type=Path, default=None, metavar="DEST",
                        help="merge the results into DEST/results.json")
    args = parser.parse_args(argv)
    loaded = [(path, json.loads(path.read_text())) for path in args.results]
    if args.merge is not None:
        args.merge.mkdir(parents=True, exist_ok=True)
        results = merge([results for _, results in loaded])
        (args.merge / "results.json").write_text(json.dumps(results, indent=1))
        loaded = [(args.merge / "results.json", results)]
    for path, results in loaded:
        table = markdown(results)
        (path.parent / "results.md").write_text(table)
        if args.plots:
            from benchmarks import plots

            plots.write_all(results, path.parent)
        print(table)


if __name__ == "__main__":
    main()
