"""The ``jreml`` command: fit a bundled example and print the result.

    jreml fit --example sleepstudy [--ml] [--algorithm ai|fisher|newton|em] [--json]
    jreml datasets

(The formula interface ``jreml fit DATA.csv "FORMULA"`` is planned; examples use hand-built models.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _fit_example(args) -> int:
    import numpy as np

    import jreml

    try:
        ex = jreml.example(args.example, **({"trait": args.trait} if args.trait else {}))
    except (ValueError, KeyError) as err:
        print(f"jreml: {err}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    fit = jreml.estimate(ex.model, ex.y, ex.X, method="ml" if args.ml else "reml", algorithm=args.algorithm)
    fit.loglik.block_until_ready()
    elapsed = time.perf_counter() - start
    if args.json:
        out = {
            "example": ex.name,
            "model": ex.formula,
            "method": fit.method.upper(),
            "nobs": fit.nobs,
            "loglik": float(fit.loglik),
            "aic": float(fit.aic),
            "bic": float(fit.bic),
            "converged": bool(fit.converged),
            "singular": bool(fit.singular),
            "n_iter": int(fit.n_iter),
            "fixef": dict(zip(ex.fixef_names, np.asarray(fit.beta).tolist(), strict=True)),
            "se": dict(zip(ex.fixef_names, np.asarray(fit.se_beta).tolist(), strict=True)),
            "params": {k: float(v) for k, v in fit.params.items()},
            "time_s": elapsed,
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"Example {ex.name!r}: {ex.formula}")
        print(fit.summary(beta_names=list(ex.fixef_names)))
        print(f"(fit in {elapsed:.2f} s, compilation included)")
    return 0 if bool(fit.converged) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jreml", description="REML/ML fits of linear mixed models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a model")
    fit.add_argument("--example", required=True, help="a bundled data set (see `jreml datasets`)")
    fit.add_argument("--trait", help="kinship example: which trait column (default trait1)")
    fit.add_argument("--ml", action="store_true", help="maximum likelihood instead of REML")
    fit.add_argument("--algorithm", default="ai", choices=["ai", "fisher", "newton", "em"])
    fit.add_argument("--json", action="store_true", help="print one JSON object")
    sub.add_parser("datasets", help="list the bundled data sets")
    args = parser.parse_args(argv)
    if args.command == "datasets":
        from jreml import datasets

        for name, desc in datasets.list_datasets().items():
            print(f"{name:12s} {desc}")
        return 0
    return _fit_example(args)


if __name__ == "__main__":
    sys.exit(main())
