"""Benchmarks of the pipeline: ``vkd bench {distill,search,export,index,step,serve,all}``.

All measurement code lives here, one module per measured stage (DESIGN.md, "Layout": the
stage packages hold the product only). Each module has a ``run_*_benchmark`` function
returning a ``report.BenchResult`` and the measurement it reports: ``step.bench_distill_step``
(seconds per training step), ``index.measure_indexing`` (indexer vs encoder alone),
``search.measure_latency`` (per-stage latency of the full search per student backend), and
``distill``, ``export``, ``serve``. ``report`` writes a result as JSON (with the machine it
ran on), Markdown and PNG; ``timing`` holds the measurement primitives; ``synthetic`` makes
the search benchmark's vector corpora; ``source`` finds the models and data (the demo's
output, or paths given). Real-size costs are measured on random models at the real
architectures' shapes (``vkd.models.random``). ``benchmarks/run_all.py`` runs ``vkd bench all``
and publishes its results, so every published figure has one code path.
"""
