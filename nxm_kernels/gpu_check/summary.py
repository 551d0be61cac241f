"""The run's summary: summary.json (everything) and summary.md (for people)."""

from __future__ import annotations

import json
from pathlib import Path

from .outcome import EXIT_MEANING
from .plan import TIME_LIMIT_S


def write_summary(result: dict, out_dir: Path) -> tuple[Path, Path]:
    """summary.json (everything) and summary.md (for people) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(result: dict) -> str:
    env = result.get("environment", {})
    gpus = env.get("gpus") or []
    gpu = f"{gpus[0]['name']} (sm_{gpus[0]['capability'].replace('.', '')})" if gpus else "no GPU"
    code = result["exit_code"]
    lines = [f"# nxm gpu-check on {gpu}", "",
             f"**Exit code {code}: {EXIT_MEANING.get(code, 'unknown')}.** Started {result['started']}, "
             f"{result['seconds']:.0f} s in all (limit {TIME_LIMIT_S} s).", "",
             f"Command: `{result['command']}`", "", "## Steps", "",
             "| step | status | time | budget | result |", "|---|---|---|---|---|"]
    for step in result["steps"]:
        lines.append(f"| {step['name']} | {step['status']} | {step['seconds']:.1f} s | {step['budget_s']} s | "
                     f"{_cell(step['summary'])} |")
    if env:
        lines += ["", "## Environment", "", "| what | value |", "|---|---|"]
        for key in ("python", "torch", "torch_cuda", "triton", "cusparselt", "cupy", "nvcc", "cuda_home", "packages"):
            if key in env:
                value = env[key]
                if isinstance(value, dict):
                    value = ", ".join(f"{k} {v}" for k, v in value.items())
                lines.append(f"| {key} | {_cell(value)} |")
        for g in gpus:
            lines.append(f"| GPU {g['index']} | {_cell(g['name'])}, sm_{g['capability'].replace('.', '')}, "
                         f"{g['memory_gib']:.0f} GiB |")
        for problem in env.get("compat_problems", []):
            lines.append(f"| problem | {_cell(problem)} |")
    steps = {s["name"]: s for s in result["steps"]}
    tests = steps.get("tests", {}).get("detail", {})
    if tests.get("failed"):
        lines += ["", "## Failed tests", ""] + [f"- `{t}`: {reason}" for t, reason in tests["failed"].items()]
    algorithms = steps.get("algorithms", {}).get("detail", {})
    if algorithms.get("cases"):
        lines += ["", "## cuSPARSELt algorithms", "",
                  "| dtype | shape N x K, M | ids | configurations run | wrong ids (excluded) |", "|---|---|---|---|---|"]
        for case in algorithms["cases"]:
            wrong = ", ".join(f"{i}" for i in case["wrong"]) or "none"
            lines.append(f"| {case['dtype']} | {case['shape']} | 0..{case['max_id']} | {case['runs']} | {wrong} |")
        for dtype, ids in algorithms.get("excluded", {}).items():
            for alg_id, why in ids.items():
                lines.append(f"- {dtype}, algorithm {alg_id}: {why}")
        for skipped in algorithms.get("skipped", []):
            lines.append(f"- {skipped}")
        if algorithms.get("exclusion_file"):
            lines.append(f"- exclusions written to `{algorithms['exclusion_file']}`")
    bench = steps.get("bench", {}).get("detail", {})
    if bench.get("gemm"):
        lines += ["", "## Sparse GEMM (fp16 2:4) against cuBLAS dense", "",
                  "Times in microseconds (triton.testing.do_bench medians over interleaved rounds); "
                  "speed-up = dense time / time.", ""]
        impls = bench["impls"]
        lines += ["| shape | M | " + " | ".join(impls) + " | " + " | ".join(f"{i} speed-up" for i in impls[:-1]) + " |",
                  "|" + "---|" * (2 + 2 * len(impls) - 1)]
        for row in bench["gemm"]:
            us = row["us"]
            dense = us.get(impls[-1])
            times = ["n/a" if us.get(i) is None else f"{us[i]:.1f}" for i in impls]
            speedups = ["n/a" if us.get(i) is None or dense is None else f"{dense / us[i]:.2f}x" for i in impls[:-1]]
            lines.append(f"| {row['shape']} | {row['m']} | " + " | ".join(times + speedups) + " |")
        for note in sorted({n for row in bench["gemm"] for n in row.get("notes", [])}):
            lines.append(f"- {note}")
    if bench.get("w4a16") is not None:
        lines += ["", "## W4A16 2:4 against fp16", ""]
        if isinstance(bench["w4a16"], str):
            lines.append(f"Skipped: {bench['w4a16']}")
        else:
            lines += ["| M | fp16 dense us | W4A16 2:4 us | speed-up |", "|---|---|---|---|"]
            lines += [f"| {r['m']} | {r['dense_us']:.1f} | {r['us']:.1f} | {r['dense_us'] / r['us']:.2f}x |"
                      for r in bench["w4a16"]]
    if bench.get("compress"):
        lines += ["", "## Compress against w.clone()", "", "| kernel | us | time / clone |", "|---|---|---|"]
        clone = next((r["us"] for r in bench["compress"] if r["kernel"] == "clone"), None)
        for row in bench["compress"]:
            if row.get("us") is None or clone is None:
                lines.append(f"| {row['kernel']} | n/a | {_cell(row.get('why', ''))} |")
            else:
                lines.append(f"| {row['kernel']} | {row['us']:.1f} | {row['us'] / clone:.2f} |")
    wrong = [w for s in result["steps"] for w in s["detail"].get("wrong", [])]
    if wrong:
        lines += ["", "## Wrong results", ""] + [f"- {_cell(w)}" for w in wrong]
    return "\n".join(lines) + "\n"
