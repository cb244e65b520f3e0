"""Sphinx configuration: API reference from the docstrings (reST fields, napoleon for any
Google/NumPy-style ones), maths rendered by MathJax in the browser. Builds offline:
``python -m sphinx -W --keep-going -b html docs docs/_build/html``."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import storch_pyro  # noqa: E402

project = "storch_pyro"
author = "storch_pyro developers"
copyright = "2026, storch_pyro developers"
release = storch_pyro.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autoclass_content = "both"
napoleon_use_rtype = False
mathjax3_config = {"tex": {"macros": {"boxdot": "\\mathop{\\square}"}}}
nitpicky = False
exclude_patterns = ["_build"]
templates_path = []
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Gradient estimators for stochastic computation graphs, "
                                     "in Pyro"}
