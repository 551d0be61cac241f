"""Paired timing: a candidate and its baselines measured interleaved in one process.

On a shared, noisy machine absolute times drift by tens of percent between minutes, but two
functions timed back to back see the same conditions. So every round runs each baseline and
then the candidate (A, B, A, B, ...), and the figure we quote is the per-round ratio
``t_candidate / t_baseline``: its median, with the min-max over rounds as the noise.

pytest-benchmark stays the harness: it times the candidate (its JSON holds those statistics),
and ``benchmark.extra_info`` holds every per-call sample of candidate and baselines plus the
ratio statistics, which ``report.py`` and ``compare.py`` read.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# A sample shorter than this repeats the call: timer and synchronisation overhead stay small, and
# a sample spans several scheduler time slices, so one preemption does not decide it.
MIN_SAMPLE_S = 0.01


@dataclass(frozen=True)
class Profile:
    """How long to measure: rounds = seconds_per_test / (time of one round), clamped."""

    name: str
    seconds_per_test: float
    min_rounds: int
    max_rounds: int
    full_grid: bool  # every shape x dtype x M, or the representative subset


QUICK = Profile("quick", seconds_per_test=1.0, min_rounds=5, max_rounds=25, full_grid=False)
FULL = Profile("full", seconds_per_test=8.0, min_rounds=10, max_rounds=200, full_grid=True)


def rounds_for(profile: Profile, round_seconds: float) -> int:
    wanted = math.ceil(profile.seconds_per_test / max(round_seconds, 1e-9))
    return max(profile.min_rounds, min(profile.max_rounds, wanted))


def ratio_stats(candidate: list[float], baseline: list[float]) -> dict:
    """Statistics of the per-round ratios candidate/baseline (< 1: the candidate is faster)."""
    if len(candidate) != len(baseline) or not candidate:
        raise ValueError(f"need paired samples, got {len(candidate)} candidate and {len(baseline)} baseline")
    ratios = [c / b for c, b in zip(candidate, baseline)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _time_once(fn: Callable, sync: Callable) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _recorder(fn: Callable, calls: int, sync: Callable, samples: list) -> Callable[[], None]:
    def timed():
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls)

    return timed


def measure(benchmark, profile: Profile, device: torch.device, candidate: Callable,
            baselines: dict[str, Callable], **info) -> dict:
    """Time ``candidate`` against each baseline, interleaved; store everything in extra_info.

    ``info`` describes the case (op, shape, dtype, backend, bytes, ...) for the report.
    Returns the ratio statistics per baseline.
    """
    sync = synchronizer(device)
    functions = {"candidate": candidate, **baselines}
    # Warm-up (lazy initialisation, caches, compilation, autotuning), then one more call; the
    # faster of the two sizes the rounds (a single call may have been preempted).
    one_call = {name: min(_time_once(fn, sync), _time_once(fn, sync)) for name, fn in functions.items()}
    calls = {name: max(1, math.ceil(MIN_SAMPLE_S / max(t, 1e-9))) for name, t in one_call.items()}
    rounds = rounds_for(profile, sum(calls[name] * one_call[name] for name in functions))

    samples = {name: [] for name in functions}
    timed = {name: _recorder(fn, calls[name], sync, samples[name]) for name, fn in functions.items()}

    def run_baselines():
        for name in baselines:
            timed[name]()

    benchmark.pedantic(timed["candidate"], setup=run_baselines, rounds=rounds)
    ratios = {name: ratio_stats(samples["candidate"], samples[name]) for name in baselines}
    benchmark.extra_info.update(
        info, device=str(device), profile=profile.name, calls_per_sample=calls, samples_s=samples, ratios=ratios
    )
    return ratios
