"""Real-size data on the blocked sparse back end: jreml vs lme4 (and pystatistics) in the same run.

Parts (each prints a table; nothing is asserted and the script always exits 0):

* **InstEval** ``y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)`` (n = 73,421; 2,972 students, 1,128
  lecturers, 28 department×service cells), REML and ML. With R and lme4 installed the data are lme4's own
  ``InstEval`` (written to a CSV by Rscript), otherwise an InstEval-shaped simulation of the same size. Columns:
  ``first_s`` (the first ``jreml.fit`` in this process, compilation included), ``warm_s`` (the median of
  ``--repeats`` further fits), ``fresh_s`` / ``rss_gb`` (a fresh Python process that reads the CSV and fits once:
  wall time and peak resident memory), ``lme4_s`` (``system.time(lmer(...))`` elapsed, one Rscript process per
  fit, data loading outside the timer), the ratio lme4/warm and both log-likelihoods; ``ranef_s``: ``fit.ranef``
  (conditional modes and SDs of every level, from the blocked factor) on the first call and on a second, and
  lme4's ``ranef(m, condVar = TRUE)``.
* **Growth** at ``--sizes`` (default 10⁴ and 10⁵; add 1000000 for 10⁶): ``y ~ x + (x | g)`` with groups of 10,
  ``y ~ x + (1 | g) + (1 | h)`` crossed with √n levels each, and InstEval-shaped data (n/25 students,
  1,128·(n/73,421)^(1/3) lecturers, 28 department×service cells). jreml warm (median of ``--repeats``) and lme4 in
  the same run, lme4 up to ``--r-timeout`` seconds per fit; the growth exponent between consecutive sizes.
* **kb07**: the maximal model of a kb07-shaped simulation (``kb07_like``: 56 subjects × 32 items, 1,789 rows,
  ``(1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)``, 72 covariance parameters), REML: jreml's first
  and warm fit with its defaults, lme4's ``lmer`` in the same run.
* **pystatistics** (``pip install pystatistics``, a sparse profiled-deviance peer): ``y ~ 1 + x + (1 | g)`` with
  groups of 10 at n = 5,000 and 50,000, warm medians of both.

Run: ``python benchmarks/bench_large.py`` (about 5 minutes with lme4; ``--sizes 10000 100000 1000000`` adds
several minutes, most of them lme4's). ``--blas-threads 1`` sets scipy's OpenBLAS (jaxlib's Cholesky and
triangular solves) to one thread: on a busy 2-core machine its two threads stall (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pandas as pd
from _blas import blas_report, have_lme4, load_average

import jreml

INSTEVAL = "y ~ 1 + service + (1 | s) + (1 | d) + (1 | dept:service)"
FACTORS = ("s", "d", "dept", "service", "g", "h")


def insteval_from_r(path: str) -> bool:
    script = f'suppressMessages(library(lme4)); data(InstEval); write.csv(InstEval, "{path}", row.names=FALSE)'
    return subprocess.run(["Rscript", "-e", script], capture_output=True).returncode == 0


def read(path: str) -> pd.DataFrame:
    return pd.read_csv(path, dtype={c: str for c in FACTORS})


def insteval_like(n: int, seed: int = 0) -> pd.DataFrame:
    """n rows shaped like InstEval: n/25 students, 1,128·(n/73,421)^(1/3) lecturers in 14 departments, 2 services."""
    rng = np.random.default_rng(seed)
    students = max(2, n // 25)
    lecturers = max(2, int(round(1128 * (n / 73421) ** (1 / 3))))
    s = rng.integers(0, students, n)
    d = rng.integers(0, lecturers, n)
    dept = d % 14
    service = rng.integers(0, 2, n)
    y = (
        3.2
        + 0.1 * service
        + rng.normal(0, 0.32, students)[s]
        + rng.normal(0, 0.51, lecturers)[d]
        + rng.normal(0, 0.11, 28)[dept * 2 + service]
        + rng.normal(0, 1.18, n)
    )
    return pd.DataFrame({"s": s, "d": d, "dept": dept, "service": service, "y": y}).astype(
        {"s": str, "d": str, "dept": str, "service": str}
    )


def slopes(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    g = np.arange(n) // 10
    x = rng.normal(size=n)
    m = g.max() + 1
    y = 1 + 0.5 * x + rng.normal(0, 1.0, m)[g] + rng.normal(0, 0.4, m)[g] * x + rng.normal(size=n)
    return pd.DataFrame({"g": g.astype(str), "x": x, "y": y})


def crossed(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    levels = max(2, int(round(np.sqrt(n))))
    g, h = rng.integers(0, levels, n), rng.integers(0, levels, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=levels)[g] + 0.7 * rng.normal(size=levels)[h] + rng.normal(size=n)
    return pd.DataFrame({"g": g.astype(str), "h": h.astype(str), "x": x, "y": y})


def jreml_times(formula: str, df: pd.DataFrame, method: str, repeats: int):
    t = time.perf_counter()
    fit = jreml.fit(formula, df, method=method)
    first = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        fit = jreml.fit(formula, df, method=method)
        float(fit.loglik)
        warm.append(time.perf_counter() - t)
    backend = jreml.select_backend(fit.model).name
    return first, statistics.median(warm), float(fit.loglik), int(fit.n_iter), backend, str(fit.message), fit


def ranef_times(fit) -> tuple[float, float]:
    """``fit.ranef`` (conditional modes and SDs of every level): the first call (compilation included), a second."""
    out = []
    for _ in range(2):
        t = time.perf_counter()
        frames = fit.ranef
        out.append(time.perf_counter() - t)
    assert all(np.isfinite(frame.to_numpy()).all() for frame in frames.values())
    return out[0], out[1]


FRESH = textwrap.dedent(
    """
    import resource, sys, time, json
    t = time.perf_counter()
    import pandas as pd, jreml
    df = pd.read_csv(sys.argv[1], dtype={c: str for c in FACTORS})
    fit = jreml.fit(sys.argv[2], df, method=sys.argv[3])
    loglik = float(fit.loglik)
    print(json.dumps({"wall": time.perf_counter() - t, "loglik": loglik,
                      "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
    """
).replace("FACTORS", repr(FACTORS))


def fresh_process(path: str, formula: str, method: str, blas_threads: int | None = None):
    env = dict(os.environ)
    if blas_threads is not None:  # as this process (``--blas-threads``)
        env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    command = [sys.executable, "-c", FRESH, path, formula, method]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


LME4 = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    args <- commandArgs(trailingOnly = TRUE)
    d <- read.csv(args[1], colClasses = c(s = "factor", d = "factor", dept = "factor", service = "factor",
                                          g = "factor", h = "factor"))
    t <- system.time(m <- lmer(as.formula(args[2]), data = d, REML = args[3] == "reml"))
    t2 <- system.time(r <- ranef(m, condVar = TRUE))
    cat(t[["elapsed"]], format(as.numeric(logLik(m)), digits = 15), t2[["elapsed"]], "\\n")
    """
)


def lme4_fit(path: str, formula: str, method: str, timeout: float):
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(LME4)
    try:
        out = subprocess.run(
            ["Rscript", f.name, path, formula, method], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        return None
    elapsed, loglik, ranef = out.stdout.split()[:3]
    return float(elapsed), float(loglik), float(ranef)


def fmt(x, digits=2):
    return "-" if x is None else f"{x:.{digits}f}"


def part_insteval(args, r_ok: bool, tmp: str):
    path = os.path.join(tmp, "insteval.csv")
    source = "lme4's InstEval"
    if not (r_ok and insteval_from_r(path)):
        insteval_like(73421).to_csv(path, index=False)
        source = "InstEval-shaped simulation (no R/lme4)"
    df = read(path)
    print(f"\n## InstEval: {INSTEVAL}, n = {len(df):,} ({source})\n")
    columns = "first_s | warm_s | fresh_s | rss_gb | lme4_s | lme4/warm | loglik jreml | loglik lme4 | iter | backend"
    columns += " | ranef_s first / second | lme4 ranef_s"
    print(f"method | {columns}")
    print("|".join(["---"] * 14))
    for method in ("reml", "ml"):
        first, warm, loglik, n_iter, backend, message, fit = jreml_times(INSTEVAL, df, method, args.repeats)
        ranef_first, ranef_second = ranef_times(fit)
        fresh = fresh_process(path, INSTEVAL, method, args.blas_threads)
        peer = lme4_fit(path, INSTEVAL, method, args.r_timeout) if r_ok else None
        peer_s = peer[0] if isinstance(peer, tuple) else None
        peer_ll = f"{peer[1]:.4f}" if isinstance(peer, tuple) else (peer or "-")
        print(
            f"{method} | {fmt(first)} | {fmt(warm)} | {fmt(fresh and fresh['wall'])} | {fmt(fresh and fresh['rss_gb'])}"
            f" | {fmt(peer_s)} | {fmt(peer_s / warm if peer_s else None, 1)} | {loglik:.4f} | {peer_ll} | {n_iter}"
            f" | {backend} ({message}) | {fmt(ranef_first)} / {fmt(ranef_second)}"
            f" | {fmt(peer[2] if isinstance(peer, tuple) else None)}"
        )


KB07 = "rt ~ 1 + spkr*prec*load + (1 + spkr*prec*load | subj) + (1 + spkr*prec*load | item)"


def kb07_like(seed: int = 0) -> pd.DataFrame:
    """kb07's shape (Kronmüller & Barr 2007, MixedModels.jl's benchmark): 56 subjects × 32 items, 1,789 rows, three
    two-level factors varying within subjects and items (a Latin square), all eight cells' effects random by
    subject and by item, correlated: 8 fixed columns, 2 × 36 covariance parameters."""
    rng = np.random.default_rng(seed)
    subj, item = (a.ravel() for a in np.meshgrid(np.arange(56), np.arange(32), indexing="ij"))
    cell = (subj + item) % 8
    spkr, prec, load = cell & 1, (cell >> 1) & 1, (cell >> 2) & 1
    columns = [np.ones(subj.size), spkr, prec, load, spkr * prec, spkr * load, prec * load, spkr * prec * load]
    X = np.column_stack(columns)
    beta = np.array([2200.0, 60, -330, 180, -20, 10, -30, 15])

    def covariance(sds):
        corr = np.full((8, 8), 0.2)
        np.fill_diagonal(corr, 1.0)
        return np.outer(sds, sds) * corr

    b_subj = rng.multivariate_normal(np.zeros(8), covariance(np.array([300.0, 60, 80, 40, 30, 30, 30, 20])), 56)
    b_item = rng.multivariate_normal(np.zeros(8), covariance(np.array([350.0, 40, 250, 40, 30, 20, 30, 20])), 32)
    y = X @ beta + np.sum(X * b_subj[subj], 1) + np.sum(X * b_item[item], 1) + rng.normal(scale=650, size=subj.size)
    frame = pd.DataFrame(
        {
            "rt": y,
            "subj": [f"S{s}" for s in subj],
            "item": [f"I{i}" for i in item],
            "spkr": np.where(spkr == 1, "old", "new"),
            "prec": np.where(prec == 1, "maintain", "break"),
            "load": np.where(load == 1, "yes", "no"),
        }
    )
    return frame.drop(index=rng.choice(len(frame), 3, replace=False)).reset_index(drop=True)


LME4_KB07 = textwrap.dedent(
    """
    suppressMessages(library(lme4))
    args <- commandArgs(trailingOnly = TRUE)
    d <- read.csv(args[1], stringsAsFactors = TRUE)
    t <- system.time(m <- lmer(as.formula(args[2]), data = d, REML = TRUE))
    cat(t[["elapsed"]], format(as.numeric(logLik(m)), digits = 15), "\\n")
    """
)


def part_kb07(args, r_ok: bool, tmp: str):
    """The maximal kb07-shaped model: jreml's first and warm fit (defaults) and lme4's lmer in the same run."""
    path = os.path.join(tmp, "kb07.csv")
    df = kb07_like()
    df.to_csv(path, index=False)
    print(f"\n## kb07-shaped maximal model: {KB07}, n = {len(df):,}, 72 covariance parameters\n")
    print("first_s | warm_s | lme4_s | lme4/warm | loglik jreml | loglik lme4 | iter | status | backend")
    print("--- | --- | --- | --- | --- | --- | --- | --- | ---")
    first, warm, loglik, n_iter, backend, message, _ = jreml_times(KB07, df, "reml", 1)
    peer = None
    if r_ok:
        with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
            f.write(LME4_KB07)
        try:
            out = subprocess.run(
                ["Rscript", f.name, path, KB07], capture_output=True, text=True, timeout=args.r_timeout
            )
            if out.returncode == 0:
                peer = tuple(float(v) for v in out.stdout.split()[:2])
        except subprocess.TimeoutExpired:
            peer = None
        finally:
            os.unlink(f.name)
    peer_s = peer[0] if peer else None
    print(
        f"{fmt(first)} | {fmt(warm)} | {fmt(peer_s)} | {fmt(peer_s / warm if peer_s else None, 1)} | {loglik:.4f}"
        f" | {f'{peer[1]:.4f}' if peer else '-'} | {n_iter} | {message} | {backend}"
    )


def part_growth(args, r_ok: bool, tmp: str):
    designs = (
        ("(x|g), groups of 10", "y ~ x + (x | g)", slopes),
        ("(1|g)+(1|h), sqrt(n) levels", "y ~ x + (1 | g) + (1 | h)", crossed),
        ("InstEval-shaped", INSTEVAL, insteval_like),
    )
    print("\n## Growth with n (warm medians; lme4 elapsed in the same run)\n")
    print("design | n | jreml_s | lme4_s | lme4/jreml | exponent | iter | backend | loglik jreml | loglik lme4")
    print("--- | --- | --- | --- | --- | --- | --- | --- | --- | ---")
    for label, formula, make in designs:
        previous = None
        for n in args.sizes:
            df = make(n)
            path = os.path.join(tmp, f"growth_{n}.csv")
            df.to_csv(path, index=False)
            _, warm, loglik, n_iter, backend, *_ = jreml_times(formula, df, "reml", max(1, args.repeats // 2))
            peer = lme4_fit(path, formula, "reml", args.r_timeout) if r_ok else None
            peer_s = peer[0] if isinstance(peer, tuple) else None
            ratio = fmt(peer_s / warm if peer_s else None, 1)
            exponent = "-" if previous is None else f"{np.log(warm / previous[1]) / np.log(n / previous[0]):.2f}"
            peer_ll = f"{peer[1]:.3f}" if isinstance(peer, tuple) else (peer or "-")
            peer_text = fmt(peer_s) if peer != "timeout" else f"> {args.r_timeout:.0f}"
            print(
                f"{label} | {n:,} | {fmt(warm, 3)} | {peer_text} | {ratio} | {exponent} | {n_iter} | {backend}"
                f" | {loglik:.3f} | {peer_ll}"
            )
            previous = (n, warm)


def part_pystatistics(args):
    try:
        from pystatistics.mixed import lmm  # noqa: F401
    except ImportError as err:
        print(f"\n## pystatistics: not installed ({err}); `pip install pystatistics` to compare")
        return
    from pystatistics.mixed import lmm

    print("\n## y ~ 1 + x + (1 | g), groups of 10: jreml vs pystatistics lmm (warm medians)\n")
    print("n | jreml_s | pystatistics_s | pystatistics/jreml | loglik jreml | loglik pystatistics")
    print("--- | --- | --- | --- | --- | ---")
    for n in (5000, 50000):
        rng = np.random.default_rng(1)
        g = np.arange(n) // 10
        x = rng.normal(size=n)
        y = 1 + 0.5 * x + rng.normal(size=g.max() + 1)[g] + rng.normal(size=n)
        df = pd.DataFrame({"y": y, "x": x, "g": g.astype(str)})
        _, warm, loglik, *_ = jreml_times("y ~ 1 + x + (1 | g)", df, "reml", args.repeats)
        X = np.column_stack([np.ones(n), x])
        lmm(y, X, groups={"g": g}, reml=True, compute_satterthwaite=False)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            peer = lmm(y, X, groups={"g": g}, reml=True, compute_satterthwaite=False)
            times.append(time.perf_counter() - t)
        peer_s = statistics.median(times)
        peer_ll = getattr(peer, "log_likelihood", getattr(peer, "loglik", float("nan")))
        print(f"{n:,} | {warm:.4f} | {peer_s:.4f} | {peer_s / warm:.1f} | {loglik:.3f} | {float(peer_ll):.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--r-timeout", type=float, default=600.0, help="seconds per lme4 fit before giving up")
    parser.add_argument("--skip", nargs="*", default=(), choices=("insteval", "growth", "pystatistics", "kb07"))
    parser.add_argument("--no-lme4", action="store_true")
    parser.add_argument("--blas-threads", type=int, default=None)
    args = parser.parse_args()
    print(blas_report(args.blas_threads))
    print(load_average())
    r_ok = not args.no_lme4 and have_lme4()
    print("lme4:", "found (Rscript)" if r_ok else "not used (Rscript or lme4 missing, or --no-lme4)")
    with tempfile.TemporaryDirectory() as tmp:
        if "insteval" not in args.skip:
            part_insteval(args, r_ok, tmp)
        if "growth" not in args.skip:
            part_growth(args, r_ok, tmp)
        if "pystatistics" not in args.skip:
            part_pystatistics(args)
        if "kb07" not in args.skip:
            part_kb07(args, r_ok, tmp)
    print(load_average())


if __name__ == "__main__":
    main()
