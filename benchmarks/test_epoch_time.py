"""The benchmark as a pytest run: time every registered method (see
:mod:`benchmarks.epoch_time`) and check each counted cost against the
registry's cost model."""
from __future__ import annotations

from advtrain.methods import METHODS, Passes

from .epoch_time import BASELINE, run


def test_epoch_time(bench_settings, record_results):
    results = run(**bench_settings)
    record_results(results)
    for row in results.rows:
        assert all(t > 0 for t in row.times)
        if row.passes is not None:
            expected = Passes(11, 0, 11) if row.name == BASELINE else METHODS[row.name].passes(batch_size=results.size.batch_size, examples=results.size.examples)
            assert row.passes == expected, f"{row.name}: counted {row.passes}, the registry says {expected}"
