"""Gradient estimators: one module per family, all subclasses of :class:`Estimator`."""

from storch_pyro.estimators.antithetic import ARM, DisARM
from storch_pyro.estimators.base import Estimator, working_estimators
from storch_pyro.estimators.control_variates import LAX, REBAR, RELAX
from storch_pyro.estimators.enumeration import Enumerate, SumAndSample
from storch_pyro.estimators.gumbel_rao import GumbelRao
from storch_pyro.estimators.importance_set import ImportanceWeightedSet
from storch_pyro.estimators.measure_valued import MeasureValued
from storch_pyro.estimators.pathwise import Pathwise
from storch_pyro.estimators.relaxation import GumbelSoftmax, StraightThrough
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.estimators.unordered_set import UnorderedSet

__all__ = [
    "ARM",
    "DisARM",
    "Enumerate",
    "Estimator",
    "GumbelRao",
    "GumbelSoftmax",
    "ImportanceWeightedSet",
    "LAX",
    "MeasureValued",
    "Pathwise",
    "REBAR",
    "RELAX",
    "ScoreFunction",
    "StraightThrough",
    "SumAndSample",
    "UnorderedSet",
    "working_estimators",
]
