"""The text of a fit: lme4's ``summary(fit)`` layout (and lmerTest's with ``ddf``), column formatting."""

from __future__ import annotations

import math
import re

import numpy as np

from .._inference import check_ddf


def abbreviate(name: str, minlength: int = 6) -> str:
    """R's ``abbreviate``, simplified: drop lower-case vowels, then lower-case letters, from the right.

    formulaic's treatment columns are first written as lme4 does (``Machine[T.B]`` → ``MachineB`` → ``MachnB``).
    """
    match = re.match(r"^(.+)\[T\.(.+)\]$", name)
    chars = list(match.group(1) + match.group(2) if match else name)
    for pattern in ("aeiou", "abcdefghijklmnopqrstuvwxyz"):
        i = len(chars) - 1
        while len(chars) > minlength and i > 0:
            if chars[i] in pattern and chars[i - 1] not in " ":
                del chars[i]
            i -= 1
    return "".join(chars[:minlength]) if len(chars) > minlength else "".join(chars)


def text_column(values, digits: int = 4) -> list[str]:
    """Format a column as R does: one number of decimals for all, enough for ``digits`` significant digits."""
    finite = [abs(v) for v in values if np.isfinite(v) and v != 0]
    if not finite:
        return [f"{v:.{digits}g}" for v in values]
    magnitude = math.floor(math.log10(min(max(finite), 1e300)))
    smallest = math.floor(math.log10(min(finite)))
    decimals = max(0, digits - 1 - min(magnitude, max(smallest, magnitude - digits)))
    decimals = min(decimals, 8)
    return [f"{v:.{decimals}f}" if np.isfinite(v) else str(v) for v in values]


def text_table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A text table: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append(" ".join(cells).rstrip())
    return out


def json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def summary(fit, beta_names=None, ddf=None) -> str:
    """A plain-text summary: lme4's ``summary(fit)`` layout for :func:`jreml.fit` results, else a short one."""
    if np.ndim(fit.loglik) != 0:
        return f"FitResult batched over {np.shape(fit.loglik)} fits ({fit.method.upper()}, {fit.algorithm})"
    if ddf is not None:
        ddf = check_ddf(ddf, allow_none=False)
    if fit.formula_info is not None and beta_names is None:
        return lme4_summary(fit, ddf)
    lines = [f"Formula: {fit.formula}"] if fit.formula else []
    lines += [
        f"Linear mixed model fit by {fit.method.upper()} ({fit.algorithm}), "
        f"n = {fit.nobs}, {fit.message} after {int(fit.n_iter)} iterations"
        + (f" ({fit.n_dropped} rows with missing values dropped)" if fit.n_dropped else ""),
        f"  logLik {float(fit.loglik):.4f}   AIC {float(fit.aic):.4f}   BIC {float(fit.bic):.4f}"
        + ("   (singular: a variance is at its boundary)" if bool(fit.singular) else ""),
        "Covariance parameters:",
    ]
    width = max([len(n) for n in fit.param_names] + [10])
    se = np.sqrt(np.maximum(np.diagonal(np.asarray(fit.vcov_theta)), 0.0))
    for name, theta_se in zip(fit.param_names, se, strict=True):
        lines.append(f"  {name:<{width}} {float(fit.params[name]):14.6g}   (SE of theta {theta_se:.3g})")
    lines.append("Fixed effects:")
    names = beta_names or fit.beta_names or [f"beta[{i}]" for i in range(fit.beta.shape[0])]
    width = max([len(n) for n in names] + [10])
    lines.append(f"  {'':<{width}} {'Estimate':>14} {'Std. Error':>12} {'t value':>9}")
    for name, b, s in zip(names, np.asarray(fit.beta), np.asarray(fit.se_beta), strict=True):
        lines.append(f"  {name:<{width}} {b:14.6g} {s:12.6g} {b / s:9.3f}")
    return "\n".join(lines)


def lme4_summary(fit, ddf=None) -> str:
    reml = fit.method == "reml"
    loglik = float(fit.loglik)
    lines = [
        "Linear mixed model fit by " + ("REML" if reml else "maximum likelihood") + " ['lmerMod']",
        f"Formula: {fit.formula}",
    ]
    if fit.n_dropped:
        lines.append(f"  ({fit.n_dropped} rows with missing values dropped)")
    lines.append("")
    if reml:
        lines.append(f"REML criterion at convergence: {-2.0 * loglik:.4f}")
    else:
        values = [float(fit.aic), float(fit.bic), loglik, -2.0 * loglik]
        cells = [f"{v:.4f}" for v in values] + [str(fit.nobs - fit.num_params)]
        lines += text_table(["AIC", "BIC", "logLik", "deviance", "df.resid"], [cells], left=0)
    if not bool(fit.converged):
        lines.append(f"Warning: not converged ({fit.message} after {int(fit.n_iter)} iterations)")
    if bool(fit.singular):
        lines.append("boundary (singular) fit: a variance is at its lower bound")
    lines += ["", "Scaled residuals:"]
    scaled = np.asarray(fit.residuals()) / math.sqrt(fit.sigma2)
    quantiles = np.quantile(scaled, [0.0, 0.25, 0.5, 0.75, 1.0])
    lines += text_table(["Min", "1Q", "Median", "3Q", "Max"], [[f"{q:.4f}" for q in quantiles]], left=0)
    lines += ["", "Random effects:"]
    lines += random_effects_table(fit)
    groups = "; ".join(f"{g}, {n}" for g, n in fit.ngroups.items())
    lines.append(f"Number of obs: {fit.nobs}, groups:  {groups}")
    lines += ["", "Fixed effects:"] if ddf is None else ["", f"Fixed effects ({ddf} df):"]
    if ddf is not None:
        lines += ddf_fixed_block(fit, ddf)
    beta, se = np.asarray(fit.beta, dtype=float), np.asarray(fit.se_beta, dtype=float)
    names = list(fit.beta_names)
    columns = [text_column(beta.tolist()), text_column(se.tolist()), [f"{t:.3f}" for t in (beta / se).tolist()]]
    rows = [[name, *(c[i] for c in columns)] for i, name in enumerate(names)]
    if ddf is None:
        lines += text_table(["", "Estimate", "Std. Error", "t value"], rows)
    if len(names) > 1:
        vcov = np.asarray(fit.vcov_beta, dtype=float)
        d = np.sqrt(np.diagonal(vcov))
        corr = vcov / np.outer(d, d)
        short = [abbreviate(n) for n in names]
        rows = [
            [names[i]] + [f"{corr[i, j]:.3f}" if j < i else "" for j in range(len(names) - 1)]
            for i in range(1, len(names))
        ]
        lines += ["", "Correlation of Fixed Effects:"]
        lines += text_table(["", *short[:-1]], rows)
    return "\n".join(lines)


def ddf_fixed_block(fit, ddf: str) -> list[str]:
    """lmerTest's fixed-effects block: Estimate, Std. Error, df, t value, Pr(>|t|)."""
    table = fit.coef_table(ddf)
    columns = [
        text_column(table["estimate"].tolist()),
        text_column(table["se"].tolist()),
        [f"{d:.3f}" for d in table["df"]],
        [f"{t:.3f}" for t in table["t"]],
        [f"{p:.3g}" for p in table["p"]],
    ]
    rows = [[name, *(c[i] for c in columns)] for i, name in enumerate(table.index)]
    return text_table(["", "Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"], rows)


def random_effects_table(fit) -> list[str]:
    blocks = fit._ordered_terms()
    any_corr = any(len(info.labels) > 1 for info, _ in blocks)
    rows = []
    for info, block in blocks:
        sd = np.sqrt(np.maximum(np.diagonal(block), 0.0))
        for i, label in enumerate(info.labels):
            row = [info.name if i == 0 else "", label, float(block[i, i]), float(sd[i])]
            corr = []
            for j in range(i):
                denom = sd[i] * sd[j]
                corr.append(f"{block[i, j] / denom:.2f}" if denom > 0 else "NaN")
            rows.append((row, corr))
    s2 = fit.sigma2
    rows.append((["Residual", "", s2, math.sqrt(max(s2, 0.0))], []))
    variances = text_column([r[2] for r, _ in rows])
    sds = text_column([r[3] for r, _ in rows])
    width = max([len(c) for _, c in rows] + [0])
    header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] + [""] * (width - 1) if any_corr else [])
    table = []
    for (row, corr), v, s in zip(rows, variances, sds, strict=True):
        cells = [row[0], row[1], v, s]
        if any_corr:
            cells += corr + [""] * (max(width, 1) - len(corr))
        table.append(cells)
    return [" " + line for line in text_table(header, table, left=2)]
