"""The batch axis spread over 4 (forced host) devices gives the same fits as one device."""

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys
import jax, numpy as np, pandas as pd
import jreml
from jreml._batch import fit_batch
from jreml._bootstrap import bootstrap
from jreml._sharding import device_count, shard_batch

ex = jreml.example("kinship")
K = jreml.datasets.kinship_matrix()
relmat = {"id": pd.DataFrame(K, index=ex.data.id, columns=ex.data.id)}
traits = [f"trait{i}" for i in range(1, 8)]  # 7: padded to a multiple of the device count
out = fit_batch("y ~ 1 + covariate + (1 | id)", ex.data, traits, relmat=relmat)
dy = jreml.example("dyestuff")
boot = bootstrap(jreml.estimate(dy.model, dy.y, dy.X), 6, seed=1)
sharded = shard_batch(np.zeros((8, 3)))
json.dump({
    "devices": device_count(),
    "n_shards": len(sharded.addressable_shards) if hasattr(sharded, "addressable_shards") else 1,
    "loglik": out.loglik.tolist(), "params": out.params.tolist(), "h2_se": out.h2_se.tolist(),
    "boot_params": boot.params.tolist(), "boot_beta": boot.beta.tolist(),
}, sys.stdout)
"""


def _run(n_devices: int) -> dict:
    env = dict(os.environ)
    # The suite's XLA flags (conftest: LLVM at level 0, which compiles the fitting programs faster) plus the
    # device count, the same for both runs.
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_four_devices_equal_one():
    one, four = _run(1), _run(4)
    assert one["devices"] == 1 and four["devices"] == 4 and four["n_shards"] == 4
    for key in ("loglik", "params", "h2_se", "boot_params", "boot_beta"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-9, atol=1e-12, err_msg=key)
