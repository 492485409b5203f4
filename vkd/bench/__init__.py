"""Benchmarks of the pipeline: ``vkd bench {distill,search,export,index,step,all}``.

One module per benchmark (``distill``, ``search``, ``export``, ``index``, ``step``), each
with a ``run_*_benchmark`` function returning a ``report.BenchResult``; ``report`` writes
it as JSON (with the machine it ran on), Markdown and PNG; ``timing`` holds the
measurement primitives; ``synthetic`` makes the search benchmark's vector corpora;
``source`` finds the models and data (the demo's output, or paths given). The scripts in
``benchmarks/`` call these same functions, so every published figure has one code path.
"""
