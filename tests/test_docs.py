"""Documentation contract: every public class and function has a docstring with an example,
and every estimator names its paper. (The Sphinx build itself runs in ``.ci/run``.)"""

import inspect
import re

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
