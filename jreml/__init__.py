"""jreml: REML and ML fitting of linear mixed models in JAX.

Importing jreml turns on JAX's float64 mode unless ``JAX_ENABLE_X64`` is set in the environment, and sets XLA's
CPU fusion emitter flag unless ``XLA_FLAGS`` sets it (see ``jreml._config`` and README "Precision"), and points JAX's
persistent compilation cache at the user cache directory unless one is configured (``jreml._cache``,
``JREML_CACHE_DIR=off`` turns it off; README "Compilation").
"""

from ._cache import enable_default_cache as _enable_default_cache
from ._config import _apply_default_precision, _apply_default_xla_flags
from ._lapack_guard import install as _install_lapack_guard

_apply_default_precision()
_apply_default_xla_flags()
_enable_default_cache()
_install_lapack_guard()

# ruff: noqa: E402, I001
from . import covariance as covariance
from . import datasets as datasets
from ._config import float_dtype as float_dtype
from ._entry import estimate as estimate
from ._backends.select import BackendChoice as BackendChoice
from ._backends.select import select_backend as select_backend
from ._solvers.results import RESULTS as RESULTS
from ._examples import Example as Example
from ._examples import example as example
from ._facade import REML as REML
from ._fit import fit as fit
from ._genetics.grm import grm as grm
from ._genetics.gwas import gwas as gwas
from ._genetics.pedigree import Pedigree as Pedigree
from ._genetics.pedigree import pedigree_matrix as pedigree_matrix
from ._hybrid import HybridInfo as HybridInfo
from ._hybrid import hybrid_estimate as hybrid_estimate
from ._optax_fit import fit_optax as fit_optax
from ._profiled import ProfiledObjective as ProfiledObjective
from ._profiled import profiled_ml as profiled_ml
from ._profiled import profiled_reml as profiled_reml
from ._likelihood import average_information as average_information
from ._likelihood import fisher_information as fisher_information
from ._likelihood import ml_loglik as ml_loglik
from ._likelihood import observed_information as observed_information
from ._likelihood import reml_loglik as reml_loglik
from ._likelihood import score as score
from ._result import FitResult as FitResult
from ._glmm.result import GLMMResult as GLMMResult
from ._glmm.batch import fit_glmm_batch as fit_glmm_batch
from ._inference.lrt import anova as anova
from ._batch import BatchFit as BatchFit
from ._batch import fit_batch as fit_batch
from ._bootstrap import BootstrapResult as BootstrapResult
from ._bootstrap import bootstrap as bootstrap
from ._entry import fit_spectral as fit_spectral
from ._timing import Timing as Timing
from ._timing import last_timing as last_timing

__version__ = "0.1.0"
