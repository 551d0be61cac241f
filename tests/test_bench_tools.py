"""The benchmark tooling on synthetic data: paired ratios, interleaving, report, regression check.

No timing is asserted: the measured functions only record the order they ran in.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is a top-level package

import torch  # noqa: E402

from benchmarks import compare, harness, report, run  # noqa: E402


def stats(median, low, high, rounds=5):
    return {"median": median, "min": low, "max": high, "rounds": rounds}


# ---------------------------------------------------------------- harness


def test_ratio_stats_hand_computed():
    # per-round ratios 2/1, 4/2, 9/3 = 2, 2, 3
    assert harness.ratio_stats([2.0, 4.0, 9.0], [1.0, 2.0, 3.0]) == stats(2.0, 2.0, 3.0, rounds=3)


def test_ratio_stats_pairs_rounds_not_sorted_samples():
    # Sorted samples would give ratios 1, 1; pairing round by round gives 0.5 and 2.
    assert harness.ratio_stats([1.0, 4.0], [2.0, 2.0]) == stats(1.25, 0.5, 2.0, rounds=2)


@pytest.mark.parametrize("candidate, baseline", [([1.0], [1.0, 2.0]), ([], [])])
def test_ratio_stats_needs_paired_samples(candidate, baseline):
    with pytest.raises(ValueError, match="paired samples"):
        harness.ratio_stats(candidate, baseline)


@pytest.mark.parametrize("round_seconds, expected", [(10.0, 5), (1e-6, 25), (0.1, 10)])
def test_rounds_are_clamped_to_the_profile(round_seconds, expected):
    assert harness.rounds_for(harness.QUICK, round_seconds) == expected


class FakeBenchmark:
    """pytest-benchmark's pedantic contract: setup, then target, once per round."""

    def __init__(self):
        self.extra_info = {}

    def pedantic(self, target, setup, rounds):
        for _ in range(rounds):
            setup()
            target()


def test_measure_interleaves_and_records_every_round():
    log = []
    bench = FakeBenchmark()
    ratios = harness.measure(
        bench, harness.QUICK, torch.device("cpu"), lambda: log.append("B"),
        {"base1": lambda: log.append("A1"), "base2": lambda: log.append("A2")}, kind="test", op="noop",
    )
    info = bench.extra_info
    rounds = len(info["samples_s"]["candidate"])
    assert harness.QUICK.min_rounds <= rounds <= harness.QUICK.max_rounds
    assert set(ratios) == {"base1", "base2"} and info["ratios"] == ratios
    assert all(len(s) == rounds for s in info["samples_s"].values())
    assert info["kind"] == "test" and info["device"] == "cpu" and info["profile"] == "quick"
    # After warm-up, every round runs each baseline's sample and then the candidate's.
    calls = info["calls_per_sample"]
    one_round = ["A1"] * calls["base1"] + ["A2"] * calls["base2"] + ["B"] * calls["candidate"]
    timed = log[len(log) - rounds * len(one_round):]
    assert timed == one_round * rounds


# ---------------------------------------------------------------- report


def bench_entry(name, kind, samples, **info):
    ratios = {who: harness.ratio_stats(samples["candidate"], s) for who, s in samples.items() if who != "candidate"}
    extra = dict(kind=kind, device="cpu", samples_s=samples, ratios=ratios, baselines_unavailable={}, **info)
    return {"name": name, "extra_info": extra, "stats": {"median": samples["candidate"][0]}}


def synthetic_run(sparse_scale=1.0):
    convert = bench_entry(
        "test_convert[cpu-compress-cutlass-x-float16-native]", "convert",
        {"candidate": [2e-3, 2.2e-3, 2.1e-3], "clone": [1e-3, 1e-3, 1e-3],
         "torch cutlass converter": [40e-3, 44e-3, 42e-3]},
        op="compress", layout="cutlass", pattern="2:4", dtype="float16", model="decoder-8b.attn-qo",
        shape=[4096, 4096], backend="native", bytes=32 * 2**20,
    )
    matmuls = [
        bench_entry(
            f"test_sparse_mm[cpu-M{m}-reference]", "sparse_mm",
            {"candidate": [sparse_scale * 4e-3] * 3, "dense F.linear": [1e-3, 2e-3, 1e-3]},
            op="sparse_mm", layout="packed", pattern="2:4", dtype="float16", model="bert-base.ffn-up",
            shape=[3072, 768], m=m, backend="reference", bytes=2**20,
        )
        for m in (1, 64)
    ]
    one = dict(layers=1, dense_bytes=4e8, sparse_bytes=2.4e8, rss_dense_bytes=1e9, rss_peak_bytes=2.3e9,
               rss_after_bytes=1.6e9, seconds=3.0, compress_backend="reference")
    two = dict(one, layers=2, dense_bytes=8e8, sparse_bytes=4.8e8, rss_dense_bytes=1.4e9, rss_peak_bytes=3.0e9)
    memory = {"name": "test_conversion_memory", "stats": {}, "extra_info": dict(
        kind="memory", device="cpu", one_layer=one, stack=two, swap_stack=dict(two, rss_peak_bytes=1.6e9),
        streams=False, extra_one_layer_bytes=1.3e9,
        extra_stack_bytes=1.6e9, slack_bytes=2**27)}
    machine = {"nxm": {"cpu_model": "Test CPU 9000", "logical_cpus": 2, "torch_threads": 2, "torch": "2.x",
                       "triton": "3.x", "nxm_kernels": "0.1.0", "git": "abc123", "gpu": None, "cuda": None,
                       "backends": {"native": None, "triton": "no GPU"}, "profile": "quick",
                       "load_average": [1.0, 2.5]}}
    return {"machine_info": machine, "datetime": "2026-01-01T00:00:00",
            "benchmarks": [convert, *matmuls, memory, {"name": "not_ours", "extra_info": {}}]}


def test_speedup_inverts_the_time_ratio():
    assert report.speedup(stats(0.5, 0.25, 1.0)) == stats(2.0, 1.0, 4.0)


def test_report_tables_machine_and_verdicts(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(synthetic_run()))
    markdown = report.write(path, tmp_path, command="make bench").read_text()
    assert "Test CPU 9000, 2 logical CPUs" in markdown and "git abc123" in markdown
    assert "| load average (1 min) at start / end | 1.0 / 2.5 on 2 CPUs" in markdown
    assert "- `triton`: unavailable: no GPU" in markdown
    # compress: median per-round ratio to clone 2.1 [2-2.2]; 20x faster than torch's converter
    assert "| compress cutlass | 2:4 | float16 | decoder-8b.attn-qo 4096x4096 | native | 2.1 ms |" in markdown
    assert "2.1x [2-2.2] | 20x [20-20] |" in markdown
    # sparse_mm: dense/sparse per round = 0.25, 0.5, 0.25
    row = "| float16 | packed 2:4 | bert-base.ffn-up 3072x768 | 1 | reference | 4 ms | 1 ms | 0.25x [0.25-0.5] |"
    assert row in markdown
    assert "| cpu | native | 2.1x [2-2.2] | 20x [20-20] |" in markdown  # headline: conversion
    assert "does **not** stream" in markdown and "**does not stream**" in markdown
    assert "the swap loop converted the same stack within 191 MiB" in markdown
    assert "| swap one Linear at a time, 2 layers | 763 MiB | 458 MiB | 1,335 MiB | 1,526 MiB | 191 MiB |" in markdown
    assert "Not run: this machine has no GPU" in markdown
    for plot in ("plots/convert-cpu.png", "plots/sparse_mm-cpu.png"):
        assert f"]({plot})" in markdown and (tmp_path / plot).stat().st_size > 0


# ---------------------------------------------------------------- regression check


@pytest.mark.parametrize(
    "old, new, expected",
    [
        (stats(1.0, 0.9, 1.1), stats(1.5, 1.4, 1.6), "worse"),  # ranges apart, new higher
        (stats(1.0, 0.9, 1.1), stats(0.5, 0.4, 0.6), "better"),
        (stats(1.0, 0.9, 1.1), stats(1.05, 0.95, 1.2), "within noise"),  # overlapping
        (stats(1.0, 0.5, 2.0), stats(1.8, 1.2, 2.4), "within noise"),  # noisy baseline: 1.8 < its max 2.0
        (stats(1.0, 0.9, 1.2), stats(1.3, 0.95, 1.5), "within noise"),  # old median inside the new range
    ],
)
def test_verdict_against_the_measured_spread(old, new, expected):
    assert compare.verdict(old, new) == expected


def test_tolerance_also_requires_a_relative_change():
    old, new = stats(1.0, 0.99, 1.01), stats(1.03, 1.02, 1.04)
    assert compare.verdict(old, new) == "worse"
    assert compare.verdict(old, new, tolerance=0.05) == "within noise"


def test_compare_runs_and_exit_status(tmp_path, capsys):
    old, slower = synthetic_run(), synthetic_run(sparse_scale=3.0)
    slower["benchmarks"] = slower["benchmarks"][1:]  # the convert case is gone in the new run
    changes = {(c.benchmark, c.baseline): c.verdict for c in compare.compare(old, slower)}
    assert changes[("test_sparse_mm[cpu-M1-reference]", "dense F.linear")] == "worse"
    assert changes[("test_convert[cpu-compress-cutlass-x-float16-native]", "clone")] == "gone"
    assert compare.compare(old, old) and all(c.verdict == "within noise" for c in compare.compare(old, old))

    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(slower))
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1
    assert "| test_sparse_mm[cpu-M1-reference] | dense F.linear |" in capsys.readouterr().out
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0
    assert "warning" not in capsys.readouterr().out


def test_compare_warns_when_the_machines_differ():
    old, new = synthetic_run(), synthetic_run()
    new["machine_info"] = json.loads(json.dumps(old["machine_info"]))
    new["machine_info"]["nxm"]["torch_threads"] = 1
    assert compare.machine_differences(old, new) == ["torch_threads: 2 -> 1"]
    new["machine_info"]["nxm"]["load_average"] = [1.0, 4.0]
    assert compare.machine_differences(old, new)[-1] == "peak load average: 2.5 -> 4.0"


# ---------------------------------------------------------------- the one command


def test_run_command_passes_the_profile_and_gpu_selection(tmp_path):
    command = run.pytest_command(tmp_path / "r.json", full=True, gpu_only=True, extra=["-k", "sparse_mm"])
    assert command[1:4] == ["-m", "pytest", str(run.ROOT / "benchmarks")]
    assert f"--benchmark-json={tmp_path / 'r.json'}" in command and "--bench-full" in command
    assert command[-4:] == ["-m", "gpu", "-k", "sparse_mm"]
    assert "--bench-full" not in run.pytest_command(tmp_path / "r.json", False, False, [])


def test_run_refuses_to_overwrite_its_baseline(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run.main(["--out", str(tmp_path), "--baseline", str(tmp_path / "results.json")])
    assert "is where this run writes its results" in capsys.readouterr().err
