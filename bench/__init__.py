"""Benchmark suite of flashmemory-triton: ``python -m bench --help``.

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
