"""Structured likelihood back ends (alternatives to the dense n×n Cholesky of ``_likelihood.core``)."""
