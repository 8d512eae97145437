"""advtrain's speed benchmarks (not part of the default test run).

Run them explicitly, e.g.::

    python -m pytest benchmarks/ --bench-size cpu --bench-report docs/benchmarks.md

See ``benchmarks/README.md``. The machinery (sizes, method factory, pass
counter, memory meter, reference PGD-10 loop, Markdown report) lives in
:mod:`benchmarks.harness`, :mod:`benchmarks.baseline` and
:mod:`benchmarks.report`, so the normal test suite can smoke-test it
(``tests/test_benchmarks_smoke.py``).
"""
