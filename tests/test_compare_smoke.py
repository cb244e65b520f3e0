"""The comparison harness runs end to end on the digits for a few steps (no timing checks)."""

import json
from pathlib import Path

import pytest

from benchmarks import compare, parallel, report, specs
from storch_pyro import baselines, estimators


def test_compare_harness_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    results = compare.main([
        "--steps", "4", "--seeds", "0", "--methods", "disarm", "torch:rloo", "--latents", "4",
        "--var-samples", "2", "--test-samples", "5", "--test-size", "20", "--bias-samples", "3",
        "--eval-every", "2", "--no-progress", "--out", str(tmp_path),
    ])
    for name in ("results.json", "results.md", "training_curves.png", "gradient_variance.png",
                 "time_per_step.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["methods"] == ["disarm", "torch:rloo"]
    for run in results["runs"]:
        assert "error" not in run, run["error"]
        assert [point["step"] for point in run["curve"]] == [2, 4]
        assert run["final"]["bias"]["n"] == 3
    table = (tmp_path / "results.md").read_text()
    assert "| disarm |" in table and "| torch:rloo |" in table and "nan" not in table
    # The labels say what the values are: one seed has no standard error, and '—' in the
    # twin column means no hand-written twin (disarm's, torch:disarm, was not run).
    assert "One seed: single values, no standard error" in table
    assert "| ms/step vs hand-written twin |" in table
    assert "'—': the method has no hand-written twin" in table


def test_compare_reports_unsupported_estimators(tmp_path):
    results = compare.main([
        "--model", "categorical", "--steps", "2", "--seeds", "0", "--methods", "unordered4",
        "--var-samples", "0", "--test-samples", "0", "--no-progress", "--no-plots",
        "--out", str(tmp_path),
    ])
    assert "UnsupportedDistributionError" in results["runs"][0]["error"]
    assert "unordered4: UnsupportedDistributionError" in (tmp_path / "results.md").read_text()


def test_parallel_parts_merge_into_one_table(tmp_path):
    """benchmarks.parallel: one process per method and seed, merged; the same numbers as
    one process would give (each part seeds itself from its seed alone). One method and two
    seeds (two processes); merging several methods is checked in process below."""
    common = ["--model", "categorical", "--latents", "2", "--steps", "2", "--eval-every", "2",
              "--var-samples", "0", "--test-samples", "3", "--test-size", "10", "--no-plots"]
    single = compare.main([*common, "--seeds", "0", "1", "--methods", "sf-ma",
                           "--no-progress", "--out", str(tmp_path / "single")])
    assert parallel.main(["--jobs", "2", "--", *common, "--seeds", "0", "1", "--methods",
                          "sf-ma", "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["methods"] == ["sf-ma"] and merged["config"]["seeds"] == [0, 1]

    def finals(results):
        return sorted((r["method"], r["seed"], r["final"]["train_elbo"], r["final"]["test_bound"])
                      for r in results["runs"])

    assert finals(merged) == finals(single)
    table = (tmp_path / "merged" / "results.md").read_text()
    assert "| sf-ma |" in table and "Mean ± s.e. over 2 seeds." in table


def test_merge_keeps_methods_and_seeds_in_first_seen_order():
    """report.merge of parts as benchmarks.parallel writes them (one method and seed each,
    seeds outer): methods and seeds in first-seen order, runs concatenated."""
    def part(method, seed):
        return {"config": {"model": "m", "dataset": "d", "steps": 2, "batch_size": 5,
                           "lr": 0.1, "seeds": [seed]},
                "methods": [method], "twins": {method: f"torch:{method}"},
                "runs": [{"method": method, "seed": seed}]}

    parts = [part(method, seed) for seed in (1, 0) for method in ("disarm", "sf-ma")]
    merged = report.merge(parts)
    assert merged["methods"] == ["disarm", "sf-ma"] and merged["config"]["seeds"] == [1, 0]
    assert merged["twins"] == {"disarm": "torch:disarm", "sf-ma": "torch:sf-ma"}
    assert merged["runs"] == [p["runs"][0] for p in parts]
    assert [p["config"]["seeds"] for p in parts] == [[1], [1], [0], [0]]  # not mutated


def test_parallel_replaces_only_the_per_part_arguments():
    argv = ["--steps", "5", "--methods", "a", "ScoreFunction(n_samples=2)", "--seeds", "0", "1",
            "--lr", "1e-3", "--out", "x"]
    part = parallel._part_argv(argv, "rloo", 1, Path("p"))
    assert part == ["--steps", "5", "--lr", "1e-3", "--methods", "rloo", "--seeds", "1",
                    "--out", "p", "--no-progress", "--no-plots"]


def test_merge_refuses_results_of_different_settings():
    base = {"config": {"model": "m", "dataset": "d", "steps": 2, "batch_size": 5, "lr": 0.1,
                       "seeds": [0]}, "methods": ["a"], "twins": {}, "runs": []}
    other = json.loads(json.dumps(base))
    other["config"]["steps"] = 3
    with pytest.raises(ValueError, match="steps"):
        report.merge([base, other])


def test_method_specs_are_parsed_without_eval():
    spec = specs.parse("ScoreFunction(n_samples=4, baseline=LeaveOneOut())")
    estimator = spec.make_estimator()
    assert isinstance(estimator, estimators.ScoreFunction) and estimator.n_samples == 4
    assert isinstance(estimator.baseline, baselines.LeaveOneOut)
    assert spec.make_estimator().baseline is not estimator.baseline  # fresh state per run
    assert specs.parse("disarm").make_estimator().__class__ is estimators.DisARM
    assert specs.parse("rloo").twin == "torch:rloo"
    assert specs.parse("pyro:TraceGraph_ELBO").family == "pyro"
    for bad in ("__import__('os')", "ScoreFunction(baseline=print())", "NoSuchEstimator",
                "torch:nope", "pyro:nope", "ARM(n_samples=0)", "ScoreFunction(4)"):
        with pytest.raises(ValueError):
            specs.parse(bad)


def test_compare_one_categorical_per_image_runs_the_unordered_set(tmp_path):
    results = compare.main([
        "--model", "categorical", "--latents", "1", "--steps", "2", "--seeds", "0",
        "--methods", "unordered4", "torch:rloo4", "--var-samples", "2", "--test-samples", "5",
        "--test-size", "20", "--bias-samples", "3", "--no-progress", "--no-plots",
        "--out", str(tmp_path),
    ])
    for run in results["runs"]:
        assert "error" not in run, run["error"]
        assert run["final"]["bias"]["n"] == 3
