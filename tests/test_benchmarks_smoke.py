"""The overhead benchmark and the generative-story example run end to end (``--smoke``)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", *args, "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stderr}"
    return result.stdout


def _table_rows(output: str, header: str) -> list:
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(header)]
    assert starts, f"no table with header {header!r} in:\n{output}"
    rows = []
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_overhead_benchmark_smoke():
    rows = _table_rows(_run("-m", "benchmarks.overhead"), "| batch | implementation |")
    names = " ".join(rows)
    for name in ("StorchELBO", "hand-written", "TraceGraph_ELBO", "Trace_ELBO"):
        assert name in names
    assert all("nan" not in row for row in rows)


def test_generative_story_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    output = _run("examples/generative_story.py", "--out", str(tmp_path))
    rows = _table_rows(output, "| estimator |")
    assert len(rows) == 5  # exact + four estimators
    assert all("nan" not in row for row in rows)
    assert (tmp_path / "gradients.png").stat().st_size > 1000


def test_chain_benchmarks_smoke():
    output = _run("-m", "benchmarks.overhead", "--chain", "5", "--enum-chain", "4")
    rows = _table_rows(output, "| chain T |") + _table_rows(output, "| enum-chain T |")
    names = " ".join(rows)
    for name in ("StorchELBO", "hand-written", "Pyro-only", "forward algorithm", "TraceEnum"):
        assert name in names
    assert all("nan" not in row for row in rows)
