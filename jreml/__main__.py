"""The ``jreml`` command: fit an lme4-style formula to a CSV file (or a bundled example) and print the result.

    jreml fit DATA.csv "FORMULA" [--sep SEP] [--ml] [--algorithm ai|fisher|newton|em|hybrid] [--relmat GROUP=K.csv]
              [--json]
    jreml fit --example NAME [--trait traitN] [--ml] [--algorithm ...] [--json]
    jreml datasets
    jreml --version

Without ``--json`` the lme4-style summary is printed; with ``--json`` one JSON object with the keys method,
nobs, loglik, aic, bic, converged, singular, n_iter, fixef, se, varcorr, sigma2 and time_s (the wall time of
the fit, compilation included).

``--sep`` is DATA.csv's field separator (default ``,``; ``\\t`` or ``tab`` for a tab-separated file); relmat
files are always comma-separated.

Columns used as grouping factors (the right of ``|`` in a random term) are read as strings, so numeric codes
are factors, as in R. ``--relmat GROUP=K.csv`` (repeatable) gives the term ``(1 | GROUP)`` the covariance
σ²·K. K.csv is either a CSV with a header row of level names and a first column with the same level names
(matched by name, any order; extra levels are ignored), or a plain numeric matrix without header or index
column, in the sorted order of GROUP's levels. A file whose first line is all numbers is read as the latter.

Compiled programs are kept in JAX's persistent compilation cache, which ``import jreml`` turns on (``jreml._cache``:
``~/.cache/jreml/xla/<jax>-<jaxlib>`` on Linux, ``$JREML_CACHE_DIR`` moves it, ``JREML_CACHE_DIR=off`` disables
it), so a later process fitting a model of the same shape skips XLA compilation; this command writes every
program it compiles there, however short its compilation.

Exit status: 0 after a converged fit, 1 when the fit did not converge, 2 for a usage or input error (one line
on stderr). When the reader of the output goes away (``jreml datasets | head -1``) the command stops quietly, as
Unix tools do, with the status of a process ended by SIGPIPE (141).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

#: The classic model of each bundled data set (``jreml fit --example NAME``, ``jreml datasets``).
EXAMPLE_FORMULAS = {
    "dyestuff": "Yield ~ 1 + (1 | Batch)",
    "sleepstudy": "Reaction ~ Days + (Days | Subject)",
    "penicillin": "diameter ~ 1 + (1 | plate) + (1 | sample)",
    "machines": "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)",
    "john_alpha": "yield ~ 1 + rep + (1 | gen) + (1 | rep:block)",
    "kinship": "trait1 ~ 1 + covariate + (1 | id)",
}


class UserError(Exception):
    """A mistake in the command line or the input files: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _one_line(err: BaseException) -> str:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(message).split()) or type(err).__name__


def _separator(sep: str | None) -> str:
    """DATA.csv's field separator: ``--sep`` with ``\\t`` (as typed in a shell) or ``tab`` meaning a tab."""
    if sep is None:
        return ","
    if sep in ("\\t", "tab", "TAB"):
        return "\t"
    if not sep:
        raise UserError("--sep needs a separator, e.g. --sep ';' or --sep '\\t'")
    return sep


def _read_data(path: str, formula: str, sep: str = ","):
    import pandas as pd

    from jreml._design.formula import parse_formula

    factors = {f for spec in parse_formula(formula).random for f in spec.factors}
    try:
        header = pd.read_csv(path, nrows=0, sep=sep)
    except FileNotFoundError as err:
        raise UserError(f"data file {path!r} not found") from err
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read data file {path!r}: {_one_line(err)}") from err
    dtype = {c: str for c in header.columns if c in factors}
    try:
        return pd.read_csv(path, dtype=dtype, sep=sep)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read data file {path!r}: {_one_line(err)}") from err


def _read_relmat(text: str):
    import numpy as np
    import pandas as pd

    group, sep, path = text.partition("=")
    if not sep or not group.strip() or not path.strip():
        raise UserError(f"--relmat expects GROUP=FILE.csv, got {text!r}")
    group, path = group.strip(), path.strip()
    try:
        with open(path) as fh:
            first = fh.readline()
    except OSError as err:
        raise UserError(f"relmat file {path!r} for {group!r}: {err.strerror or err}") from err
    cells = [c.strip().strip('"') for c in first.strip().split(",")]

    def number(c):
        try:
            float(c)
            return True
        except ValueError:
            return False

    try:
        if cells and all(number(c) for c in cells):
            K = np.loadtxt(path, delimiter=",", ndmin=2)
        else:
            K = pd.read_csv(path, index_col=0, dtype={0: str})
            K.index = [str(v) for v in K.index]
            K.columns = [str(c) for c in K.columns]
            K = K.astype(float)
    except ValueError as err:
        raise UserError(f"relmat file {path!r} for {group!r}: not a numeric matrix ({_one_line(err)})") from err
    return group, K


def _run_fit(formula, data, relmat, args):
    import jreml

    start = time.perf_counter()
    fit = jreml.fit(formula, data, method="ml" if args.ml else "reml", algorithm=args.algorithm, relmat=relmat)
    fit.loglik.block_until_ready()
    elapsed = time.perf_counter() - start
    if args.json:
        out = fit.to_dict()
        out["time_s"] = elapsed
        print(json.dumps(out, indent=2))
    else:
        print(fit.summary())
        print(f"\n(fit in {elapsed:.2f} s, compilation included)")
    if not bool(fit.converged):
        print(f"jreml: warning: the fit did not converge ({fit.message})", file=sys.stderr)
        return 1
    return 0


def _example(args):
    import pandas as pd

    import jreml

    name = args.example.lower()
    if name not in EXAMPLE_FORMULAS:
        raise UserError(f"unknown data set {args.example!r}; available: {', '.join(EXAMPLE_FORMULAS)}")
    data = jreml.datasets.load(name)
    formula = EXAMPLE_FORMULAS[name]
    relmat = None
    if name == "kinship":
        trait = args.trait or "trait1"
        if trait not in data.columns or not trait.startswith("trait"):
            traits = [c for c in data.columns if c.startswith("trait")]
            raise UserError(f"unknown trait {trait!r}; available: {', '.join(traits)}")
        formula = formula.replace("trait1", trait)
        ids = [str(v) for v in data["id"]]
        relmat = {"id": pd.DataFrame(jreml.datasets.kinship_matrix(), index=ids, columns=ids)}
    elif args.trait:
        raise UserError("--trait applies to the kinship example only")
    return formula, data, relmat


def _fit_command(args) -> int:
    if args.example:
        if args.data or args.formula:
            raise UserError("give either DATA.csv FORMULA or --example NAME, not both")
        if args.relmat:
            raise UserError("--relmat applies to DATA.csv FORMULA fits, not to --example")
        if args.sep is not None:
            raise UserError("--sep applies to DATA.csv FORMULA fits, not to --example")
        formula, data, relmat = _example(args)
    else:
        if not args.data or not args.formula:
            raise UserError("`jreml fit` needs DATA.csv and FORMULA (or --example NAME)")
        formula = args.formula
        data = _read_data(args.data, formula, _separator(args.sep))
        relmat = dict(_read_relmat(text) for text in args.relmat or [])
    return _run_fit(formula, data, relmat, args)


def _datasets() -> int:
    from jreml import datasets

    for name, desc in datasets.list_datasets().items():
        print(f"{name:12s} {EXAMPLE_FORMULAS.get(name, ''):56s} {desc}")
    return 0


def _enable_compilation_cache() -> None:
    """Write every compiled program to the persistent cache ``import jreml`` set up (or the user's): a one-shot
    process gains from each one the next process loads. Unless the user set the threshold or turned it off."""
    import os

    import jax

    if jax.config.jax_compilation_cache_dir is None:
        return
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _single_threaded_lapack() -> None:
    """One OpenBLAS thread for jaxlib's LAPACK calls unless the user chose otherwise.

    jaxlib's CPU Cholesky and triangular solves call SciPy's OpenBLAS, which spin-waits on its worker threads: on
    a loaded machine a small fit became ~30× slower with two threads. A command-line fit is small and single
    shot, so one thread is the safe choice. OpenBLAS reads the variable when SciPy loads it, which happens at
    the first LAPACK call, i.e. after this.
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


class _Version(argparse.Action):
    """``--version``: prints ``jreml <version>`` and exits (jreml, and so JAX, is imported only then)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit", default=argparse.SUPPRESS)

    def __call__(self, parser, namespace, values, option_string=None):
        from jreml import __version__

        print(f"jreml {__version__}")
        parser.exit()


def main(argv=None) -> int:
    """Run the command; returns its exit status. A closed output pipe ends it quietly with 128 + SIGPIPE."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a reader that went away shows up here at the latest, not in Python's flush at exit
        return status
    except BrokenPipeError:
        # `jreml ... | head -1`: stop without a traceback, as Unix tools do. What is still buffered must not be
        # flushed into the closed pipe again at exit (Python would print "Exception ignored ..."): point stdout
        # at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _main(argv) -> int:
    _single_threaded_lapack()
    parser = _Parser(prog="jreml", description="REML/ML fits of linear mixed models in JAX.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fit = sub.add_parser("fit", help="fit an lme4-style formula to a CSV file or a bundled data set")
    fit.add_argument("data", nargs="?", help="a CSV file with a header row")
    fit.add_argument("formula", nargs="?", help='an lme4 formula, e.g. "Reaction ~ Days + (Days | Subject)"')
    fit.add_argument("--sep", help="DATA.csv's field separator (default ','; '\\t' or 'tab' for a tab-separated file)")
    fit.add_argument("--example", help="fit a bundled data set's classic model instead (see `jreml datasets`)")
    fit.add_argument("--trait", help="kinship example: which trait column (default trait1)")
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--algorithm", default="ai", choices=["ai", "fisher", "newton", "em", "hybrid"])
    fit.add_argument(
        "--relmat",
        action="append",
        metavar="GROUP=K.csv",
        help="covariance sigma^2*K for (1 | GROUP); K.csv with a header row and index column of level names, "
        "or a plain numeric matrix in sorted-level order",
    )
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("datasets", help="list the bundled data sets and their formulas")
    try:
        args = parser.parse_args(argv)
        if args.command == "datasets":
            return _datasets()
        _enable_compilation_cache()
        from jreml._estimate import compiler_options

        # The fit runs its compiled program once, for milliseconds, after compiling it for seconds: LLVM's
        # optimisation level 0 takes about a third off that compile time (sleepstudy ~3.2 s -> ~2.1 s) and
        # changes no result.
        with compiler_options({"xla_backend_optimization_level": 0}):
            return _fit_command(args)
    except UserError as err:
        print(f"jreml: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, TypeError, NotImplementedError) as err:
        # Raised by the formula layer for unknown columns, bad formulas, non-numeric responses, bad relmats.
        print(f"jreml: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
