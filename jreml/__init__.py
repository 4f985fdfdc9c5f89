"""jreml: REML and ML fitting of linear mixed models in JAX."""

from ._config import _apply_default_precision

_apply_default_precision()

from . import covariance as covariance  # noqa: E402
from ._config import float_dtype as float_dtype  # noqa: E402

__version__ = "0.1.0"
from ._estimate import estimate as estimate  # noqa: E402
from ._likelihood import average_information as average_information  # noqa: E402
from ._likelihood import fisher_information as fisher_information  # noqa: E402
from ._likelihood import ml_loglik as ml_loglik  # noqa: E402
from ._likelihood import observed_information as observed_information  # noqa: E402
from ._likelihood import reml_loglik as reml_loglik  # noqa: E402
from ._likelihood import score as score  # noqa: E402
from ._result import FitResult as FitResult  # noqa: E402
from . import datasets as datasets  # noqa: E402
from ._examples import Example as Example  # noqa: E402
from ._examples import example as example  # noqa: E402
