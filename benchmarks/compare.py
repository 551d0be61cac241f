"""Regression check: compare a new benchmark run with a saved baseline run, ratio by ratio.

    python -m benchmarks.compare benchmarks/results.json new.json [--tolerance 0.05]

Only ratios are compared (``t_candidate / t_baseline`` measured in the same rounds), never
absolute times, so two runs on differently loaded machines stay comparable. A ratio got worse
by more than the noise when the new median lies above every per-round ratio of the baseline
run (its max) *and* the old median lies below every per-round ratio of the new run (its min):
the two runs' min-max ranges do not contain each other's medians. ``--tolerance`` additionally
requires the median to have grown by that fraction. Exit status 1 when anything regressed.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .report import load


@dataclass(frozen=True)
class Change:
    benchmark: str
    baseline: str  # what the candidate was divided by (e.g. "clone", "dense F.linear")
    old: dict | None
    new: dict | None
    verdict: str  # "worse", "better", "within noise", "new", "gone"

    @property
    def change(self) -> float | None:
        return self.new["median"] / self.old["median"] - 1 if self.old and self.new else None


def ratios(data: dict) -> dict[tuple[str, str], dict]:
    """(benchmark name, baseline name) -> ratio statistics, for every paired benchmark in a run."""
    found = {}
    for bench in data.get("benchmarks", []):
        for baseline, stats in bench.get("extra_info", {}).get("ratios", {}).items():
            found[(bench["name"], baseline)] = stats
    return found


def verdict(old: dict, new: dict, tolerance: float = 0.0) -> str:
    """Ratios are times relative to a baseline: larger is worse."""
    if new["median"] > old["max"] and old["median"] < new["min"] and new["median"] > old["median"] * (1 + tolerance):
        return "worse"
    if new["median"] < old["min"] and old["median"] > new["max"] and new["median"] < old["median"] * (1 - tolerance):
        return "better"
    return "within noise"


def compare(old_data: dict, new_data: dict, tolerance: float = 0.0) -> list[Change]:
    old, new = ratios(old_data), ratios(new_data)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key not in new:
            changes.append(Change(*key, old[key], None, "gone"))
        elif key not in old:
            changes.append(Change(*key, None, new[key], "new"))
        else:
            changes.append(Change(*key, old[key], new[key], verdict(old[key], new[key], tolerance)))
    return changes


MACHINE_KEYS = ("cpu_model", "logical_cpus", "torch_threads", "gpu", "torch", "triton", "profile")


def machine_differences(old_data: dict, new_data: dict) -> list[str]:
    """What differs between the two runs' machines: ratios move with threads, CPU and versions too."""
    old, new = (d.get("machine_info", {}).get("nxm", {}) for d in (old_data, new_data))
    differences = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
                   for key in MACHINE_KEYS if old.get(key) != new.get(key)]
    # Competing processes shift ratios beyond one run's spread (small multithreaded ops suffer most).
    old_load, new_load = (max((v for v in d.get("load_average") or [] if v is not None), default=None)
                          for d in (old, new))
    if old_load is not None and new_load is not None and abs(old_load - new_load) > 1:
        differences.append(f"peak load average: {old_load:.1f} -> {new_load:.1f}")
    return differences


def _fmt(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['median']:.3g} [{stats['min']:.3g}-{stats['max']:.3g}]"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="flag ratios that got worse than a baseline run by more than the noise")
    parser.add_argument("baseline_json", help="the saved run to compare against (e.g. benchmarks/results.json)")
    parser.add_argument("new_json", help="the new run")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="also require the median ratio to change by this fraction (default 0: noise only)")
    parser.add_argument("--all", action="store_true", help="list every ratio, not only the changed ones")
    args = parser.parse_args(argv)
    old_data, new_data = load(args.baseline_json), load(args.new_json)
    for difference in machine_differences(old_data, new_data):
        print(f"warning: the runs differ in {difference}; a change may come from that, not from the code")
    changes = compare(old_data, new_data, args.tolerance)
    shown = [c for c in changes if args.all or c.verdict in ("worse", "better")]
    print("| benchmark | relative to | old ratio | new ratio | change | verdict |")
    print("|---|---|---|---|---|---|")
    for c in shown:
        change = f"{c.change:+.0%}" if c.change is not None else "-"
        print(f"| {c.benchmark} | {c.baseline} | {_fmt(c.old)} | {_fmt(c.new)} | {change} | {c.verdict} |")
    counts = {v: sum(c.verdict == v for c in changes) for v in ("worse", "better", "within noise", "new", "gone")}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items())
    print(f"\n{summary} (ratios are t_candidate / t_baseline: lower is better)")
    return 1 if counts["worse"] else 0


if __name__ == "__main__":
    sys.exit(main())
