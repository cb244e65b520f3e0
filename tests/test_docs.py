"""Documentation contract: every public class and function has a docstring with an example,
every estimator names its paper, and every Python block of the README runs as written. (The
Sphinx build itself runs in ``.ci/run``.)"""

import inspect
import re
from pathlib import Path

import pytest

import storch_pyro
from storch_pyro import baselines, diagnostics, estimators, handlers

#: Internal or self-describing names exempt from the example rule: the messenger the loss
#: installs, and exceptions (catalogued with examples in the docs' error pages).
EXEMPT = {"StorchMessenger", "StorchError"}
PUBLIC_MODULES = [storch_pyro, estimators, baselines, handlers, diagnostics]


def _public_objects():
    seen = {}
    for module in PUBLIC_MODULES:
        names = getattr(module, "__all__", None) or [
            n for n in vars(module) if not n.startswith("_")
        ]
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith(
                "storch_pyro"
            ):
                continue
            if inspect.isclass(obj) and issubclass(obj, Exception):
                continue
            if name not in EXEMPT and (inspect.isclass(obj) or inspect.isfunction(obj)):
                seen[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return sorted(seen.items())


PUBLIC_OBJECTS = _public_objects()


@pytest.mark.parametrize("name, obj", PUBLIC_OBJECTS, ids=[name for name, _ in PUBLIC_OBJECTS])
def test_public_object_has_docstring_with_example(name, obj):
    doc = inspect.getdoc(obj) or ""
    assert doc, f"{name} has no docstring"
    assert "Example" in doc, f"{name}'s docstring has no example"


LIBRARY_ESTIMATORS = [
    cls for cls in estimators.Estimator.registry if cls.__module__.startswith("storch_pyro.")
]


@pytest.mark.parametrize("cls", LIBRARY_ESTIMATORS, ids=lambda c: c.__name__)
def test_estimator_names_its_paper(cls):
    doc = inspect.getdoc(cls) or ""
    assert re.search(r"[A-Z][a-z]+.{0,60}\b(19|20)\d\d\b", doc), (
        f"{cls.__name__}'s docstring cites no paper (authors and year)"
    )


README = Path(__file__).resolve().parents[1] / "README.md"
#: A ```python block directly after this comment line is not run; the comment must name the
#: example that holds the full program, e.g. ``<!-- not run: examples/rl_cartpole.py -->``.
NOT_RUN = re.compile(r"<!-- not run: (examples/\w+\.py) -->\s*$")


def readme_python_blocks():
    """``(line, code)`` of every ```python block of README.md, in order, without those
    marked not run (whose named example must exist)."""
    lines = README.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = lines.index("```", start)
            marker = NOT_RUN.match(lines[i - 1]) if i > 0 else None
            if marker is None:
                blocks.append((start + 1, "\n".join(lines[start:end])))
            else:
                assert (README.parent / marker.group(1)).exists(), marker.group(0)
            i = end
        i += 1
    return blocks


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of README.md runs as written, in order, in one namespace (a
    block may use what an earlier one defined), with Pyro's validation on."""
    pytest.importorskip("gymnasium")  # the reinforcement-learning block
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        exec(compile(code, f"README.md, block at line {line}", "exec"), namespace)
