"""Denominator degrees of freedom for tests of fixed effects: Satterthwaite and Kenward–Roger.

Notation (one fit, REML): y (n,), X (n, p), θ (k,) the covariance parameters, V(θ) (n, n) the marginal covariance,
Φ(θ) = (Xᵀ V⁻¹ X)⁻¹ (p, p) the covariance of β̂, L (q, p) a contrast matrix.

Satterthwaite (Satterthwaite 1946; lmerTest, Kuznetsova, Brockhoff & Christensen 2017), for one contrast c (p,):
    ν = 2 (cᵀ Φ c)² / (gᵀ A g),   gᵢ = ∂(cᵀ Φ(θ) c)/∂θᵢ = −cᵀ Φ Pᵢ Φ c (k,), Pᵢ below (Vᵢ by forward mode),
    A = (−∂²ℓ_REML/∂θ∂θᵀ)⁻¹ (k, k), the inverse observed information of the same θ (closed form, see
    ``_observed_information``).
At the REML optimum ν does not depend on the parametrisation (g and A transform as a covector and a tensor).
For q > 1 (lmerTest's ``contestMD``): LΦLᵀ = U D Uᵀ, νᵢ from the rows of UᵀL, E = Σ νᵢ/(νᵢ − 2),
ν = 2E/(E − q) (ν = 2 when some νᵢ ≤ 2); F = (Lβ̂)ᵀ(LΦLᵀ)⁻¹(Lβ̂)/q.

Kenward–Roger (Kenward & Roger 1997; pbkrtest, Halekoh & Højsgaard 2014, ``vcovAdj`` and ``.KR_adjust``):
    Vᵢ = ∂V/∂θᵢ (k, n, n) by forward mode (``jax.jvp``), Pᵢ = −Xᵀ V⁻¹ Vᵢ V⁻¹ X, Qᵢⱼ = Xᵀ V⁻¹ Vᵢ V⁻¹ Vⱼ V⁻¹ X (p, p),
    W = I_E⁻¹ with I_E,ᵢⱼ = ½ tr(M Vᵢ M Vⱼ), M = V⁻¹ − V⁻¹X Φ XᵀV⁻¹ (expected REML information),
    Φ_A = Φ + 2 Φ {Σᵢⱼ Wᵢⱼ (Qᵢⱼ − Pᵢ Φ Pⱼ)} Φ.
KR's term −¼ Rᵢⱼ (second derivatives of V) is left out, as pbkrtest does: pbkrtest parametrises V linearly
(V = Σ ψᵢ Gᵢ, ψ the entries of each term's covariance and σ²), where R = 0, and every other term above is bilinear
in first derivatives and W, hence the same in jreml's θ. For L (q, p), Θ = Lᵀ(LΦLᵀ)⁻¹L,
    A₁ = Σᵢⱼ Wᵢⱼ tr(ΘΦPᵢΦ) tr(ΘΦPⱼΦ),  A₂ = Σᵢⱼ Wᵢⱼ tr(ΘΦPᵢΦΘΦPⱼΦ),  B = (A₁ + 6A₂)/(2q),
    g = ((q+1)A₁ − (q+4)A₂)/((q+2)A₂),  c₁ = g/(3q+2(1−g)),  c₂ = (q−g)/(3q+2(1−g)),  c₃ = (q+2−g)/(3q+2(1−g)),
    ρ = (1/q) ((1 − A₂/q)/(1 − c₂B))² (1 + c₁B)/(1 − c₃B),  m = 4 + (q+2)/(qρ − 1),
    F = λ (Lβ̂)ᵀ(LΦ_ALᵀ)⁻¹(Lβ̂)/q with λ = m(1 − A₂/q)/(m − 2), on (q, m) degrees of freedom.
The Kenward–Roger pieces are dense n×n (V, V⁻¹, the k matrices Vᵢ): meant for n up to a few thousand.

Parameters at a boundary (``at_boundary``), with a warning: Satterthwaite holds them fixed (they are left out of
θ; lmerTest's df on singular fits agree to 1e-4). Kenward–Roger keeps them, as pbkrtest does: away from a boundary
the terms above are tensors and the same in θ and in pbkrtest's natural parameters ψ (variances, covariances, σ²;
V = Σ ψᵢ Gᵢ), but at a boundary ∂ψ/∂θ is singular (a log-scale variance), so P, Q and I_E are computed in ψ
(``_natural_kr_pieces``), where a singular G is an interior point. On the singular fit of tests/reference
(correlation −1) this gives pbkrtest's df = 17 for both coefficients; holding the boundary parameter fixed gave
17.8 and 35.7.
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

DDF_METHODS = ("satterthwaite", "kenward-roger", "residual", None)


def _scipy_stats():
    """scipy.stats, imported on first use: it adds about half a second to ``import jreml``."""
    from scipy import stats

    return stats


def check_ddf(ddf, allow_none: bool = True) -> str | None:
    """Normalise ``ddf`` ("Satterthwaite", "Kenward-Roger", "KR", "residual", None) or raise a ValueError."""
    if ddf is None and allow_none:
        return None
    key = ddf.lower().replace("_", "-") if isinstance(ddf, str) else ddf
    key = {"kr": "kenward-roger", "kenwardroger": "kenward-roger"}.get(key, key)
    allowed = DDF_METHODS if allow_none else ("satterthwaite", "kenward-roger")
    if key not in allowed:
        raise ValueError(f"ddf must be one of {allowed}, got ddf={ddf!r}")
    return key


def _dense_pieces(theta, y, X, model, free):
    """Φ (p,p), ∂Φ/∂θ_free (k,p,p), observed information (k,k), and the KR pieces P (k,p,p), Q (k,k,p,p), I_E."""

    def expand(t_free):
        return theta.at[free].set(t_free)

    t0 = theta[free]
    V = model(theta)
    chol = jnp.linalg.cholesky(V)
    v_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(V.shape[0], dtype=V.dtype))
    v_inv_x = v_inv @ X
    xvx = X.T @ v_inv_x
    phi = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(xvx), True), jnp.eye(X.shape[1], dtype=V.dtype))
    basis = jnp.eye(t0.shape[0], dtype=theta.dtype)
    dv = jax.lax.map(lambda d: jax.jvp(lambda t: model(expand(t)), (t0,), (d,))[1], basis)  # (k, n, n)
    b = jnp.einsum("kab,bp->kap", dv, v_inv_x)  # Vᵢ V⁻¹ X
    P = -jnp.einsum("ap,kaq->kpq", v_inv_x, b)
    # ∂Φ/∂θᵢ = −Φ (∂XᵀV⁻¹X/∂θᵢ) Φ = −Φ Pᵢ Φ
    dphi = -jnp.einsum("ab,kbc,cd->kad", phi, P, phi)
    Q = jnp.einsum("iap,ab,jbq->ijpq", b, v_inv, b)
    M = v_inv - v_inv_x @ phi @ v_inv_x.T
    mv = jnp.einsum("ab,kbc->kac", M, dv)
    expected = 0.5 * jnp.einsum("iab,jba->ij", mv, mv)
    information = _observed_information(t0, y, expand, model, M, dv, expected)
    return phi, dphi, information, P, Q, expected


def _observed_information(t0, y, expand, model, M, dv, expected):
    """−∂²ℓ_REML/∂θ∂θᵀ (k, k) in closed form from P = M (n, n), Vᵢ (k, n, n) and Vᵢⱼ = ∂²V/∂θᵢ∂θⱼ (Harville 1977,
    JASA 72:320, eq. for the REML Hessian):

        I_obs,ᵢⱼ = ½ tr(P Vᵢⱼ) − ½ tr(P Vᵢ P Vⱼ) + (Py)ᵀ Vᵢ P Vⱼ (Py) − ½ (Py)ᵀ Vᵢⱼ (Py).

    Equal to the autodiff Hessian of ``reml_loglik`` (to 7e-15 relative on sleepstudy; ``fit.diagnose()`` gives
    the latter) at a fraction of the cost of differentiating its Cholesky factorisation twice; Vᵢⱼ by
    forward-over-forward mode of θ ↦ V(θ).
    """
    d2v = jax.jacfwd(jax.jacfwd(lambda t: model(expand(t))))(t0)  # (n, n, k, k)
    py = M @ y
    u = jnp.einsum("kab,b->ka", dv, py)  # Vᵢ Py
    tr_pvij = jnp.einsum("ab,baij->ij", M, d2v)
    quad_vij = jnp.einsum("a,abij,b->ij", py, d2v, py)
    return 0.5 * tr_pvij - expected + u @ M @ u.T - 0.5 * quad_vij


_dense_pieces_jit = eqx.filter_jit(_dense_pieces)


def _natural_kr_pieces(theta, theta_inside, X, model):
    """KR's P (k,p,p), Q (k,k,p,p) and I_E (k,k) at θ in the natural parametrisation ψ = ``build_params(θ)`` with
    all k parameters: pbkrtest's V = Σᵢ ψᵢ Gᵢ (variances, covariances, σ²), Gᵢ = ∂V/∂ψᵢ.

    Gᵢ = Σⱼ (∂V/∂θⱼ)(J⁻¹)ⱼᵢ with J = ∂ψ/∂θ (k,k), both taken at ``theta_inside``, θ with its boundary parameters
    moved inside (at the bound J is singular: ∂v/∂θ = v/s → 0 for a log-scale variance v). For V linear in ψ the
    Gᵢ are constant, so they are those at θ; V, V⁻¹ and Φ are at θ itself.
    """
    J = jax.jacfwd(model.build_params)(theta_inside)
    dv_theta = jnp.moveaxis(jax.jacfwd(model)(theta_inside), -1, 0)  # (k, n, n)
    G = jnp.einsum("jab,ji->iab", dv_theta, jnp.linalg.inv(J))
    V = model(theta)
    chol = jnp.linalg.cholesky(V)
    v_inv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(V.shape[0], dtype=V.dtype))
    v_inv_x = v_inv @ X
    phi = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(X.T @ v_inv_x), True), jnp.eye(X.shape[1], dtype=V.dtype))
    b = jnp.einsum("kab,bp->kap", G, v_inv_x)
    P = -jnp.einsum("ap,kaq->kpq", v_inv_x, b)
    Q = jnp.einsum("iap,ab,jbq->ijpq", b, v_inv, b)
    mg = jnp.einsum("ab,kbc->kac", v_inv - v_inv_x @ phi @ v_inv_x.T, G)
    expected = 0.5 * jnp.einsum("iab,jba->ij", mg, mg)
    return P, Q, expected, jnp.linalg.cond(J)


_natural_kr_pieces_jit = eqx.filter_jit(_natural_kr_pieces)


class Pieces:
    """The derivative computations of one fit, done once (one compiled program per model structure)."""

    def __init__(self, theta, y, X, model, at_boundary):
        at_boundary = np.asarray(at_boundary, dtype=bool)
        free = np.flatnonzero(~at_boundary)
        out = _pieces_call(theta, y, X, model, free)
        self.phi, self.dphi, self.information, self.P, self.Q, self.expected = (np.asarray(o, float) for o in out)
        self._phi_adj = None
        self._kr_natural = at_boundary.any() and self._use_natural(theta, X, model, at_boundary)
        if at_boundary.any():
            kr = (
                "Kenward-Roger uses all of them in the natural parametrisation (variances, covariances), as pbkrtest"
                if self._kr_natural
                else "and for Kenward-Roger"
            )
            warnings.warn(
                "some covariance parameters are at their boundary; they are held fixed for the Satterthwaite "
                f"degrees of freedom ({kr})",
                stacklevel=4,
            )

    def _use_natural(self, theta, X, model, at_boundary) -> bool:
        """KR at a boundary: pbkrtest's parametrisation V = Σ ψᵢ Gᵢ keeps every parameter (a rank-deficient G of
        a singular fit is inside ψ's space). Switches P, Q and I_E to it when the Jacobian ∂ψ/∂θ is well
        conditioned once the boundary parameters are moved inside (each log-scale variance ×1e10)."""
        scale_mask = np.asarray(model.scale_mask, dtype=bool)
        one = jnp.asarray(1.0, dtype=theta.dtype)
        powers = np.asarray(model.default_theta(one * np.e) - model.default_theta(one), dtype=float)
        move = np.where(at_boundary & scale_mask, powers * np.log(1e10), 0.0)
        inside = jnp.asarray(np.asarray(theta, dtype=float) + move, dtype=theta.dtype)
        P, Q, expected, cond = _natural_kr_pieces_jit(theta, inside, X, model)
        if not (np.isfinite(float(cond)) and float(cond) < 1e12):
            return False
        self.P, self.Q, self.expected = (np.asarray(o, float) for o in (P, Q, expected))
        return True

    def acov_theta(self) -> np.ndarray:
        return _inverse(self.information, "observed information of θ")

    def satterthwaite(self, L: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
        """(vcov of Lβ̂ (q,q), ν, the per-direction νᵢ) by lmerTest's rule for q rows of L."""
        acov = self.acov_theta()
        cov = L @ self.phi @ L.T
        if L.shape[0] == 1:
            return cov, float(self._nu(L[0], acov)), None
        d, U = np.linalg.eigh(cov)
        nus = np.array([self._nu(row, acov) for row in U.T @ L])
        return cov, _fstat_ddf(nus), nus

    def _nu(self, c, acov) -> float:
        var = c @ self.phi @ c
        g = np.einsum("kpq,p,q->k", self.dphi, c, c)
        return 2.0 * var**2 / (g @ acov @ g) if g.size else np.inf

    def phi_adjusted(self) -> np.ndarray:
        if self._phi_adj is None:
            W = _inverse(self.expected, "expected information of θ")
            phi, P = self.phi, self.P
            pphip = np.einsum("iab,bc,jcd->ijad", P, phi, P)
            U = np.einsum("ij,ijab->ab", W, self.Q - pphip)
            self._phi_adj = phi + 2.0 * phi @ U @ phi
        return self._phi_adj

    def kenward_roger(self, L: np.ndarray, beta: np.ndarray) -> tuple[float, float, float]:
        """(F statistic scaled by λ, numerator df q, denominator df m) of H₀: Lβ = 0 (pbkrtest's ``.KR_adjust``)."""
        phi, P = self.phi, self.P
        W = _inverse(self.expected, "expected information of θ")
        q = int(np.linalg.matrix_rank(L))
        theta_m = L.T @ np.linalg.solve(L @ phi @ L.T, L)
        u = np.einsum("ab,kbc,cd->kad", theta_m @ phi, P, phi)
        tr = np.trace(u, axis1=1, axis2=2)
        a1 = float(tr @ W @ tr)
        a2 = float(np.einsum("ij,iab,jba->", W, u, u))
        b = (a1 + 6.0 * a2) / (2.0 * q)
        g = ((q + 1) * a1 - (q + 4) * a2) / ((q + 2) * a2)
        denom = 3 * q + 2 * (1 - g)
        c1, c2, c3 = g / denom, (q - g) / denom, (q + 2 - g) / denom
        v0 = 1 + c1 * b
        v0 = 0.0 if abs(v0) < 1e-10 else v0
        rho = (1.0 / q) * ((1 - a2 / q) / (1 - c2 * b)) ** 2 * v0 / (1 - c3 * b)
        m = 4 + (q + 2) / (q * rho - 1)
        scale = 1.0 if abs(m - 4) < 1e-10 else m * (1 - a2 / q) / (m - 2)
        lb = L @ beta
        wald = float(lb @ np.linalg.solve(L @ self.phi_adjusted() @ L.T, lb))
        return scale * wald / q, q, float(m)


def _pieces_call(theta, y, X, model, free):
    free = jnp.asarray(free, dtype=jnp.int32)
    return _dense_pieces_jit(theta, y, X, model, free)


def _inverse(matrix: np.ndarray, what: str) -> np.ndarray:
    try:
        return np.linalg.inv(matrix)
    except np.linalg.LinAlgError as err:
        raise np.linalg.LinAlgError(f"the {what} is singular: no degrees of freedom can be computed") from err


def _fstat_ddf(nus: np.ndarray, tol: float = 1e-8) -> float:
    """lmerTest's ``get_Fstat_ddf``: one df from the per-direction Satterthwaite dfs."""
    if np.all(np.abs(nus - nus[0]) < tol):
        return float(nus[0])
    if np.any(nus <= 2):
        return 2.0
    e = float(np.sum(nus / (nus - 2)))
    return 2.0 * e / (e - nus.size)


def _warn_nan(values, what: str):
    if np.any(~np.isfinite(values)):
        warnings.warn(f"{what}: some degrees of freedom could not be computed (NaN)", stacklevel=4)


def coef_table(
    beta: Float[Array, " p"],
    X: Float[Array, "n p"],
    names: list[str],
    ddf: str | None,
    pieces_factory,
    vcov_beta: Float[Array, "p p"],
) -> pd.DataFrame:
    """Per-coefficient t-tests (z-tests for ``ddf=None``): columns estimate, se, df, t, p (two-sided)."""
    beta = np.asarray(beta, dtype=float)
    p = beta.shape[0]
    eye = np.eye(p)
    if ddf is None:
        se = np.sqrt(np.diagonal(np.asarray(vcov_beta, dtype=float)))
        df = np.full(p, np.inf)
    elif ddf == "residual":
        X = np.asarray(X, dtype=float)
        se = np.sqrt(np.diagonal(np.asarray(vcov_beta, dtype=float)))
        df = np.full(p, float(X.shape[0] - np.linalg.matrix_rank(X)))
    else:
        pieces = pieces_factory()
        if ddf == "satterthwaite":
            se = np.sqrt(np.diagonal(pieces.phi))
            df = np.array([pieces.satterthwaite(eye[i : i + 1])[1] for i in range(p)])
        else:
            se = np.sqrt(np.diagonal(pieces.phi_adjusted()))
            df = np.array([pieces.kenward_roger(eye[i : i + 1], beta)[2] for i in range(p)])
        _warn_nan(df, f"coef_table(ddf={ddf!r})")
    t = beta / se
    stats = _scipy_stats()
    pval = 2.0 * stats.t.sf(np.abs(t), df) if ddf is not None else 2.0 * stats.norm.sf(np.abs(t))
    return pd.DataFrame({"estimate": beta, "se": se, "df": df, "t": t, "p": pval}, index=pd.Index(names))


def anova_table(
    beta: Float[Array, " p"], terms: dict[str, list[int]], ddf: str, pieces_factory, sigma2: float
) -> pd.DataFrame:
    """Type III F-tests of each term's coefficients jointly (lmerTest's layout); ``terms``: name → columns of X."""
    beta = np.asarray(beta, dtype=float)
    pieces = pieces_factory()
    rows = {}
    eye = np.eye(beta.shape[0])
    for name, cols in terms.items():
        L = eye[list(cols)]
        if ddf == "satterthwaite":
            cov, den, _ = pieces.satterthwaite(L)
            lb = L @ beta
            q = int(np.linalg.matrix_rank(L))
            f = float(lb @ np.linalg.solve(cov, lb)) / q
        else:
            f, q, den = pieces.kenward_roger(L, beta)
        rows[name] = {
            "Sum Sq": f * q * sigma2,
            "Mean Sq": f * sigma2,
            "NumDF": float(q),
            "DenDF": den,
            "F value": f,
            "Pr(>F)": float(_scipy_stats().f.sf(f, q, den)),
        }
    table = pd.DataFrame.from_dict(
        rows, orient="index", columns=["Sum Sq", "Mean Sq", "NumDF", "DenDF", "F value", "Pr(>F)"]
    )
    _warn_nan(table["DenDF"].to_numpy(), f"anova(ddf={ddf!r})")
    return table
