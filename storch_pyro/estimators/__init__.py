"""Gradient estimators: one module per family, all subclasses of :class:`Estimator`, and the
records of its interface (:class:`Site`, :class:`Draw`, :class:`Downstream`, :class:`Terms`,
:class:`VarianceTerm`), and the record of a sample frame (:class:`Frame`)."""

from storch_pyro.estimators.antithetic import ARM, DisARM
from storch_pyro.estimators.base import (
    Downstream,
    Draw,
    Estimator,
    Site,
    Terms,
    VarianceTerm,
    working_estimators,
)
from storch_pyro.estimators.control_variates import LAX, REBAR, RELAX
from storch_pyro.estimators.enumeration import Enumerate, SumAndSample
from storch_pyro.estimators.gumbel_rao import GumbelRao
from storch_pyro.estimators.importance_set import ImportanceWeightedSet
from storch_pyro.estimators.measure_valued import MeasureValued
from storch_pyro.estimators.pathwise import Pathwise
from storch_pyro.estimators.relaxation import GumbelSoftmax, StraightThrough
from storch_pyro.estimators.score_function import ScoreFunction
from storch_pyro.estimators.unordered_set import UnorderedSet
from storch_pyro.handlers.records import Frame

__all__ = [
    "ARM",
    "DisARM",
    "Downstream",
    "Draw",
    "Enumerate",
    "Estimator",
    "Frame",
    "GumbelRao",
    "GumbelSoftmax",
    "ImportanceWeightedSet",
    "LAX",
    "MeasureValued",
    "Pathwise",
    "REBAR",
    "RELAX",
    "ScoreFunction",
    "Site",
    "StraightThrough",
    "SumAndSample",
    "Terms",
    "UnorderedSet",
    "VarianceTerm",
    "working_estimators",
]
