"""torch_openreml's example data under its names (``torch_openreml.example_data``): ``john_alpha``, the
alpha-lattice trial (72 plots: plot, rep, block, gen, yield, row, col) as a pandas DataFrame. The same data
as ``jreml.datasets.load("john_alpha")``; see ``jreml/datasets/PROVENANCE.md``."""

from .datasets import load

john_alpha = load("john_alpha")
