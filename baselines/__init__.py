"""Wrapped baseline methods, one folder per method, each with a README naming its source, licence,
settings and every deviation from the official code. They register through the ``f2d_bench.methods``
entry points, the same API a third-party package uses."""
