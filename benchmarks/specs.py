"""Method specifications for the command line, parsed without ``eval``.

A method is one of

- a registered storch_pyro estimator, by class name with keyword arguments, e.g.
  ``DisARM``, ``ScoreFunction(n_samples=4, baseline=LeaveOneOut())``,
  ``GumbelSoftmax(temperature=0.5, hard=True)``: any class in
  :attr:`storch_pyro.estimators.Estimator.registry` (estimators added later are picked up by
  name). Arguments are Python literals, or a baseline from :mod:`storch_pyro.baselines`
  called with literals (``MovingAverage(0.9)``, ``LeaveOneOut()``);
- a preset name from :data:`PRESETS` (``sf-ma``, ``rloo``, ``arm``, ``disarm``, ...);
- a comparator: ``pyro:Trace_ELBO``, ``pyro:TraceGraph_ELBO`` (with its decaying-average
  baseline), or a hand-written PyTorch estimator ``torch:<name>`` (see
  :mod:`benchmarks.handwritten`).
"""

import ast
from dataclasses import dataclass, field
from typing import Any, Dict

from storch_pyro import baselines
from storch_pyro.estimators import Estimator

#: Short names for common estimator configurations (the DisARM paper's comparison set and a
#: few more). Each expands to a storch_pyro spec.
PRESETS: Dict[str, str] = {
    "sf": "ScoreFunction()",
    "sf-ma": "ScoreFunction(baseline=MovingAverage(0.9))",
    "rloo": "ScoreFunction(n_samples=2, baseline=LeaveOneOut())",
    "rloo4": "ScoreFunction(n_samples=4, baseline=LeaveOneOut())",
    "arm": "ARM()",
    "disarm": "DisARM()",
    "gumbel": "GumbelSoftmax(temperature=1.0)",
    "gumbel-hard": "GumbelSoftmax(temperature=1.0, hard=True)",
    "st": "StraightThrough()",
    "unordered4": "UnorderedSet(n_samples=4)",
}

#: The hand-written twin of a storch_pyro method (by preset name or expanded spec): the
#: reference for its time-per-step ratio.
TWINS: Dict[str, str] = {
    "sf-ma": "torch:sf-ma",
    "rloo": "torch:rloo",
    "rloo4": "torch:rloo4",
    "arm": "torch:arm",
    "disarm": "torch:disarm",
}
TWINS.update({PRESETS[name]: twin for name, twin in list(TWINS.items())})

PYRO_LOSSES = ("Trace_ELBO", "TraceGraph_ELBO")
_BASELINES = {"MovingAverage": baselines.MovingAverage, "LeaveOneOut": baselines.LeaveOneOut}


@dataclass
class MethodSpec:
    """A parsed method: ``family`` is ``storch``, ``pyro`` or ``torch``; ``name`` the
    estimator class, Pyro loss or hand-written estimator; ``kwargs`` its arguments (storch
    only); ``label`` the text given on the command line (a preset name stays as given)."""

    family: str
    name: str
    label: str
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def twin(self):
        """Label of the hand-written twin (``torch:...``), if there is one."""
        return TWINS.get(self.label)

    def make_estimator(self) -> Estimator:
        """A fresh estimator instance (stateful baselines must not be shared between runs)."""
        cls = _registered()[self.name]
        kwargs = {
            key: value.make() if isinstance(value, _BaselineCall) else value
            for key, value in self.kwargs.items()
        }
        return cls(**kwargs)


@dataclass
class _BaselineCall:
    name: str
    args: tuple
    kwargs: dict

    def make(self):
        return _BASELINES[self.name](*self.args, **self.kwargs)


def parse(text: str) -> MethodSpec:
    """Parses one method (see the module docstring); raises ``ValueError`` with the choices."""
    text = text.strip()
    if text.startswith("pyro:"):
        name = text[len("pyro:"):]
        if name not in PYRO_LOSSES:
            raise ValueError(f"unknown Pyro loss {name!r}; choose one of {PYRO_LOSSES}")
        return MethodSpec("pyro", name, text)
    if text.startswith("torch:"):
        from benchmarks.handwritten import HAND_WRITTEN

        name = text[len("torch:"):]
        if name not in HAND_WRITTEN:
            raise ValueError(
                f"unknown hand-written estimator {name!r}; choose one of {sorted(HAND_WRITTEN)}"
            )
        return MethodSpec("torch", name, text)
    expanded = PRESETS.get(text, text)
    try:
        node = ast.parse(expanded, mode="eval").body
    except SyntaxError as error:
        raise ValueError(f"cannot parse method {text!r}: {error.msg}") from None
    name, args, kwargs = _call(node, text)
    registry = _registered()
    if name not in registry:
        raise ValueError(
            f"unknown estimator {name!r} in {text!r}; registered: {sorted(registry)}; "
            f"presets: {sorted(PRESETS)}; comparators: pyro:<{'|'.join(PYRO_LOSSES)}>, "
            f"torch:<name>"
        )
    if args:
        raise ValueError(f"{text!r}: pass estimator arguments by keyword, e.g. n_samples=4")
    spec = MethodSpec("storch", name, text, kwargs)
    spec.make_estimator()  # fail early on bad arguments
    return spec


def _registered() -> Dict[str, type]:
    return {cls.__name__: cls for cls in Estimator.registry}


def _call(node: ast.AST, text: str):
    """``(name, args, kwargs)`` of ``Name`` or ``Name(literal, key=literal|baseline(...))``."""
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"{text!r}: expected Name or Name(key=value, ...)")
    args = tuple(_value(arg, text) for arg in node.args)
    kwargs = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise ValueError(f"{text!r}: ** arguments are not supported")
        kwargs[keyword.arg] = _value(keyword.value, text)
    return node.func.id, args, kwargs


def _value(node: ast.AST, text: str):
    if isinstance(node, (ast.Call, ast.Name)) and _name_of(node) in _BASELINES:
        name, args, kwargs = _call(node, text)
        _BASELINES[name](*args, **kwargs)  # validate now
        return _BaselineCall(name, args, kwargs)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"{text!r}: arguments must be literals or one of the baselines "
            f"{sorted(_BASELINES)}, got {ast.unparse(node)!r}"
        ) from None


def _name_of(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    return node.func.id if isinstance(node.func, ast.Name) else ""
