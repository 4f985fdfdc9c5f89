r"""Response distributions and link functions of a generalized linear mixed model.

A family gives, for the conditional distribution of y_i given the linear predictor η_i = x_iᵀβ + z_iᵀb, the mean
μ_i = g⁻¹(η_i) (``Link.inverse``), dμ/dη (``Link.derivative``), the variance function V(μ), the unit deviance
d(y, μ) = 2·wt·[log p(y | y) − log p(y | μ)] and the log density log p(y | μ) itself, all elementwise on (n,)
arrays (McCullagh & Nelder 1989, *Generalized Linear Models*, 2nd ed., ch. 2; the same quantities as R's
``family`` objects, whose ``aic`` is −2 Σ log p(y | μ) for these families).

The responses are stored as R's ``glm`` stores them: for the binomial, y is the proportion of successes and the
prior weight wt the number of trials (a 0/1 response has wt = 1: ``bernoulli``); for the Poisson, y is the count and
wt = 1.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, ndtr


def _eps(x):
    return jnp.finfo(jnp.asarray(x).dtype).eps


class AbstractLink(eqx.Module):
    """g: μ ↦ η, with μ = ``inverse``(η) and dμ/dη = ``derivative``(η); ``canonical`` for the family's own link
    (then the Fisher and observed information of the PIRLS step agree)."""

    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def __call__(self, mu): ...

    @abc.abstractmethod
    def inverse(self, eta): ...

    @abc.abstractmethod
    def derivative(self, eta): ...


class LogitLink(AbstractLink):
    """η = log(μ / (1 − μ)); μ kept in [ε, 1 − ε] as R's ``binomial()$linkinv`` does."""

    name: ClassVar[str] = "logit"

    def __call__(self, mu):
        return jnp.log(mu) - jnp.log1p(-mu)

    def inverse(self, eta):
        e = _eps(eta)
        return jnp.clip(jax.nn.sigmoid(eta), e, 1.0 - e)

    def derivative(self, eta):
        p = jax.nn.sigmoid(eta)
        return jnp.maximum(p * (1.0 - p), _eps(eta))


class ProbitLink(AbstractLink):
    """η = Φ⁻¹(μ)."""

    name: ClassVar[str] = "probit"

    def __call__(self, mu):
        return jax.scipy.special.ndtri(mu)

    def inverse(self, eta):
        e = _eps(eta)
        return jnp.clip(ndtr(eta), e, 1.0 - e)

    def derivative(self, eta):
        return jnp.maximum(jnp.exp(-0.5 * eta**2) / jnp.sqrt(2.0 * jnp.pi), _eps(eta))


class CloglogLink(AbstractLink):
    """η = log(−log(1 − μ))."""

    name: ClassVar[str] = "cloglog"

    def __call__(self, mu):
        return jnp.log(-jnp.log1p(-mu))

    def inverse(self, eta):
        e = _eps(eta)
        return jnp.clip(-jnp.expm1(-jnp.exp(eta)), e, 1.0 - e)

    def derivative(self, eta):
        eta = jnp.minimum(eta, 700.0)
        return jnp.maximum(jnp.exp(eta - jnp.exp(eta)), _eps(eta))


class LogLink(AbstractLink):
    """η = log μ; μ at least ε (R's ``poisson()$linkinv``)."""

    name: ClassVar[str] = "log"

    def __call__(self, mu):
        return jnp.log(mu)

    def inverse(self, eta):
        return jnp.maximum(jnp.exp(eta), _eps(eta))

    def derivative(self, eta):
        return jnp.maximum(jnp.exp(eta), _eps(eta))


LINKS = {"logit": LogitLink, "probit": ProbitLink, "cloglog": CloglogLink, "log": LogLink}


class AbstractFamily(eqx.Module):
    """A response distribution with a link (see the module docstring)."""

    link: AbstractLink
    name: eqx.AbstractClassVar[str]

    @abc.abstractmethod
    def variance(self, mu): ...

    @abc.abstractmethod
    def unit_deviance(self, y, mu, wt):
        """d_i = 2·wt_i·[log p(y_i | μ = y_i) − log p(y_i | μ_i)] (R's ``dev.resids``)."""

    @abc.abstractmethod
    def log_density(self, y, mu, wt):
        """log p(y_i | μ_i), with its normalising constant (R's ``aic`` is −2 Σ of this)."""

    @abc.abstractmethod
    def mu_start(self, y, wt):
        """A starting μ inside the support (R's ``mustart``)."""

    @property
    def canonical(self) -> bool:
        return self.link.name == self.canonical_link

    canonical_link: eqx.AbstractClassVar[str]


def _xlogy(x, y):
    """x·log(y) with 0·log(0) = 0."""
    return jnp.where(x == 0, 0.0, x * jnp.log(jnp.where(x == 0, 1.0, y)))


class Binomial(AbstractFamily):
    """y = successes / trials with prior weight wt = trials: wt·y ~ Binomial(wt, μ); V(μ) = μ(1 − μ)."""

    name: ClassVar[str] = "binomial"
    canonical_link: ClassVar[str] = "logit"

    def variance(self, mu):
        return mu * (1.0 - mu)

    def unit_deviance(self, y, mu, wt):
        return 2.0 * wt * (_xlogy(y, y / mu) + _xlogy(1.0 - y, (1.0 - y) / (1.0 - mu)))

    def log_density(self, y, mu, wt):
        k = jnp.round(wt * y)
        m = jnp.round(wt)
        log_choose = gammaln(m + 1.0) - gammaln(k + 1.0) - gammaln(m - k + 1.0)
        return log_choose + _xlogy(k, mu) + _xlogy(m - k, 1.0 - mu)

    def mu_start(self, y, wt):
        return (wt * y + 0.5) / (wt + 1.0)


class Poisson(AbstractFamily):
    """y ~ Poisson(μ), V(μ) = μ."""

    name: ClassVar[str] = "poisson"
    canonical_link: ClassVar[str] = "log"

    def variance(self, mu):
        return mu

    def unit_deviance(self, y, mu, wt):
        return 2.0 * wt * (_xlogy(y, y / mu) - (y - mu))

    def log_density(self, y, mu, wt):
        return wt * (_xlogy(y, mu) - mu - gammaln(y + 1.0))

    def mu_start(self, y, wt):
        return y + 0.1


_FAMILIES = {"binomial": Binomial, "bernoulli": Binomial, "poisson": Poisson}


def as_family(family, link: str | None = None) -> AbstractFamily:
    """A ``Family`` from a name (``"binomial"``, ``"bernoulli"``, ``"poisson"``) and an optional link name."""
    if isinstance(family, AbstractFamily):
        if link is not None and link != family.link.name:
            raise ValueError(f"link={link!r} given with a family that has the link {family.link.name!r}")
        return family
    if not isinstance(family, str) or family.lower() not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {sorted(_FAMILIES)}")
    cls = _FAMILIES[family.lower()]
    link = cls.canonical_link if link is None else link
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; use one of {sorted(LINKS)}")
    if cls is Poisson and link != "log" or cls is Binomial and link == "log":
        raise ValueError(f"link {link!r} is not supported for the {cls.name} family")
    return cls(LINKS[link]())
