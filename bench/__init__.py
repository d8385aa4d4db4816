"""Benchmark suite of flashmemory-triton: ``flashmemory-triton bench --help``.

Installed with the package as ``flashmemory_triton.bench`` (pyproject's package-dir, as
``kernels/``), so ``python -m flashmemory_triton.bench`` works from any directory; from the
repository root ``python -m bench`` runs the same code.

Modules, one job each:

* :mod:`bench.sweeps` - which shapes, layouts, precisions and ensembles a run covers;
* :mod:`bench.inputs` - synthetic weights and inputs shared by every provider of a shape;
* :mod:`bench.providers` - the implementations being timed, each behind the same call;
* :mod:`bench.check` - the correctness pre-check against the fp32 reference;
* :mod:`bench.timing` - repeated timings and peak memory;
* :mod:`bench.roofline` - counted FLOPs and bytes, the card's measured ceilings;
* :mod:`bench.environment` - GPU, driver, versions and git commit of a run;
* :mod:`bench.report` - terminal table, CSV, JSON and the headline line;
* :mod:`bench.plots` - PNG plots;
* :mod:`bench.runner` - the sweep loop tying them together; :mod:`bench.cli` - the command line.
"""
