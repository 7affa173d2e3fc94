"""The random-model fuzzer (``depgraph.fuzz``): its property on a fixed range of seeds, and
the generator and minimizer themselves.

``benchmarks/fuzz.py`` runs the same property on thousands of seeds; here a fixed slice
runs on every commit, so a regression in a rule, the algebra, simulate or shrink that any
of these models exercises fails the suite with its seed.
"""

from __future__ import annotations

import pytest
import torch

from depgraph import fuzz

SEEDS = range(0, 240)
CHUNK = 20


@pytest.mark.parametrize("first", range(SEEDS.start, SEEDS.stop, CHUNK))
def test_random_models_hold_the_property(first: int) -> None:
    failures = {}
    for seed in range(first, first + CHUNK):
        status, failure = fuzz.outcome(fuzz.generate(seed))
        if status != "passed":
            failures[seed] = failure.signature if failure else status
    assert not failures, f"seeds that broke the property: {failures}"


def test_a_program_rebuilds_bit_for_bit() -> None:
    program = fuzz.generate(7)
    assert fuzz.generate(7) == program
    one, two = fuzz.build(program), fuzz.build(program)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    torch.testing.assert_close(one(fuzz.example(program)), two(fuzz.example(program)))


def test_the_generator_covers_every_kind_and_both_tracers() -> None:
    programs = [fuzz.generate(seed) for seed in range(400)]
    used = {op.kind for p in programs for op in p.ops}
    assert used == set(fuzz.KINDS)
    assert {p.tracer for p in programs} == {"fx", "export"}


def test_the_minimizer_keeps_only_the_ops_a_failure_needs() -> None:
    def has_group_norm(program: fuzz.Program) -> fuzz.Failure | None:
        return fuzz.Failure("test", "a group norm") if any(op.kind == "gn" for op in program.ops) else None

    program = next(p for p in map(fuzz.generate, range(1000)) if len(p.ops) >= 6 and has_group_norm(p))
    smaller = fuzz.minimize(program, has_group_norm(program), has_group_norm)
    assert [op.kind for op in smaller.ops if op.kind == "gn"] == ["gn"]
    assert len(smaller.ops) < len(program.ops)
    fuzz.build(smaller)(fuzz.example(smaller))  # still a valid model
    assert "gn(" in fuzz.describe(smaller)
