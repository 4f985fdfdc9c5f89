"""First fits in fresh processes, compilation included: jreml vs lme4 in the same run.

Scenarios (each in new processes; nothing is asserted and the script always exits 0):

* **(a) ten fits**: one process imports jreml, then fits ten different models to different data sets (the five
  bundled lme4 examples and five simulated sets of other sizes and structures) once each; the wall time of the ten
  fits after the import. lme4: the same ten ``lmer`` fits in one Rscript process after ``library(lme4)`` and reading
  the CSV files.
* **(b) one fit**: ``python -c "import jreml; jreml.fit('Reaction ~ Days + (Days | Subject)', sleepstudy)"``, the
  whole process's wall time; lme4: ``Rscript -e 'library(lme4); lmer(...)'``.

jreml runs in three settings: ``no cache`` (``JREML_CACHE_DIR=off``: no persistent compilation cache),
``cache empty`` / ``cache warm`` (the library's default persistent compilation cache, moved to a new folder with
``JREML_CACHE_DIR``, first and second run). (a) also gives the compile and run seconds of the ten fits
(``jreml.last_timing()``). Each jreml row is measured with jreml's XLA CPU default
(``--xla_cpu_use_fusion_emitters=false``, see ``jreml/_config.py``), and with ``--xla-default`` also with XLA's own
(``=true``), side by side.

Run: ``python benchmarks/bench_first_use.py [--repeats 2] [--xla-default]`` (about 2 minutes, 4 with
``--xla-default``; R with lme4 for the lme4 column).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pandas as pd
from _blas import have_lme4, load_average

import jreml

#: The ten fits of scenario (a): (data set, formula, grouping columns lme4 must read as factors).
TEN_FITS = [
    ("dyestuff", "Yield ~ 1 + (1 | Batch)", ["Batch"]),
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", ["Subject"]),
    ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", ["plate", "sample"]),
    ("machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", ["Worker", "Machine"]),
    ("john_alpha", "yield ~ 1 + rep + (1 | gen) + (1 | rep:block)", ["gen", "rep", "block"]),
    ("sim_intercept_500", "y ~ 1 + x + (1 | g)", ["g"]),
    ("sim_slope_2000", "y ~ 1 + x + (1 + x | g)", ["g"]),
    ("sim_crossed_3000", "y ~ 1 + x + (1 | g) + (1 | h)", ["g", "h"]),
    ("sim_uncorrelated_1000", "y ~ 1 + x + (1 + x || g)", ["g"]),
    ("sim_intercept_5000", "y ~ 1 + x + (1 | g)", ["g"]),
]
SLEEPSTUDY = "Reaction ~ Days + (Days | Subject)"


def simulated(name: str) -> pd.DataFrame:
    n = int(name.rsplit("_", 1)[1])
    rng = np.random.default_rng(n)
    g = rng.integers(0, max(n // 10, 2), n)
    h = rng.integers(0, 40, n)
    x = rng.normal(size=n)
    y = 1.0 + 0.5 * x + rng.normal(size=g.max() + 1)[g] + 0.3 * rng.normal(size=g.max() + 1)[g] * x
    y = y + 0.5 * rng.normal(size=40)[h] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{v}" for v in g], "h": [f"h{v}" for v in h]})


def write_data(folder: str) -> None:
    for name, _, _ in TEN_FITS:
        data = simulated(name) if name.startswith("sim_") else jreml.datasets.load(name)
        data.to_csv(os.path.join(folder, f"{name}.csv"), index=False)


JREML_TEN = """
import sys, time, pandas as pd
import jreml
fits = {fits!r}
frames = [pd.read_csv(f"{folder}/{{name}}.csv") for name, _, _ in fits]
for (name, _, factors), frame in zip(fits, frames):
    frame[factors] = frame[factors].astype(str)
start = time.perf_counter()
compile_s = 0.0
for (name, formula, _), frame in zip(fits, frames):
    jreml.fit(formula, frame).loglik.block_until_ready()
    compile_s += jreml.last_timing().compile_s
print(time.perf_counter() - start, compile_s)
"""

JREML_ONE = (
    "import jreml; jreml.fit('Reaction ~ Days + (Days | Subject)', jreml.datasets.load('sleepstudy')).loglik"
    ".block_until_ready()"
)


def run_python(code: str, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return wall, out.stdout.strip()


def jreml_env(fusion_default: bool, cache_dir: str | None) -> dict:
    drop = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JREML_CACHE_DIR", "XLA_FLAGS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if not fusion_default:
        env["XLA_FLAGS"] = "--xla_cpu_use_fusion_emitters=true"
    env["JREML_CACHE_DIR"] = "off" if cache_dir is None else cache_dir
    return env


def lme4_ten(folder: str) -> float:
    reads = "\n".join(
        f'd{i} <- read.csv("{folder}/{name}.csv"); ' + "".join(f"d{i}${f} <- factor(d{i}${f}); " for f in factors)
        for i, (name, _, factors) in enumerate(TEN_FITS)
    )
    fits = "\n".join(f"lmer({formula}, d{i})" for i, (_, formula, _) in enumerate(TEN_FITS))
    script = f"suppressMessages(library(lme4))\n{reads}\nt <- system.time({{\n{fits}\n}})\ncat(t[['elapsed']])\n"
    out = subprocess.run(["Rscript", "-e", script], capture_output=True, text=True)
    return float(out.stdout.strip().split()[-1])


def lme4_one() -> float:
    script = "suppressMessages(library(lme4)); invisible(lmer(Reaction ~ Days + (Days | Subject), sleepstudy))"
    start = time.perf_counter()
    subprocess.run(["Rscript", "-e", script], capture_output=True, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="fresh processes per cell (the median is shown)")
    parser.add_argument("--xla-default", action="store_true", help="also measure with XLA's fusion emitters on")
    args = parser.parse_args()
    print(f"load average before: {load_average()}")
    folder = tempfile.mkdtemp(prefix="jreml_first_use_")
    write_data(folder)
    lme4 = have_lme4()
    ten_code = JREML_TEN.format(fits=TEN_FITS, folder=folder)
    rows = []
    for fusion_default in (True, False) if args.xla_default else (True,):
        label = "jreml default" if fusion_default else "XLA default (fusion emitters on)"
        for scenario, code in (("(a) ten fits", ten_code), ("(b) one fit", JREML_ONE)):
            cells = {"no cache": [], "cache empty": [], "cache warm": []}
            compiles = {cell: [] for cell in cells}  # (a): compile seconds of the ten fits (last_timing)

            for _ in range(args.repeats):
                cache = tempfile.mkdtemp(prefix="jreml_cache_")
                for cell, folder_or_off in (("no cache", None), ("cache empty", cache), ("cache warm", cache)):
                    wall, out = run_python(code, jreml_env(fusion_default, folder_or_off))
                    values = [float(v) for v in out.split()]
                    cells[cell].append(values[0] if values else wall)
                    if len(values) > 1:
                        compiles[cell].append(values[1])
                shutil.rmtree(cache, ignore_errors=True)
            row = {"scenario": scenario, "jreml": label, **{k: statistics.median(v) for k, v in cells.items()}}
            for cell, values in compiles.items():
                if values:
                    row[f"{cell}: compile"] = statistics.median(values)
            rows.append(row)
    table = pd.DataFrame(rows)
    if lme4:
        peer = {"(a) ten fits": statistics.median(lme4_ten(folder) for _ in range(args.repeats))}
        peer["(b) one fit"] = statistics.median(lme4_one() for _ in range(args.repeats))
        table["lme4_s"] = table["scenario"].map(peer)
        for cell in ("no cache", "cache empty", "cache warm"):
            table[f"{cell} / lme4"] = table[cell] / table["lme4_s"]
    else:
        print("lme4 column: Rscript with lme4 not found (apt-get install r-cran-lme4)")
    shutil.rmtree(folder, ignore_errors=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 2):
        print(
            textwrap.dedent("""
            seconds: (a) the ten fits after import in one process; (b) the whole process, import included
        """).strip()
        )
        print(table.to_string(index=False))
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
