"""``fit``: an lme4-style formula interface over :func:`jreml.estimate`."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ._covariance.compose import DummyMatrix
from ._design.build import Design, _column_name, _unique_names, build_design
from ._entry import estimate
from ._result import FitResult, FormulaInfo, RandomTermInfo


def fit(
    formula: str,
    data: pd.DataFrame,
    *,
    method: str = "reml",
    algorithm="ai",
    relmat: dict | None = None,
    family: str | None = None,
    **options,
) -> FitResult:
    """Fit an lme4-style linear mixed model, e.g. ``fit("Reaction ~ Days + (Days | Subject)", df)``.

    Random terms: ``(1 | g)``, ``(x | g)`` (correlated intercept and slope), ``(0 + x | g)``, ``(x || g)``
    (uncorrelated: one term per column), ``(1 | a/b)`` = ``(1 | a) + (1 | a:b)``, ``(1 | a:b)``, crossed and
    repeated factors. The fixed part is expanded by formulaic (treatment contrasts, sorted levels); aliased
    columns are dropped with a warning. Rows with a missing value in any used column are dropped
    (``result.n_dropped``). ``relmat={"g": K}`` gives the term ``(1 | g)`` the covariance σ²·K, with K a
    DataFrame indexed by level names or an array in sorted-level order. Other keyword ``options`` go to
    :func:`jreml.estimate`.

    ``family="binomial" | "bernoulli" | "poisson"`` fits a generalized linear mixed model by the Laplace
    approximation, as lme4's ``glmer(nAGQ=1)`` (``jreml._glmm``; options ``link=``, ``weights=``, ``nAGQ=0 | 1``)
    and returns a ``GLMMResult``; the response may be ``cbind(successes, failures)``.

    The result knows its names: ``fixef``, ``se``, ``varcorr`` (lme4's VarCorr layout), ``ranef`` (conditional
    modes and SDs by group), ``sigma2``, ``ngroups``, ``predict(newdata, re_form)``, ``to_dict()`` and an
    lme4-style ``print(fit)``.
    """
    if family is not None and not (isinstance(family, str) and family.lower() == "gaussian"):
        return _fit_glmm(formula, data, family, relmat, options)
    method = method.lower() if isinstance(method, str) else method  # lme4 users write REML / ML
    design = build_design(formula, data, relmat)
    if design.unidentifiable:
        raise ValueError(design.unidentifiable[0])
    result = estimate(design.model, design.y, design.X, method=method, algorithm=algorithm, **options)
    return dataclasses.replace(
        result,
        beta_names=design.beta_names,
        formula=design.formula.text,
        n_dropped=design.n_dropped,
        formula_info=formula_info(design),
    )


def _fit_glmm(formula: str, data: pd.DataFrame, family, relmat, options):
    from ._glmm.fit import fit_glmm, glmm_design

    if relmat:
        raise NotImplementedError("relmat is not supported for GLMMs yet")
    unknown = set(options) - {"link", "weights", "nAGQ"}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)} for a GLMM fit (use link=, weights=, nAGQ=)")
    gd = glmm_design(formula, data, family, options.get("link"), options.get("weights"))
    return fit_glmm(gd, formula_info(gd.design), nAGQ=options.get("nAGQ", 1))


def _spec(text: str, data: pd.DataFrame):
    from formulaic import model_matrix  # imported on first use: it costs ~0.45 s at `import jreml`

    mm = model_matrix(text, data, na_action="raise", ensure_full_rank=True)
    return mm.model_spec, tuple(_column_name(str(c)) for c in mm.columns)


def formula_info(design: Design) -> FormulaInfo:
    """The model specs and random-term metadata a result needs for names, ``ranef`` and ``predict(newdata)``.

    Mirrors the term expansion of ``build_design`` (``(x || g)`` → one term per column, lme4 names) and checks
    that the names agree with the terms of the built model.
    """
    data = design.data
    # build_design already materialised these specs; rebuild only for a Design made without them.
    if design.fixed_spec is not None:
        fixed_spec, names = design.fixed_spec, design.fixed_names
    else:
        fixed_spec, names = _spec(design.formula.fixed, data)
    kept = tuple(names.index(n) for n in design.beta_names)
    expanded = []
    for i, spec in enumerate(design.formula.random):
        expr_spec, labels = design.random_specs[i] if design.random_specs else _spec(spec.expr, data)
        if spec.correlated:
            expanded.append((spec, expr_spec, labels, None))
        else:
            expanded.extend((spec, expr_spec, (label,), (k,)) for k, label in enumerate(labels))
    term_names = _unique_names([spec for spec, *_ in expanded])
    # build_design records each term's name and levels (recoding the factor columns here would cost as much
    # again); a Design made without them is checked against the model's terms.
    model_names = list(design.random_levels) or [t.name for t in design.model.random_terms()]
    if term_names != model_names:  # pragma: no cover - a mismatch with build_design is a bug
        raise RuntimeError(f"formula terms {term_names} do not match the model's terms {model_names}")
    terms = []
    for (spec, expr_spec, labels, columns), name in zip(expanded, term_names, strict=True):
        levels = design.random_levels.get(name) or DummyMatrix(*(data[f] for f in spec.factors)).levels
        intercept_only = labels == ("(Intercept)",)
        terms.append(RandomTermInfo(name, spec.factors, labels, levels, None if intercept_only else expr_spec, columns))
    return FormulaInfo(design.formula.text, fixed_spec, kept, tuple(terms))
