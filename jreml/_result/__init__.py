"""Results: one immutable ``FitResult`` pytree for every path (``fit.py``), formula metadata and prediction on new
data, random effects, and the text of a fit apart."""

from .fit import Estimate, FitResult, register_refitting
from .formula_info import FormulaInfo, RandomTermInfo
from .random_effects import simulate

__all__ = ["Estimate", "FitResult", "FormulaInfo", "RandomTermInfo", "register_refitting", "simulate"]
