"""`nxm gpu-check` on CPU: its exit code without a GPU, the --dry-run plan, the make target, each
step's decisions with the processes it would start replaced, the cuSPARSELt algorithm check and
its exclusions with a fake runner, and the summary writers on a made-up result."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import torch

from nxm_kernels import cli, gpu_check
from nxm_kernels.backends import cusparselt
from nxm_kernels.gpu_check import algorithms, bench, build, gpu_tests, outcome, plan, processes, summary

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- without a GPU, and the plan


def test_without_a_gpu_it_says_so_and_exits_3(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hides any GPU from the step's process
    assert cli.main(["gpu-check", "--out", str(tmp_path)]) == outcome.EXIT_NO_GPU == 3
    out = capsys.readouterr().out
    assert "no CUDA GPU is visible" in out and "exit 3" in out
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["exit_code"] == 3 and result["environment"]["torch"] == torch.__version__
    statuses = {s["name"]: s["status"] for s in result["steps"]}
    assert statuses == {"env": "failed", "build": "not run", "tests": "not run", "algorithms": "not run",
                        "bench": "not run"}
    assert "**Exit code 3: no CUDA GPU is visible.**" in (tmp_path / "summary.md").read_text()


def test_dry_run_prints_the_plan_and_runs_nothing(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("--dry-run started a process")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)
    assert gpu_check.main(["--dry-run", "--python", "/opt/venv/bin/python"]) == 0
    printed = capsys.readouterr().out
    for name, budget in plan.BUDGETS.items():
        assert f"{name}".ljust(10) + f" {budget:>3} s" in printed
    assert "/opt/venv/bin/python setup.py build_ext --inplace" in printed and "TORCH_CUDA_ARCH_LIST" in printed
    assert "TRITON_INTERPRET=0 pytest -m gpu" in printed and "tests/test_cusparselt_gpu.py" in printed
    assert "M = 1, 16, 128, 4096, 16384" in printed and "decoder-8b.mlp-up 14336x4096" in printed
    assert "float16, bfloat16, int8, float8_e4m3fn, float32" in printed and "256x512 M=64" in printed
    w4a16 = plan.w4a16_blocker()  # the low-bit issue may have landed in this checkout, or not
    assert "W4A16 2:4 against fp16 at M = 1, 4, 16: " + ("int4 2:4 weights" if w4a16 is None else f"skipped: {w4a16}") \
        in printed
    assert "480 s" in printed and "3 no CUDA GPU is visible" in printed


def test_the_budgets_fit_eight_minutes_and_help_says_so(capsys):
    assert sum(plan.BUDGETS.values()) + plan.SUMMARY_S <= plan.TIME_LIMIT_S == 8 * 60
    assert gpu_check.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "within 8 minutes on one H100/H200-class GPU, build included" in text
    assert "--dry-run" in text and "3  no CUDA GPU is visible" in text and "--worker" not in text


def test_readme_documents_the_budgets_and_exit_codes():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## On a GPU server: run this first"):]
    budgets = ", ".join(f"{name} {seconds} s" for name, seconds in plan.BUDGETS.items())
    assert budgets in " ".join(section.split())
    for code, meaning in outcome.EXIT_MEANING.items():
        assert f"{code} {meaning.split(' (')[0]}" in " ".join(section.split())


def test_bad_usage_exits_2(capsys):
    assert cli.main(["gpu-check", "--skip", "env"]) == outcome.EXIT_USAGE
    assert "invalid choice" in capsys.readouterr().err


def test_nxm_help_lists_gpu_check(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "gpu-check" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_uses_the_given_python_and_installs_nothing():
    # Run as CI does, from inside `make test`: the outer make's variables must not leak in
    # ("make[1]: Entering directory" lines).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PYTHON=python3", "GPU_CHECK_ARGS=--out x"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "python3 nxm_kernels/gpu_check --out x"
    assert ".venv" not in out and "pip" not in out and "torch" not in out


def test_the_check_covers_the_split_k_values_tune_tries():
    assert plan.SPLIT_K == cusparselt.TUNE_SPLIT_K


def test_bench_shapes_are_the_benchmark_suites():
    from benchmarks import cases

    for name, shape in plan.BENCH_SHAPES.items():
        assert cases.MODEL_SHAPES[name] == shape


def test_gpu_check_loads_the_guards_without_importing_the_package():
    """gpu-check reads them by path, before the extension is built."""
    code = ("import runpy, sys; gpu_check = runpy.run_path('nxm_kernels/gpu_check')['load_standalone'](); "
            "m = gpu_check.environment.load_compat(); "
            "print(m.MIN_TORCH == (2, 11), m.problems() == [], 'nxm_kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split() == ["True", "True", "False"]


def test_gpu_test_files_are_those_with_gpu_tests():
    files = plan.gpu_test_files()
    assert "tests/test_cusparselt_gpu.py" in files and "tests/test_triton_gpu.py" in files
    assert "tests/test_gpu_check.py" not in files and "tests/test_pattern.py" not in files


# ---------------------------------------------------------------- the steps, with their processes replaced


GPU_ENV = {"gpus": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8}],
           "torch": "2.11.0+cu130", "torch_cuda": "13.0", "cuda_home": "/usr/local/cuda-13.0"}


def test_build_targets_only_the_local_architecture(tmp_path, monkeypatch):
    started = {}

    def fake_run_process(argv, log_path, budget_s, env=None):
        started.update(argv=argv, env=env, budget=budget_s)
        return 0, 12.0

    loaded = {"build": {"torch": "2.11.0+cu130", "cuda": "13.0", "cuda_archs": "9.0"}, "why": None,
              "cuda_kernels": True, "cusparselt": None}
    monkeypatch.setattr(build, "run_process", fake_run_process)
    monkeypatch.setattr(build.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 0, json.dumps(loaded) + "\n", ""))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("NXM_SKIP_CUDA_BUILD", "1")
    step = outcome.StepResult("build", 150)
    build.step_build("/srv/python", tmp_path, step, GPU_ENV, "inplace")
    assert started["argv"] == ["/srv/python", "setup.py", "build_ext", "--inplace"]
    env = started["env"]
    assert env["NXM_CUDA_ARCHS"] == env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    assert env["CUDA_HOME"] == "/usr/local/cuda-13.0" and env["NXM_FORCE_CUDA"] == "1"
    assert "NXM_SKIP_CUDA_BUILD" not in env and started["budget"] == 150
    assert step.status == "passed" and "sm 9.0" in step.summary
    editable = plan.build_command("/srv/python", "editable")
    assert editable == ["/srv/python", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]


def test_a_failed_build_stops_the_run_with_exit_4(tmp_path, monkeypatch):
    (tmp_path / "build.log").write_text("error: csrc/cpu_ops.cpp:12: no member named 'foo'\n")
    monkeypatch.setattr(build, "run_process", lambda *a, **k: (1, 30.0))
    step = outcome.StepResult("build", 150)
    build.step_build("python", tmp_path, step, GPU_ENV, "inplace")
    assert step.status == "failed" and "no member named 'foo'" in step.summary
    env = outcome.StepResult("env", 40, "passed", detail={"gpus": GPU_ENV["gpus"]})
    assert outcome.exit_code([env, step]) == outcome.EXIT_BUILD


def test_build_without_nvcc_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    step = outcome.StepResult("build", 150)
    build.step_build("python", tmp_path, step, {**GPU_ENV, "cuda_home": None}, "inplace")
    assert step.status == "failed" and "set CUDA_HOME" in step.summary


PYTEST_LOG = """\
tests/test_cusparselt_gpu.py::test_sparse_mm_matches_the_reference[False-1-dtype0-2:4] PASSED [  1%]
tests/test_cusparselt_gpu.py::test_opcheck FAILED                                     [  2%]
tests/test_native.py::test_cuda_kernels[float16] SKIPPED (float8 needs sm_89)          [  3%]
tests/test_triton_gpu.py::test_sparse_mm_autotuned[2:4-1-dtype0] ERROR                  [  4%]
=========================== short test summary info ============================
FAILED tests/test_cusparselt_gpu.py::test_opcheck - AssertionError: fake kernel shape
ERROR tests/test_triton_gpu.py::test_sparse_mm_autotuned[2:4-1-dtype0] - RuntimeError: out of resources
============ 1 failed, 1 passed, 1 skipped, 1 error in 12.34s =============
"""


def test_parse_pytest_counts_and_names_the_failures():
    parsed = gpu_tests.parse_pytest(PYTEST_LOG)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert parsed["failed"] == {"tests/test_cusparselt_gpu.py::test_opcheck": "AssertionError: fake kernel shape",
                                "tests/test_triton_gpu.py::test_sparse_mm_autotuned[2:4-1-dtype0]":
                                    "RuntimeError: out of resources"}
    assert parsed["final"] == "1 failed, 1 passed, 1 skipped, 1 error in 12.34s"


def test_tests_step_runs_the_gpu_tests_with_compiled_triton(tmp_path, monkeypatch):
    started = {}

    def fake_run_process(argv, log_path, budget_s, env=None):
        started.update(argv=argv, env=env)
        log_path.write_text(PYTEST_LOG)
        return 1, 40.0

    monkeypatch.setattr(gpu_tests, "run_process", fake_run_process)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NXM_BACKEND", "reference")
    step = outcome.StepResult("tests", 165)
    gpu_tests.step_tests("python", tmp_path, step)
    argv, env = started["argv"], started["env"]
    assert argv[:5] == ["python", "-m", "pytest", "-m", "gpu"] and "tests/test_triton_gpu.py" in argv
    assert env["TRITON_INTERPRET"] == "0" and "NXM_BACKEND" not in env
    assert step.status == "failed" and "1 failed" in step.summary
    assert outcome.exit_code([step]) == outcome.EXIT_WRONG


def test_a_step_past_its_budget_is_stopped(tmp_path):
    """The whole process group goes, and the step says how far it got."""
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); " \
             "print('started', flush=True); time.sleep(60)"
    rc, seconds = processes.run_process([sys.executable, "-c", script], tmp_path / "x.log", 3)
    assert rc is None and 3 <= seconds < 30
    assert (tmp_path / "x.log").read_text().strip() == "started"


def test_exit_code_precedence():
    def step(name, status, gpus=True):
        return outcome.StepResult(name, 1, status, detail={"gpus": GPU_ENV["gpus"] if gpus else [],
                                                             "no_gpu": not gpus})

    ok = [step("env", "passed"), step("build", "passed"), step("tests", "passed")]
    assert outcome.exit_code(ok) == 0
    assert outcome.exit_code(ok + [step("bench", "skipped")]) == 0
    assert outcome.exit_code([step("env", "failed", gpus=False)]) == 3
    assert outcome.exit_code([step("env", "failed")]) == 4  # a GPU, but torch/triton too old
    assert outcome.exit_code([outcome.StepResult("env", 1, "failed", detail={"gpus": []})]) == 4  # crashed
    assert outcome.exit_code(ok + [step("algorithms", "timed out")]) == 5
    assert outcome.exit_code(ok + [step("algorithms", "timed out"), step("bench", "failed")]) == 1


# ---------------------------------------------------------------- cuSPARSELt algorithms and their exclusion


class Clock:
    def __init__(self, seconds=1e9):
        self.seconds, self.records = seconds, []

    def __call__(self, **record):
        self.records.append(record)

    def time_left(self):
        return self.seconds


class FakeRunner:
    """cuSPARSELt as pytorch#155333 saw it, and worse: id 20 is wrong every other run on 256+ rows,
    id 3 only with split-k 4; id 7 has no split-k 8 (refused, not wrong); 25 ids in all."""

    def __init__(self):
        self.calls = {}

    def max_algorithm_id(self, case):
        return 24

    def error(self, case, alg_id, split_k):
        if alg_id == 7 and split_k == 8:
            raise algorithms.UnsupportedConfig("MatmulAlgSetAttribute (split-k) failed")
        key = (case, alg_id, split_k)
        self.calls[key] = self.calls.get(key, 0) + 1
        if alg_id == 20 and case.shape[0] >= 256 and self.calls[key] % 2 == 0:
            return "3 of 512 outputs differ from the exact product"
        if alg_id == 3 and split_k == 4:
            return "all outputs are zero"
        return None


def test_wrong_algorithms_are_found_and_named():
    clock = Clock()
    cases = algorithms.algorithm_cases(("float16", "int8"))
    excluded = algorithms.check_algorithms(FakeRunner(), cases, clock, capability=(9, 0))
    assert {dtype: sorted(ids) for dtype, ids in excluded.items()} == {"float16": [3, 20], "int8": [3, 20]}
    assert excluded["float16"][20].startswith("1024x512 M=512 split-k 0: 3 of 512 outputs differ")
    assert excluded["int8"][3] == "1024x512 M=512 split-k 4: all outputs are zero"
    last = clock.records[2]  # the medium case: every split-k, and repeats of the heuristic one
    assert last["shape"] == "1024x512 M=512" and last["unsupported"] == 1
    assert last["runs"] == 25 * (plan.REPEATS + 4) - 1
    assert last["wrong"] == {"3": excluded["float16"][3], "20": excluded["float16"][20]}
    assert [r["runs"] for r in clock.records[:2]] == [25, 25]  # decode and 256-row shapes: heuristic split-k once


def test_known_wrong_ids_are_excluded_on_their_gpu_even_when_right_here():
    class AlwaysRight(FakeRunner):
        def error(self, case, alg_id, split_k):
            return None

    cases = algorithms.algorithm_cases(("bfloat16",))
    on_a100 = algorithms.check_algorithms(AlwaysRight(), cases, Clock(), capability=(8, 0))
    assert list(on_a100["bfloat16"]) == [20] and on_a100["bfloat16"][20].startswith("known: pytorch#155333")
    assert algorithms.check_algorithms(AlwaysRight(), cases, Clock(), capability=(9, 0)) == {"bfloat16": {}}


def test_the_check_stops_at_its_deadline():
    assert algorithms.check_algorithms(FakeRunner(), algorithms.algorithm_cases(), Clock(seconds=0)) is None


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """cusparselt's view of a GPU, on CPU: its name, library version and exclusion file."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(cusparselt, "_device_name", lambda index: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(cusparselt, "_device_index", lambda device: 0)
    monkeypatch.setattr(cusparselt, "library_version", lambda: 801)
    monkeypatch.setattr(cusparselt, "_EXCLUDED", cusparselt._Excluded())
    key = cusparselt.exclusion_key("NVIDIA A100-SXM4-80GB", 801, torch.float16)
    algorithms.write_exclusions(cusparselt.exclusions_path(), {key: {20: "wrong", 0: "wrong"}}, "today")
    return key


def test_exclusions_round_trip_and_a_new_check_replaces_them(fake_gpu):
    path = cusparselt.exclusions_path()
    assert path.parent.parent == Path(os.environ["XDG_CACHE_HOME"])
    assert cusparselt.read_exclusions(path) == {fake_gpu: frozenset({0, 20})}
    bf16 = cusparselt.exclusion_key("NVIDIA A100-SXM4-80GB", 801, torch.bfloat16)
    algorithms.write_exclusions(path, {fake_gpu: {}, bf16: {5: "wrong"}}, "tomorrow")
    assert cusparselt.read_exclusions(path) == {fake_gpu: frozenset(), bf16: frozenset({5})}
    assert json.loads(path.read_text())[bf16] == {"alg_ids": [5], "why": {"5": "wrong"}, "checked": "tomorrow"}


def test_an_unreadable_exclusion_file_is_an_error_not_a_silent_pass(fake_gpu):
    cusparselt.exclusions_path().write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the cuSPARSELt exclusion file .* run nxm gpu-check again"):
        cusparselt._EXCLUDED.ids_for(torch.device("cpu"), torch.float16)


def test_calls_never_run_an_excluded_algorithm(fake_gpu):
    excluded = cusparselt._EXCLUDED
    cpu = torch.device("cpu")
    assert excluded.usable((20, 4), cpu, torch.float16) == (1, 0)  # 0 is excluded too: the lowest left
    assert excluded.usable((0, 0), cpu, torch.float16) == (1, 0)
    assert excluded.usable((5, 2), cpu, torch.float16) == (5, 2)
    assert excluded.usable((20, 4), cpu, torch.bfloat16) == (20, 4)  # excluded for float16 only


def test_the_algorithm_step_writes_exclusions_that_calls_then_honour(tmp_path, monkeypatch, fake_gpu):
    """The worker's glue and the step's reading of it, with the fake runner in place of the GPU."""
    monkeypatch.setattr(algorithms, "GpuAlgorithmRunner", FakeRunner)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *args: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA A100-SXM4-80GB")
    with processes.Recorder(tmp_path / "algorithms.jsonl", 60) as record:
        algorithms.worker_algorithms(record)
    monkeypatch.setattr(algorithms, "run_worker", lambda name, python, out_dir, step: processes.read_records(
        out_dir / f"{name}.jsonl"))
    step = outcome.StepResult("algorithms", 40)
    algorithms.step_algorithms("python", tmp_path, step)
    assert step.status == "failed" and "excluded from tuning: float16 3, 20; bfloat16 3, 20" in step.summary
    assert len(step.detail["cases"]) == 3 * len(plan.ALGORITHM_DTYPES)
    assert "cuSPARSELt int8 algorithm 20: 1024x512 M=512 split-k 0" in " ".join(step.detail["wrong"])
    written = cusparselt.read_exclusions(cusparselt.exclusions_path())
    assert written[fake_gpu] == {3, 20}  # this check replaced the earlier {0, 20}
    assert all(written[cusparselt.exclusion_key("NVIDIA A100-SXM4-80GB", 801, getattr(torch, name))] == {3, 20}
               for name in plan.ALGORITHM_DTYPES)
    cusparselt._EXCLUDED.ids = None  # a later process reads the new file
    assert cusparselt._EXCLUDED.usable((20, 0), torch.device("cpu"), torch.int8) == (0, 0)


def test_a_wrong_algorithm_fails_the_step_even_when_the_check_ran_out_of_time(tmp_path, monkeypatch):
    case = {"kind": "case", "dtype": "float16", "shape": "256x512 M=64", "max_id": 24, "runs": 25, "unsupported": 0,
            "wrong": {"20": "256x512 M=64 split-k 0: 3 of 16384 outputs differ"}}
    monkeypatch.setattr(algorithms, "run_worker", lambda *args: [case, {"kind": "end", "complete": False,
                                                                       "excluded": {}, "exclusion_file": "x"}])
    step = outcome.StepResult("algorithms", 40)
    algorithms.step_algorithms("python", tmp_path, step)
    assert step.status == "failed" and "before the budget ran out" in step.summary
    assert "wrong, not yet excluded: float16 20" in step.summary
    assert step.detail["wrong"] == ["cuSPARSELt float16 algorithm 20: 256x512 M=64 split-k 0: 3 of 16384 outputs differ"]


def test_the_bench_step_fails_on_a_wrong_output_and_times_out_when_incomplete(tmp_path, monkeypatch):
    row = {"kind": "gemm", "shape": "decoder-8b.attn-qo 4096x4096", "m": 1, "us": {"cuBLAS dense": 9.0},
           "notes": [], "wrong": [], "best_speedup": 1.5}
    records = [{"kind": "impls", "impls": ["cusparselt", "cuBLAS dense"]}, row,
               {"kind": "w4a16", "rows": None, "why": "not landed"}, {"kind": "end", "complete": True}]
    monkeypatch.setattr(bench, "run_worker", lambda *args: records)
    step = outcome.StepResult("bench", 70)
    bench.step_bench("python", tmp_path, step)
    assert step.status == "passed" and "best sparse speed-up 1.50x" in step.summary
    assert step.detail["w4a16"] == "not landed"
    records[1] = {**row, "wrong": ["decoder-8b.attn-qo M=1 triton: max error 3 > allowed 0.01"]}
    step = outcome.StepResult("bench", 70)
    bench.step_bench("python", tmp_path, step)
    assert step.status == "failed" and "triton: max error 3" in step.summary
    records[1], records[-1] = row, {"kind": "end", "complete": False}
    step = outcome.StepResult("bench", 70)
    bench.step_bench("python", tmp_path, step)
    assert step.status == "timed out"


def fake_sw(out_features=64, in_features=128):
    sw = mock.NonCallableMagicMock(spec=cusparselt.NMSparseWeight)
    sw.layout = getattr(cusparselt, "CUSPARSELT", "cusparselt")
    sw.dtype, sw.device, sw.out_features, sw.in_features = torch.float16, torch.device("cpu"), out_features, in_features
    sw.values = torch.empty(0, dtype=torch.float16)
    return sw


def test_a_tuned_or_cached_excluded_algorithm_is_replaced_before_the_kernel_runs(fake_gpu, monkeypatch):
    ran = []
    monkeypatch.setattr(torch.ops.nxm, "cusparselt_mm", lambda *args: ran.append(args[-2:]) or torch.zeros(8, 64),
                        raising=False)
    key = cusparselt.tuning_key("NVIDIA A100-SXM4-80GB", 801, 8, 64, 128, torch.float16, torch.float16, False, False)
    monkeypatch.setitem(cusparselt._TUNED.configs, key, (20, 4))
    monkeypatch.setattr(cusparselt._TUNED, "file_read", True)
    cusparselt._run(torch.zeros(8, 128, dtype=torch.float16), fake_sw(), None, None, torch.float16)
    assert ran == [(1, 0)]


def test_tune_never_times_an_excluded_algorithm(fake_gpu, monkeypatch):
    timed = []
    monkeypatch.setattr(cusparselt, "_require", lambda *args: None)
    monkeypatch.setattr(torch.ops.nxm, "cusparselt_max_algorithm_id", lambda *args: 24, raising=False)
    monkeypatch.setattr(cusparselt, "_run", lambda x, sw, bias, alpha, out_dtype, config: timed.append(config))
    fastest = {(20, 4): 1.0, (0, 0): 2.0, (6, 2): 3.0}  # the excluded ids would win

    def fake_time(fn, iterations):
        fn()
        return fastest.get(timed[-1], 10.0)

    monkeypatch.setattr(cusparselt, "_time_us", fake_time)
    results = cusparselt.tune(fake_sw(), tokens=(16,), save=False)
    assert timed and not {alg for alg, _ in timed} & {0, 20}
    assert {alg for alg, _ in timed} == set(range(25)) - {0, 20}
    assert (results[16]["alg_id"], results[16]["split_k"]) == (6, 2)


# ---------------------------------------------------------------- the summary


def fake_result():
    steps = [
        outcome.StepResult("env", 40, "passed", 5.2, "NVIDIA H200 sm_90, torch 2.11.0+cu130",
                             {"gpus": GPU_ENV["gpus"]}),
        outcome.StepResult("build", 150, "passed", 61.0, "_C for sm 9.0"),
        outcome.StepResult("tests", 165, "failed", 120.5, "pytest exit 1: 1 failed, 80 passed in 118s",
                             {"failed": {"tests/test_cusparselt_gpu.py::test_opcheck": "AssertionError: shape"}}),
        outcome.StepResult("algorithms", 40, "failed", 22.0, "excluded from tuning: bfloat16 20", {
            "cases": [{"dtype": "bfloat16", "shape": "1024x512 M=512", "max_id": 24, "runs": 174, "unsupported": 1,
                       "wrong": {"20": "split-k 0: 3 of 512 outputs differ"}}],
            "excluded": {"bfloat16": {"20": "1024x512 M=512 split-k 0: 3 of 512 outputs differ"}},
            "skipped": ["float8_e4m3fn: needs sm_89"], "exclusion_file": "/root/.cache/x.json",
            "wrong": ["cuSPARSELt bfloat16 algorithm 20: 1024x512 M=512 split-k 0: 3 of 512 outputs differ"]}),
        outcome.StepResult("bench", 70, "passed", 50.0, "10 GEMM rows", {
            "impls": ["cusparselt", "triton", "cuBLAS dense"],
            "gemm": [{"shape": "decoder-8b.attn-qo 4096x4096", "m": 16, "us": {"cusparselt": 10.0, "triton": None,
                                                                            "cuBLAS dense": 20.0},
                      "notes": ["cusparselt tuned at M=16: algorithm 3"]}],
            "w4a16": "nxm.compress takes no bits= yet",
            "compress": [{"kernel": "clone", "us": 100.0}, {"kernel": "native packed", "us": 250.0},
                         {"kernel": "triton cutlass", "us": None, "why": "no | GPU"}]}),
    ]
    return {"format": 1, "command": "nxm gpu-check", "started": "2026-12-03T10:00:00", "seconds": 301.2,
            "exit_code": 1, "outcome": outcome.EXIT_MEANING[1],
            "environment": {**GPU_ENV, "triton": "3.6.0", "packages": {"pytest": "8.4", "hypothesis": None}},
            "steps": [asdict(s) for s in steps]}


def test_summary_writers(tmp_path):
    result = fake_result()
    json_path, md_path = summary.write_summary(result, tmp_path / "out")
    assert json.loads(json_path.read_text()) == result
    md = md_path.read_text()
    assert md.startswith("# nxm gpu-check on NVIDIA H200 (sm_90)")
    assert "**Exit code 1: a wrong result or a failed test.**" in md
    assert "| tests | failed | 120.5 s | 165 s | pytest exit 1: 1 failed, 80 passed in 118s |" in md
    assert "- `tests/test_cusparselt_gpu.py::test_opcheck`: AssertionError: shape" in md
    assert "| bfloat16 | 1024x512 M=512 | 0..24 | 174 | 20 |" in md
    assert "- bfloat16, algorithm 20: 1024x512 M=512 split-k 0: 3 of 512 outputs differ" in md
    assert "- float8_e4m3fn: needs sm_89" in md and "`/root/.cache/x.json`" in md
    assert "| decoder-8b.attn-qo 4096x4096 | 16 | 10.0 | n/a | 20.0 | 2.00x | n/a |" in md
    assert "Skipped: nxm.compress takes no bits= yet" in md
    assert "| native packed | 250.0 | 2.50 |" in md and "| triton cutlass | n/a | no \\| GPU |" in md
    assert "| packages | pytest 8.4, hypothesis None |" in md
    assert "## Wrong results" in md and "cuSPARSELt bfloat16 algorithm 20" in md
