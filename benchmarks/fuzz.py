"""Fuzz depgraph with random models: ``python benchmarks/fuzz.py --seeds 0:10000``.

Each seed gives a random model composed of ordinary PyTorch idioms (``depgraph.fuzz``);
each model is analyzed, a random plan is applied by ``prune`` and ``simulate``, and the two
are compared at the example's batch size and another one, in eval and train mode (a
backward pass runs), one group is pruned alone, and the caller's model must be unchanged.
Writes ``benchmarks/results/fuzz.md``: the pass rate, the refusals (models analyze
declined with a clear error), and every failure signature with its first seed and that
seed's model minimized. ``--jobs N`` runs N worker processes; ``--no-minimize`` skips the
minimizer. A case that runs over ``--timeout`` seconds counts as a failure.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import platform
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from depgraph import fuzz

RESULTS = Path(__file__).resolve().parent / "results"


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def run_seed(seed: int, timeout: int) -> tuple[int, str, str | None, float, str]:
    """(seed, status, failure signature, seconds, tracer) of one case."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    program = fuzz.generate(seed)
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        status, failure = fuzz.outcome(program)
        signature = failure.signature if failure else None
    except _Timeout:
        status, signature = "failed", f"timeout: over {timeout} s"
    except Exception as exc:  # noqa: BLE001 -- the harness itself must not stop the sweep
        status, signature = "failed", f"harness: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        signal.alarm(0)
    return seed, status, signature, time.perf_counter() - start, program.tracer


def _run(args: tuple[int, int]) -> tuple[int, str, str | None, float, str]:
    return run_seed(*args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0:10000", help="a range A:B of seeds")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=120)
    parser.add_argument("--no-minimize", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "fuzz.md"))
    args = parser.parse_args(argv)
    first, last = (int(v) for v in args.seeds.split(":"))
    seeds = range(first, last)
    start = time.perf_counter()
    counts: collections.Counter[str] = collections.Counter()
    tracers: collections.Counter[str] = collections.Counter()
    failures: dict[str, list[int]] = {}
    refusals: dict[str, list[int]] = {}
    seconds: list[float] = []
    work = [(s, args.timeout) for s in seeds]
    with multiprocessing.get_context("fork").Pool(args.jobs, maxtasksperchild=200) as pool:
        for i, (seed, status, signature, took, tracer) in enumerate(pool.imap_unordered(_run, work, chunksize=4), 1):
            counts[status] += 1
            tracers[tracer] += 1
            seconds.append(took)
            if signature is not None:
                (failures if status == "failed" else refusals).setdefault(signature, []).append(seed)
                if status == "failed":
                    print(f"seed {seed} failed: {signature}", file=sys.stderr, flush=True)
            if i % 100 == 0 or i == len(work):
                print(f"{i}/{len(work)} cases, {counts['failed']} failed, {time.perf_counter() - start:.0f} s",
                      file=sys.stderr, flush=True)
    minimized = {} if args.no_minimize else {sig: _minimized(min(s)) for sig, s in failures.items()}
    text = _report(args.seeds, counts, tracers, failures, minimized, time.perf_counter() - start, seconds)
    text += "".join(f"\n- {len(s)} x `{sig}` (first seed {min(s)})" for sig, s in sorted(refusals.items()))
    Path(args.out).write_text(text)
    print(text)


def _minimized(seed: int) -> str:
    program = fuzz.generate(seed)
    failure = fuzz.check(program)
    if failure is None:
        return "(passes when run again: a failure that depends on the process state)"
    return fuzz.describe(fuzz.minimize(program, failure))


def _report(seeds: str, counts: collections.Counter[str], tracers: collections.Counter[str],
            failures: dict[str, list[int]], minimized: dict[str, str], wall: float, seconds: list[float]) -> str:
    total = sum(counts.values())
    lines = [
        "# Fuzz results",
        "",
        f"`python benchmarks/fuzz.py --seeds {seeds}` on {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {wall / 60:.1f} minutes "
        f"(median {sorted(seconds)[len(seconds) // 2]:.2f} s a case).",
        "",
        "| cases | passed | refused by analyze | failed | fx | export |",
        "|---|---|---|---|---|---|",
        f"| {total} | {counts['passed']} | {counts['refused']} | {counts['failed']} | {tracers['fx']} | "
        f"{tracers['export']} |",
        "",
    ]
    if not failures:
        lines.append("No failures.\n")
    for signature, seeds_ in sorted(failures.items(), key=lambda kv: -len(kv[1])):
        lines += [f"## {len(seeds_)} x `{signature}`", "", f"Seeds: {', '.join(map(str, sorted(seeds_)[:20]))}", ""]
        if signature in minimized:
            lines += ["```", minimized[signature], "```", ""]
    lines.append("Refusals (analyze declined the model with a clear error):" if counts["refused"] else "No refusals.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
