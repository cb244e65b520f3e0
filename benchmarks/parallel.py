"""Runs one comparison (:mod:`benchmarks.compare`) as one process per method and seed, up to
``--jobs`` at a time, and merges the parts into one table, JSON file and set of plots. The
runs are the same as in one process (each part seeds itself from its seed alone); only the
wall-clock time changes, and the ms/step column then reflects processes sharing the machine.

    python -m benchmarks.parallel --jobs 12 -- --dataset mnist --steps 5000 --seeds 0 1 2 \\
        --methods sf-ma rloo arm disarm --device cuda --out benchmarks/out/mnist-5000

Arguments after ``--`` are :mod:`benchmarks.compare`'s (``--out`` is the merged folder;
parts go to ``OUT/parts``). A part that fails or exceeds ``--timeout`` is reported and left
out of the merge.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, List, Tuple

from benchmarks import compare, report


def _folder(label: str, seed: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label).strip('_')}-{seed}"


def _part_argv(argv: List[str], method: str, seed: int, out: Path) -> List[str]:
    """``argv`` with ``--methods``, ``--seeds`` and ``--out`` replaced by one part's."""
    kept, skipping = [], False
    for token in argv:
        if token in ("--methods", "--seeds", "--out"):
            skipping = True
            continue
        if skipping and not token.startswith("--"):
            continue
        skipping = False
        kept.append(token)
    return kept + ["--methods", method, "--seeds", str(seed), "--out", str(out),
                   "--no-progress", "--no-plots"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, rest = argv[:split], argv[split + 1:]
    else:
        own, rest = [], argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parts run at a time")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per part")
    args = parser.parse_args(own)
    settings = compare.parse_args(rest)
    kind = "categorical" if settings.model == "categorical" else "binary"
    methods = settings.methods or compare.DEFAULT_METHODS[kind]
    parts: List[Tuple[str, int, Path]] = [
        (method, seed, settings.out / "parts" / _folder(method, seed))
        for seed in settings.seeds for method in methods
    ]
    pending = list(parts)
    running: List[Tuple[subprocess.Popen, str, float, Path, IO]] = []
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            method, seed, out = pending.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out / "log.txt", "w")
            command = [sys.executable, "-m", "benchmarks.compare",
                       *_part_argv(rest, method, seed, out)]
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            running.append((process, f"{method} seed {seed}", time.monotonic(), out, log))
        time.sleep(0.2)
        for entry in list(running):
            process, name, started, out, log = entry
            overdue = args.timeout is not None and time.monotonic() - started > args.timeout
            if overdue:
                process.kill()
            if process.poll() is None:
                continue
            running.remove(entry)
            log.close()
            if process.returncode != 0 or overdue:
                why = "timed out" if overdue else f"exit {process.returncode}"
                failed.append(f"{name}: {why} (log: {out / 'log.txt'})")
    results = [out / "results.json" for _, _, out in parts if (out / "results.json").exists()]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    if not results:
        return 1
    extra = [] if settings.no_plots else ["--plots"]
    report.main([*map(str, results), "--merge", str(settings.out), *extra])
    print(f"written to {settings.out}/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
