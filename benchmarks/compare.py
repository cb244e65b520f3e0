"""Estimator comparison harness: trains a discrete VAE with several gradient estimators side
by side (storch_pyro's, Pyro's own losses, hand-written PyTorch) on the same data and seeds,
and writes a markdown table, the raw results as JSON and plots to an output folder.

    python -m benchmarks.compare                                   # binary linear VAE, digits
    python -m benchmarks.compare --model categorical --methods sf-ma rloo gumbel torch:rloo
    python -m benchmarks.compare --dataset mnist --steps 2000 --seeds 0 1 2 --device cuda
    python -m benchmarks.compare --methods "ScoreFunction(n_samples=4, baseline=LeaveOneOut())"
    python -m benchmarks.compare --latents 8 --bias-samples 400      # bias vs exact gradients

Methods: any registered estimator by name with keyword arguments, a preset (``sf-ma``,
``rloo``, ``arm``, ``disarm``, ``gumbel``, ...), ``pyro:Trace_ELBO``,
``pyro:TraceGraph_ELBO``, or a hand-written ``torch:sf-ma|rloo|rloo4|arm|disarm`` (see
:mod:`benchmarks.specs`). Defaults follow the DisARM protocol (Dong et al. 2020): Adam with
learning rate 1e-4, batch 50, dynamic binarization, 100-sample test bound.
"""

import argparse
import datetime
import json
import platform
import traceback
from pathlib import Path
from typing import List

import pyro
import torch

from benchmarks import data as datasets
from benchmarks import metrics
from benchmarks.methods import make_method
from benchmarks.models import MODELS, make_model
from benchmarks.specs import PRESETS, parse

DEFAULT_METHODS = {
    "binary": [
        "sf-ma", "rloo", "arm", "disarm", "torch:sf-ma", "torch:rloo", "torch:disarm",
        "pyro:Trace_ELBO", "pyro:TraceGraph_ELBO",
    ],
    "categorical": [
        "sf-ma", "rloo", "gumbel", "st", "torch:sf-ma", "torch:rloo", "pyro:Trace_ELBO",
        "pyro:TraceGraph_ELBO",
    ],
}
#: The fixed batch for variance and bias measurements is drawn with this seed.
MEASUREMENT_SEED = 12345


def run_one(spec, seed: int, dataset: datasets.Dataset, args, progress) -> dict:
    """Trains one method from one seed; returns its curve and final measurements (or the
    error, if the method cannot handle the model or crashes)."""
    record = {"method": spec.label, "family": spec.family, "seed": seed, "curve": []}
    pyro.clear_param_store()
    torch.manual_seed(seed)
    vae = make_model(args.model, dataset.n_pixel, dataset.train_mean(), args.latents)
    vae = vae.to(args.device)
    try:
        method = make_method(vae, spec)
    except Exception as error:  # an estimator that cannot handle this model
        record["error"] = f"{type(error).__name__}: {error}"
        progress.update(args.steps)
        return record
    pyro.set_rng_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=args.lr)
    batches = datasets.train_batches(
        dataset.train, args.batch_size, torch.Generator().manual_seed(seed)
    )
    fixed = next(datasets.train_batches(
        dataset.train, args.batch_size, torch.Generator().manual_seed(MEASUREMENT_SEED)
    ))
    encoder = list(vae.encoder.parameters())
    moments = metrics.RunningMoments(args.moment_decay)
    timer = metrics.StepTimer(args.device)
    recent: List[torch.Tensor] = []
    done = 0
    try:
        for step in range(1, args.steps + 1):
            x = next(batches)
            timer.start()
            optimizer.zero_grad()
            loss, cost = method.surrogate(x)
            loss.backward()
            optimizer.step()
            timer.stop()
            moments.update(metrics.current_gradient(encoder))
            recent.append(cost)
            progress.update(1)
            done = step
            if step % args.eval_every == 0 or step == args.steps:
                record["curve"].append(evaluate(step, vae, method, fixed, dataset, args,
                                                encoder, moments, recent, timer))
                recent = []
        final = dict(record["curve"][-1])
        final["ms_per_step"] = timer.median_ms()
        final["saved_tensor_mb"] = metrics.saved_tensor_megabytes(method, fixed)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            loss, _ = method.surrogate(fixed)
            loss.backward()
            vae.zero_grad()
            final["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        if args.bias_samples and vae.latent_support() is not None:
            final["bias"] = metrics.bias_against_exact(
                method, vae, fixed, encoder, args.bias_samples
            )
        record["final"] = final
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=-3)
        progress.update(args.steps - done)
    return record


def evaluate(step, vae, method, fixed, dataset, args, encoder, moments, recent, timer) -> dict:
    """One point of the training curve."""
    train_elbo = -float(torch.stack(recent).mean())
    test_bound = vae.test_bound(dataset.test, args.test_samples) if args.test_samples else None
    variance = None
    if args.var_samples >= 2:
        variance = metrics.fixed_batch_variance(method, fixed, encoder, args.var_samples)
    return {
        "step": step,
        "train_elbo": train_elbo,
        "test_bound": test_bound,
        "variance_fixed_batch": variance,
        "variance_running": moments.variance(),
        "seconds": sum(timer.times),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
        epilog="presets: " + ", ".join(f"{k} = {v}" for k, v in PRESETS.items()),
    )
    parser.add_argument("--model", choices=MODELS, default="binary-linear")
    parser.add_argument("--dataset", choices=datasets.DATASETS, default="digits")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="estimators/comparators (default: a set per model)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--latents", type=int, default=0,
                        help="number of latent variables (default 200 binary / 20 categorical)")
    parser.add_argument("--eval-every", type=int, default=0, help="default: steps / 10")
    parser.add_argument("--test-samples", type=int, default=100, help="K of the test bound")
    parser.add_argument("--test-size", type=int, default=0, help="test images used (0: all)")
    parser.add_argument("--var-samples", type=int, default=16,
                        help="repeated estimates per fixed-batch variance (0: skip)")
    parser.add_argument("--moment-decay", type=float, default=0.999)
    parser.add_argument("--bias-samples", type=int, default=0,
                        help="estimates for the bias check (needs a small latent space)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--no-validation", action="store_true",
                        help="pyro.enable_validation(False)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/out/<model>-<dataset>-<time>)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.eval_every <= 0:
        args.eval_every = max(1, args.steps // 10)
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = Path("benchmarks/out") / f"{args.model}-{args.dataset}-{stamp}"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm

    from benchmarks import report

    torch.set_num_threads(args.threads)
    pyro.enable_validation(not args.no_validation)
    kind = "categorical" if args.model == "categorical" else "binary"
    specs = [parse(text) for text in (args.methods or DEFAULT_METHODS[kind])]
    dataset = datasets.load(args.dataset, args.test_size).to(args.device)
    total = len(specs) * len(args.seeds) * args.steps
    runs = []
    with tqdm(total=total, disable=args.no_progress, unit="step") as progress:
        for seed in args.seeds:
            for spec in specs:
                progress.set_description(f"{spec.label} seed {seed}")
                runs.append(run_one(spec, seed, dataset, args, progress))
    results = {"config": config(args, dataset), "methods": [s.label for s in specs],
               "twins": {s.label: s.twin for s in specs if s.twin}, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = report.markdown(results)
    (args.out / "results.md").write_text(table)
    if not args.no_plots:
        from benchmarks import plots

        plots.write_all(results, args.out)
    print(table)
    print(f"written to {args.out}/")
    return results


def config(args, dataset) -> dict:
    device = args.device
    if device.startswith("cuda"):
        device = f"{device} ({torch.cuda.get_device_name()})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "device": device,
        "threads": args.threads,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "model": args.model,
        "dataset": args.dataset,
        "train_size": len(dataset.train),
        "test_size": len(dataset.test),
        "steps": args.steps,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "latents": args.latents,
        "test_samples": args.test_samples,
        "var_samples": args.var_samples,
        "moment_decay": args.moment_decay,
        "bias_samples": args.bias_samples,
        "validation": not args.no_validation,
    }


if __name__ == "__main__":
    main()
