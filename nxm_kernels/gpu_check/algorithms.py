"""The algorithms step: every cuSPARSELt algorithm id against the exact product, per dtype and shape; the
ids found wrong (or known wrong on this GPU) go to the exclusion file that nxm.tune and every call read."""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .outcome import FAILED, NOT_RUN, PASSED, TIMED_OUT, StepResult
from .plan import ALGORITHM_DTYPES, ALGORITHM_SHAPES, KNOWN_WRONG, REPEATS, SPLIT_K
from .processes import Recorder, run_worker


def step_algorithms(python: str, out_dir: Path, step: StepResult) -> None:
    records = run_worker("algorithms", python, out_dir, step)
    cases = [r for r in records if r["kind"] == "case"]
    end = next((r for r in records if r["kind"] == "end"), None)
    first_wrong = {}  # (dtype, id) -> where it was first wrong
    for case in cases:
        for alg_id, why in case["wrong"].items():
            first_wrong.setdefault((case["dtype"], alg_id), why)
    excluded = end["excluded"] if end else {}
    step.detail = {"cases": cases, "skipped": [r["why"] for r in records if r["kind"] == "skipped"],
                   "excluded": excluded, "exclusion_file": end and end.get("exclusion_file"),
                   "wrong": [f"cuSPARSELt {dtype} algorithm {alg_id}: {why}"
                             for (dtype, alg_id), why in first_wrong.items()]}
    named = "; ".join(f"{dtype} {', '.join(sorted(ids, key=int))}" for dtype, ids in excluded.items() if ids)
    runs = sum(c["runs"] for c in cases)
    if step.status == NOT_RUN:
        complete = end is not None and end["complete"]
        step.status = FAILED if first_wrong else PASSED if complete else TIMED_OUT
        step.summary = f"{runs} runs over {len(cases)} cases" + ("" if complete else " before the budget ran out")
    if first_wrong and not named:
        step.summary += f"; wrong, not yet excluded: {', '.join(f'{d} {i}' for d, i in first_wrong)}"
    step.summary += f"; excluded from tuning: {named}" if named else ("" if first_wrong else "; no wrong algorithm id")


class UnsupportedConfig(Exception):
    """cuSPARSELt has no such algorithm id or split-k for this problem."""


@dataclass(frozen=True)
class AlgorithmCase:
    dtype: str
    shape: tuple  # (N, K, M)
    split_k: tuple = (0,)
    repeats: int = 1

    @property
    def label(self) -> str:
        n, k, m = self.shape
        return f"{n}x{k} M={m}"


def algorithm_cases(dtypes=ALGORITHM_DTYPES) -> list[AlgorithmCase]:
    cases = []
    for dtype in dtypes:
        for shape in ALGORITHM_SHAPES[:-1]:
            cases.append(AlgorithmCase(dtype, shape))
        cases.append(AlgorithmCase(dtype, ALGORITHM_SHAPES[-1], SPLIT_K, REPEATS))
    return cases


def check_algorithms(runner, cases: list[AlgorithmCase], record, capability=None) -> dict[str, dict[int, str]]:
    """Runs every algorithm id of each case (every split-k, ``repeats`` times) through ``runner`` and
    returns {dtype: {id: why}} for the ids to exclude: wrong here, or known wrong on this GPU.

    ``runner.max_algorithm_id(case)`` gives the ids; ``runner.error(case, alg_id, split_k)`` returns
    None when the output equals the reference, what is wrong otherwise, and raises UnsupportedConfig
    for a configuration the problem does not have. ``record`` gets one record per case; it stops
    (returning None) when ``record.time_left()`` runs out.
    """
    excluded: dict[str, dict[int, str]] = {}
    for case in cases:
        if record.time_left() <= 0:
            return None
        max_id = runner.max_algorithm_id(case)
        wrong, runs, unsupported = {}, 0, 0
        for alg_id in range(max_id + 1):
            if record.time_left() <= 0:
                return None
            for split_k in case.split_k:
                for _ in range(case.repeats if split_k == 0 else 1):
                    try:
                        error = runner.error(case, alg_id, split_k)
                    except UnsupportedConfig:
                        unsupported += 1
                        break
                    runs += 1
                    if error is not None:
                        wrong.setdefault(alg_id, f"{case.label} split-k {split_k}: {error}")
        record(kind="case", dtype=case.dtype, shape=case.label, max_id=max_id, runs=runs, unsupported=unsupported,
               wrong={str(i): why for i, why in wrong.items()})
        excluded.setdefault(case.dtype, {})
        for alg_id, why in wrong.items():
            excluded[case.dtype].setdefault(alg_id, why)
    for alg_id, (known_capability, why) in KNOWN_WRONG.items():
        if capability is not None and tuple(capability) == known_capability:
            for ids in excluded.values():
                ids.setdefault(alg_id, f"known: {why}; not seen wrong in this run")
    return excluded


def write_exclusions(path: Path, keys: dict[str, dict[int, str]], checked: str) -> None:
    """Merge {exclusion key: {id: why}} into the exclusion file (the format cusparselt.read_exclusions reads);
    a key checked again replaces its old entry, so ids that are right now come back."""
    entries = json.loads(path.read_text()) if path.exists() else {}
    for key, ids in keys.items():
        entries[key] = {"alg_ids": sorted(ids), "why": {str(i): why for i, why in sorted(ids.items())},
                        "checked": checked}
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")
    scratch.replace(path)


class GpuAlgorithmRunner:
    """Runs one cuSPARSELt configuration on the GPU against the exact product. Inputs are in {-1, 0, 1}
    with exactly n kept per group, so every sum is an integer within 256 and every output dtype holds
    it exactly: any difference is wrong."""

    def __init__(self):
        import torch

        from nxm_kernels.backends import cusparselt

        self.torch, self.cusparselt = torch, cusparselt
        self.problems = {}

    def _problem(self, case: AlgorithmCase):
        if case in self.problems:
            return self.problems[case]
        torch, cusparselt = self.torch, self.cusparselt
        dtype = getattr(torch, case.dtype)
        n, k, m = case.shape
        keep, group = (1, 2) if dtype == torch.float32 else (2, 4)
        g = torch.Generator(device="cuda").manual_seed(n * 7 + k * 3 + m + ALGORITHM_DTYPES.index(case.dtype))
        ranks = torch.rand(n, k // group, group, device="cuda", generator=g).argsort(-1).argsort(-1)
        signs = torch.randint(0, 2, (n, k // group, group), device="cuda", generator=g) * 2 - 1
        w = torch.where(ranks < keep, signs, 0).reshape(n, k).float()
        x = torch.randint(-1, 2, (m, k), device="cuda", generator=g).float()
        truth = x.double() @ w.double().T
        if dtype == cusparselt.FP8:
            sw = cusparselt.compress_pruned(w.to(dtype), f"{keep}:{group}")
        else:
            import nxm_kernels as nxm

            sw = nxm.compress(w.to(dtype), f"{keep}:{group}", layout="cusparselt")
        out_dtype = cusparselt.OUTPUT_DTYPES[dtype][0]
        self.problems = {case: (x.to(dtype), sw, out_dtype, truth.to(out_dtype))}  # one problem held at a time
        return self.problems[case]

    def max_algorithm_id(self, case: AlgorithmCase) -> int:
        x, sw, out_dtype, _ = self._problem(case)
        cusparselt = self.cusparselt
        rows = cusparselt.padded_rows(x.shape[0], x.dtype)
        x_kernel = self.torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[0]))
        return int(self.torch.ops.nxm.cusparselt_max_algorithm_id(
            x_kernel, sw.values, sw.out_features, None, None, out_dtype, cusparselt.transposed_output(x.dtype)))

    def error(self, case: AlgorithmCase, alg_id: int, split_k: int) -> str | None:
        x, sw, out_dtype, expected = self._problem(case)
        try:
            y = self.cusparselt._run(x, sw, None, None, out_dtype, config=(alg_id, split_k))
            self.torch.cuda.synchronize()
        except RuntimeError as error:
            text = str(error)
            if any(call in text for call in ("MatmulAlgSetAttribute", "MatmulPlanInit", "MatmulGetWorkspace")):
                raise UnsupportedConfig(text) from None
            if "CUDA error" in text:
                raise  # the CUDA context is gone: no later result could be trusted, so the step fails here
            return f"raised {text.splitlines()[0]}"
        if self.torch.equal(y, expected):
            return None
        diff = (y.double() - expected.double()).abs()
        bad = int((diff != 0).sum()) + int(y.isnan().sum())
        worst = float(diff.nan_to_num(float("inf")).max())
        return f"{bad} of {y.numel()} outputs differ from the exact product (max |diff| {worst:.3g})"


def worker_algorithms(record: Recorder) -> None:
    import torch

    from nxm_kernels.backends import cusparselt

    cusparselt._EXCLUDED.ids = {}  # check every id, whatever an earlier check excluded
    capability = torch.cuda.get_device_capability()
    version = cusparselt.library_version()
    dtypes = []
    for name in ALGORITHM_DTYPES:
        why = cusparselt.device_reasons(capability, version, getattr(torch, name))
        if why:
            record(kind="skipped", why=f"{name}: {'; '.join(why)}")
        else:
            dtypes.append(name)
    gpu, path, runner = torch.cuda.get_device_name(), cusparselt.exclusions_path(), GpuAlgorithmRunner()
    excluded = {}
    for dtype in dtypes:  # each dtype's verdict is written as soon as all its cases ran
        found = check_algorithms(runner, algorithm_cases((dtype,)), record, capability)
        if found is None:
            break
        write_exclusions(path, {cusparselt.exclusion_key(gpu, version, getattr(torch, dtype)): found[dtype]},
                         datetime.datetime.now().isoformat(timespec="seconds"))
        excluded[dtype] = {str(i): why for i, why in found[dtype].items()}
    record(kind="end", complete=len(excluded) == len(dtypes), exclusion_file=str(path), excluded=excluded)
