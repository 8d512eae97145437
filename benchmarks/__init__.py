"""advtrain's epoch-time benchmark (not part of the default test run):
``python -m pytest benchmarks/ --bench-size cpu``; see ``benchmarks/README.md``."""
