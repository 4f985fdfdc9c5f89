"""Covariance models: equinox modules mapping an unconstrained θ to a matrix, composable by ``+``.

Every module has ``num_free_params``, ``param_names``, ``build_params(theta)`` (natural-scale values),
``__call__(theta)`` (the dense matrix), ``default_theta(variance)`` and ``random_terms()`` (which Z, which G).
Variances are σ² = exp(θ); unstructured matrices use a log-Cholesky factor; correlations a bounded sigmoid.
"""

from ._covariance.base import AbstractCovariance as AbstractCovariance
from ._covariance.base import RandomTerm as RandomTerm
from ._covariance.basic import AR1Matrix as AR1Matrix
from ._covariance.basic import CompoundSymmetricMatrix as CompoundSymmetricMatrix
from ._covariance.basic import DiagonalMatrix as DiagonalMatrix
from ._covariance.basic import FixedMatrix as FixedMatrix
from ._covariance.basic import IdentityMatrix as IdentityMatrix
from ._covariance.basic import KnownDiagonalMatrix as KnownDiagonalMatrix
from ._covariance.basic import ScalarMatrix as ScalarMatrix
from ._covariance.basic import UnstructuredMatrix as UnstructuredMatrix
from ._covariance.compose import ConstantMatrix as ConstantMatrix
from ._covariance.compose import CovariancePropagation as CovariancePropagation
from ._covariance.compose import CustomMatrix as CustomMatrix
from ._covariance.compose import DummyMatrix as DummyMatrix
from ._covariance.compose import GroupedColumns as GroupedColumns
from ._covariance.compose import KroneckerProduct as KroneckerProduct
from ._covariance.compose import Sum as Sum
from ._covariance.kernels import KernelMatrix as KernelMatrix
from ._covariance.neural import FeatureMapKernel as FeatureMapKernel
from ._covariance.observed import ObservedRows as ObservedRows
from ._covariance.transforms import BoundedSigmoid as BoundedSigmoid
from ._covariance.transforms import Exp as Exp
from ._covariance.transforms import LogCholesky as LogCholesky
