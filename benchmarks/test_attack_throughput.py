"""Throughput (images per second) of the evaluation attacks: PGD-20 and
APGD-CE with the protocol's 100 iterations (``--bench-size smoke`` uses 5)."""

from __future__ import annotations

import pytest

from .harness import AttackRunner, attack_factories
from .report import AttackResult


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "attack_name" in metafunc.fixturenames:
        from .conftest import _SIZE_KEY

        names = list(attack_factories(metafunc.config.stash[_SIZE_KEY]))
        metafunc.parametrize("attack_name", names, ids=[n.split(" ")[0] for n in names])


def test_attack_throughput(benchmark, attack_name, bench_size, bench_data, bench_results):
    images, labels = bench_data
    attack = attack_factories(bench_size)[attack_name]()
    runner = AttackRunner(attack_name, attack, bench_size, images, labels)
    passes = runner.warmup()
    benchmark.group = f"attack ({bench_size.name})"
    benchmark.extra_info.update(passes)
    benchmark.pedantic(runner.run, rounds=bench_size.attack_rounds, iterations=1, warmup_rounds=0)
    result = AttackResult(attack_name, list(runner.times), runner.images, passes)
    benchmark.extra_info["images_per_s"] = result.images_per_s
    bench_results.add_attack(result)
    assert passes["backward_full"] == 0  # attacks never compute weight gradients
    assert passes["backward_input_only"] >= 1
