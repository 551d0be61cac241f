"""Turn the suite's pytest-benchmark JSON into a markdown report and PNG plots.

    python -m benchmarks.report results.json --out benchmarks   # RESULTS.md + plots/*.png

Every figure comes from the per-round samples in ``extra_info`` (see harness.py): ratios are
per-round ``t_candidate / t_baseline``, shown as median [min-max]; speed-ups are their inverse.
Absolute times and GB/s hold only for the machine named at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from .harness import ratio_stats

ROOT = Path(__file__).resolve().parents[1]
ROOFLINE = "ROOFLINE.md"  # written by benchmarks/roofline.py (the Triton GEMM's predictions)
GPU_GEMM_DIR = "gpu-gemm"  # where run.py points benchmarks/gpu's report (NXM_BENCH_OUT)
TORCH_CONVERTER = "torch cutlass converter"
TORCH_CSLT_COMPRESS = "torch._cslt_compress"
PLOTTED_GEMM_DTYPES = {"float16": "-", "bfloat16": "--"}  # dtype -> line style
SPEEDUP_BASELINE = {"sparse_mm": ("dense F.linear", "dense torch._int_mm"), "linear": ("nn.Linear (masked dense)",)}


# ---------------------------------------------------------------- data


def load(path) -> dict:
    return json.loads(Path(path).read_text())


def cases(data: dict) -> list[dict]:
    """One dict per benchmark that the suite wrote: its extra_info plus name and medians."""
    found = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "kind" not in info:
            continue
        info["name"] = bench["name"]
        samples = info.get("samples_s", {})
        info["median_s"] = {who: statistics.median(times) for who, times in samples.items() if times}
        found.append(info)
    return found


def speedup(ratio: dict) -> dict:
    """Time ratio stats (candidate/baseline) -> speed-up stats (baseline/candidate)."""
    return {"median": 1 / ratio["median"], "min": 1 / ratio["max"], "max": 1 / ratio["min"], "rounds": ratio["rounds"]}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


# ---------------------------------------------------------------- formatting


def fmt_stats(stats: dict | None, unit: str = "x") -> str:
    if stats is None:
        return "-"
    return f"{stats['median']:.3g}{unit} [{stats['min']:.3g}-{stats['max']:.3g}]"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for scale, unit in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds * 1e9:.3g} ns"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return ["(none measured)", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def shape_label(case: dict) -> str:
    return f"{case['model']} {case['shape'][0]}x{case['shape'][1]}"


def vs_torch(case: dict) -> str:
    """Speed-up over torch's own converter for this layout, if it ran."""
    name = next((n for n in (TORCH_CONVERTER, TORCH_CSLT_COMPRESS) if n in case["ratios"]), None)
    return fmt_stats(speedup(case["ratios"][name])) if name else "-"


def first_speedup_baseline(case: dict) -> str | None:
    return next((b for b in SPEEDUP_BASELINE.get(case["kind"], ()) if b in case["ratios"]), None)


# ---------------------------------------------------------------- sections


def machine_section(data: dict) -> list[str]:
    nxm = data.get("machine_info", {}).get("nxm", {})
    rows = [
        ["CPU", f"{nxm.get('cpu_model', '?')}, {nxm.get('logical_cpus', '?')} logical CPUs, "
                f"torch uses {nxm.get('torch_threads', '?')} threads"],
        ["GPU", nxm.get("gpu") or "none"],
        ["torch / CUDA build", f"{nxm.get('torch', '?')} / {nxm.get('cuda') or 'none'}"],
        ["triton", nxm.get("triton", "?")],
        ["nxm-kernels", f"{nxm.get('nxm_kernels', '?')}, git {nxm.get('git', '?')}"],
        ["run", f"{data.get('datetime', '?')}, profile `{nxm.get('profile', '?')}`"],
    ]
    load = nxm.get("load_average")
    if load:
        shown = " / ".join(f"{v:.1f}" if v is not None else "?" for v in load)
        rows.append(["load average (1 min) at start / end",
                     f"{shown} on {nxm.get('logical_cpus', '?')} CPUs (other processes competing for them)"])
    backends = nxm.get("backends", {})
    lines = ["## Machine", ""] + table(["", ""], rows)
    lines += ["Backends on this machine (an unavailable one is skipped, with this reason):", ""]
    lines += [f"- `{name}`: " + ("available" if why is None else f"unavailable: {why}")
              for name, why in backends.items()]
    return lines + [""]


def convert_section(found: list[dict], device: str, plot: str | None) -> list[str]:
    rows = []
    chosen = sorted((c for c in found if c["kind"] == "convert" and c["device"] == device),
                    key=lambda c: (c["op"], c["layout"] or "", c["dtype"], c["model"], c["backend"]))
    for c in chosen:
        t = c["median_s"]["candidate"]
        rows.append([
            f"{c['op']} {c['layout'] or ''}".strip(), c["pattern"], c["dtype"], shape_label(c),
            c["backend"], fmt_time(t), f"{gbps(c['bytes'], t):.2f}",
            f"{gbps(c['bytes'], c['median_s']['clone']):.2f}" if "clone" in c["median_s"] else "-",
            fmt_stats(c["ratios"].get("clone")),
            vs_torch(c),
        ])
    lines = [f"### Selection and conversion of one weight ({device})", "",
             "GB/s = dense weight bytes / time. `x clone` = time relative to `w.clone()` in the same rounds "
             "(the memory-bandwidth floor: 1x is as fast as copying the weight). `vs torch` = speed-up over "
             "torch's converter on the already projected weight: `sparse_semi_structured_from_dense_cutlass` "
             "(cutlass), `torch._cslt_compress` (cusparselt, GPU).", ""]
    lines += table(["op", "pattern", "dtype", "shape (out x in)", "backend", "time", "GB/s", "clone GB/s",
                    "x clone", "vs torch"], rows)
    if plot:
        lines += [f"![conversion throughput]({plot})", ""]
    return lines


def roofline_predictions() -> dict:
    """(model, M) -> "A100 x / H100 y" predicted fp16 2:4 speed-ups (Triton GEMM | Sparse Tensor
    Cores) from benchmarks/roofline.py, or {} while it is not in the tree."""
    try:
        from . import roofline
    except ImportError:
        return {}
    predicted = {}
    for gpu in roofline.GPUS:
        for row in roofline.rows(gpu):
            key = (row["layer"].split()[0], row["m"])
            predicted.setdefault(key, []).append(
                f"{gpu.name.split()[0]} {row['ours_speedup']:.2f}x / {row['stc_speedup']:.2f}x")
    return {key: "; ".join(values) for key, values in predicted.items()}


def matmul_section(found: list[dict], device: str, plot: str | None) -> list[str]:
    chosen = sorted((c for c in found if c["kind"] == "sparse_mm" and c["device"] == device),
                    key=lambda c: (c["dtype"], c["layout"], c["model"], c["m"], c["backend"]))
    others = sorted({b for c in chosen for b in c["ratios"]} - set(SPEEDUP_BASELINE["sparse_mm"]))
    predicted = roofline_predictions() if device == "cuda" else {}
    rows = []
    for c in chosen:
        main = first_speedup_baseline(c)
        rows.append([
            c["dtype"], f"{c['layout']} {c['pattern']}", shape_label(c), c["m"],
            c["backend"], fmt_time(c["median_s"]["candidate"]),
            fmt_time(c["median_s"].get(main)) if main else "-",
            fmt_stats(speedup(c["ratios"][main])) if main else "-",
        ] + [fmt_stats(speedup(c["ratios"][b])) if b in c["ratios"] else "-" for b in others]
          + ([predicted.get((c["model"], c["m"]), "-") if c["dtype"] == "float16" else "-"] if predicted else []))
    lines = [f"### sparse_mm y = x @ W.T ({device})", "",
             "Speed-up = time of the dense GEMM on the projected weight / time of `nxm.sparse_mm`, per round "
             "(> 1: sparse is faster). Dense is `F.linear` (`torch._int_mm` for int8); on a GPU that is cuBLAS.", ""]
    if predicted:
        lines += ["`roofline` = predicted fp16 speed-up over dense from `benchmarks/roofline.py` "
                  "(Triton 2:4 GEMM / Sparse Tensor Cores) at A100 and H100 limits.", ""]
    lines += table(["dtype", "layout", "shape (out x in)", "M", "backend", "sparse time", "dense time",
                    "speed-up vs dense"] + [f"vs {b}" for b in others] + (["roofline"] if predicted else []), rows)
    if plot:
        lines += [f"![sparse_mm speed-up against M]({plot})", ""]
    return lines


def nn_section(found: list[dict], device: str) -> list[str]:
    lines = []
    linear = sorted((c for c in found if c["kind"] == "linear" and c["device"] == device),
                    key=lambda c: (c["dtype"], c["model"], c["m"], c["backend"]))
    rows = [[c["dtype"], c["layout"], shape_label(c), c["m"], c["backend"],
             fmt_time(c["median_s"]["candidate"]), fmt_stats(speedup(c["ratios"]["nn.Linear (masked dense)"]))]
            for c in linear]
    lines += [f"### SparseLinear forward ({device})", "",
              "Speed-up over `nn.Linear` holding the projected weight (> 1: SparseLinear is faster).", ""]
    lines += table(["dtype", "layout", "shape (out x in)", "M", "backend", "time", "speed-up vs nn.Linear"], rows)
    whole = [c for c in found if c["kind"] == "sparsify" and c["device"] == device]
    rows = [[c["model"], c["dtype"], c["backend"], fmt_time(c["median_s"]["candidate"]),
             f"{gbps(c['bytes'], c['median_s']['candidate']):.2f}", fmt_stats(c["ratios"]["copy.deepcopy"])]
            for c in whole]
    if whole:
        lines += [f"### sparsify a whole model ({device})", "",
                  "`nxm.sparsify(model, '2:4', inplace=False)` against `copy.deepcopy(model)` (which it includes).", ""]
        lines += table(["model", "dtype", "compress backend", "time", "GB/s", "x deepcopy"], rows)
    return lines


def memory_section(found: list[dict]) -> list[str]:
    memory = [c for c in found if c["kind"] == "memory"]
    lines = ["## Memory: converting a 7-8B decoder stack on CPU", ""]
    if not memory:
        return lines + ["Not measured in this run (needs `nxm.sparsify` and Linux).", ""]
    for c in memory:
        one, stack = c["one_layer"], c["stack"]
        rows = []
        labelled = [("sparsify, 1 layer", one), (f"sparsify, {stack['layers']} layers", stack)]
        if "swap_stack" in c:
            labelled.append((f"swap one Linear at a time, {stack['layers']} layers", c["swap_stack"]))
        for label, r in labelled:
            rows.append([label, fmt_bytes(r["dense_bytes"]), fmt_bytes(r["sparse_bytes"]),
                         fmt_bytes(r["rss_dense_bytes"]), fmt_bytes(r["rss_peak_bytes"]),
                         fmt_bytes(r["rss_peak_bytes"] - r["rss_dense_bytes"]), fmt_bytes(r["rss_after_bytes"]),
                         f"{r['seconds']:.1f} s", r["compress_backend"]])
        growth = (c["extra_stack_bytes"] - c["extra_one_layer_bytes"]) / max(stack["layers"] - 1, 1)
        per_layer_sparse = stack["sparse_bytes"] / stack["layers"]
        verdict = ("**streams**: the stack needed no more beyond its dense weights than one layer did"
                   if c["streams"] else
                   f"**does not stream**: each extra layer added {fmt_bytes(growth)} to the peak beyond the dense "
                   f"model (one layer's compressed weights are {fmt_bytes(per_layer_sparse)}; allowed slack "
                   f"{fmt_bytes(c['slack_bytes'])} in total)")
        if "swap_stack" in c and not c["streams"]:
            swap = c["swap_stack"]
            verdict += (f"; the swap loop converted the same stack within "
                        f"{fmt_bytes(swap['rss_peak_bytes'] - swap['rss_dense_bytes'])} beyond the dense model")
        lines += [
            "Each row is a fresh process (`python -m benchmarks.memory_probe --layers N`): build the dense stack "
            "(q, k, v, o, gate, up, down of Llama-3-8B / Mistral-7B, fp16), reset the peak RSS, run "
            "`nxm.sparsify(model, '2:4')` in place, read the peak. `extra` = peak - RSS with the dense model built. "
            "The last row is the streaming reference: a loop that replaces one Linear at a time with "
            "`SparseLinear.from_dense`, keeping no reference to the old layer.",
            "",
        ]
        lines += table(["conversion", "dense weights", "compressed", "RSS dense", "peak RSS", "extra", "RSS after",
                        "time", "compress backend"], rows)
        lines += [f"Verdict: {verdict}.", ""]
    return lines


def gpu_section(found: list[dict], plots: dict, out_dir: Path) -> list[str]:
    lines = ["## GPU", ""]
    roofline = ROOT / "benchmarks" / ROOFLINE
    link = (f"[{ROOFLINE}]({relative_link(roofline, out_dir)})" if roofline.exists()
            else f"`benchmarks/{ROOFLINE}` (not generated yet)")
    gemm = sorted((out_dir / GPU_GEMM_DIR).glob("*.md"))
    gemm_links = ", ".join(f"[{p.name}]({GPU_GEMM_DIR}/{p.name})" for p in gemm) or "not run here"
    lines += [f"Roofline predictions for the sparse GEMM (A100, H100): {link}. The cuSPARSELt GEMM study "
              f"(`benchmarks/gpu/`: cuSPARSELt default and tuned vs cuBLAS, `torch._cslt_sparse_mm`, Triton, "
              f"M = 1 to 8192): {gemm_links}.", ""]
    if not any(c["device"] == "cuda" for c in found):
        return lines + ["Not run: this machine has no GPU. On a GPU machine, `python -m benchmarks.run` measures "
                        "the gpu-marked cases too (`python -m benchmarks.run --gpu-only` for just those) and fills "
                        "in this section.", ""]
    lines += convert_section(found, "cuda", plots.get("convert-cuda"))
    lines += matmul_section(found, "cuda", plots.get("sparse_mm-cuda"))
    lines += nn_section(found, "cuda")
    return lines


def relative_link(target: Path, out_dir: Path) -> str:
    return os.path.relpath(target.resolve(), out_dir.resolve())


HEADLINE_MODEL = "decoder-8b.attn-qo"
HEADLINE_M = (1, 64, 4096)


def headline_section(found: list[dict]) -> list[str]:
    """The figures a reader asks first, each a median [min-max] ratio from the tables below."""
    lines = ["## Headlines", ""]
    convert = sorted((c for c in found if c["kind"] == "convert" and c["op"] == "compress" and c["layout"] == "cutlass"
                      and c["dtype"] == "float16" and c["model"] == HEADLINE_MODEL),
                     key=lambda c: (c["device"], c["backend"]))
    rows = [[c["device"], c["backend"], fmt_stats(c["ratios"].get("clone")),
             vs_torch(c)]
            for c in convert]
    lines += [f"Conversion to the cutlass layout, fp16 {HEADLINE_MODEL} (4096x4096). The native CPU backend's "
              "target (issue 4): at most 3x the clone time and at least 20x faster than torch's converter.", ""]
    lines += table(["device", "backend", "time / clone time", "speed-up vs torch converter"], rows)
    gemms: dict[tuple, dict] = {}
    for c in found:
        if c["kind"] == "sparse_mm" and c["dtype"] == "float16" and c["model"] == HEADLINE_MODEL \
                and c["m"] in HEADLINE_M and first_speedup_baseline(c):
            gemms.setdefault((c["device"], c["backend"], c["layout"]), {})[c["m"]] = speedup(
                c["ratios"][first_speedup_baseline(c)])
    rows = [[device, backend, layout] + [fmt_stats(by_m.get(m)) for m in HEADLINE_M]
            for (device, backend, layout), by_m in sorted(gemms.items())]
    lines += [f"`sparse_mm` speed-up over dense `F.linear` (cuBLAS on a GPU), fp16 {HEADLINE_MODEL}:", ""]
    lines += table(["device", "backend", "layout"] + [f"M={m}" for m in HEADLINE_M], rows)
    for c in (c for c in found if c["kind"] == "memory"):
        lines += [f"Memory: converting a {c['stack']['layers']}-layer 7-8B decoder stack with `nxm.sparsify` "
                  + ("streams." if c["streams"] else "does **not** stream (see Memory below).")]
    return lines + [""]


def render(data: dict, plots: dict, command: str, out_dir: Path) -> str:
    found = cases(data)
    lines = [
        "# Benchmark results", "",
        f"Generated by `{command}` from the pytest-benchmark JSON (raw samples in `extra_info`). "
        "Regenerate the report alone with `python -m benchmarks.report JSON --out DIR`; check a new run against "
        "this one with `python -m benchmarks.compare OLD.json NEW.json`.", "",
        "**How to read it.** Each benchmark runs its baselines and then the candidate, round after round, in one "
        "process. A ratio is `t_candidate / t_baseline` within a round; tables show the median over rounds with "
        "[min-max], so the spread is the noise of this (shared, busy) machine. Speed-ups are the inverse ratios. "
        "Absolute times and GB/s describe only the machine below.", "",
    ]
    lines += headline_section(found)
    lines += machine_section(data)
    lines += ["## CPU", ""]
    lines += convert_section(found, "cpu", plots.get("convert-cpu"))
    lines += matmul_section(found, "cpu", plots.get("sparse_mm-cpu"))
    lines += nn_section(found, "cpu")
    lines += memory_section(found)
    lines += gpu_section(found, plots, out_dir)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- plots


def plot_conversion(found: list[dict], device: str, path: Path) -> bool:
    """compress-cutlass fp16 per shape: GB/s of the clone floor, torch's converter and each
    backend; and each one's time relative to clone in the same rounds, median with min-max."""
    chosen = [c for c in found if c["kind"] == "convert" and c["device"] == device and c["op"] == "compress"
              and c["layout"] == "cutlass" and c["dtype"] == "float16"]
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in chosen))
    series = ["clone floor", "torch converter"] + [f"nxm {b}" for b in dict.fromkeys(c["backend"] for c in chosen)]
    throughput = {s: [0.0] * len(models) for s in series}
    relative = {s: [None] * len(models) for s in series[1:]}
    for c in chosen:
        i, samples = models.index(c["model"]), c["samples_s"]
        measured = {"clone floor": "clone", "torch converter": TORCH_CONVERTER, f"nxm {c['backend']}": "candidate"}
        for s, who in measured.items():
            if who in samples:
                throughput[s][i] = max(throughput[s][i], gbps(c["bytes"], statistics.median(samples[who])))
                if s != "clone floor":
                    relative[s][i] = ratio_stats(samples[who], samples["clone"])

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8))
    for ax, shown in ((ax1, series), (ax2, series[1:])):
        width = 0.8 / len(shown)
        for k, s in enumerate(shown):
            xs = [i + k * width for i in range(len(models))]
            if ax is ax1:
                ax.bar(xs, throughput[s], width, label=s, color=f"C{series.index(s)}")
                continue
            stats = [r or {"median": 0, "min": 0, "max": 0} for r in relative[s]]
            ax.bar(xs, [r["median"] for r in stats], width, label=s, color=f"C{series.index(s)}",
                   yerr=[[r["median"] - r["min"] for r in stats], [r["max"] - r["median"] for r in stats]], capsize=3)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))], models, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax1.set_ylabel("GB/s (dense fp16 bytes / median time)")
    ax1.set_title(f"compress 2:4 cutlass fp16 ({device}): throughput on this machine")
    ax2.axhline(1, color="k", lw=0.8)
    ax2.set_ylabel("time / clone time (median, min-max)")
    ax2.set_title("relative to w.clone() in the same rounds (1 = as fast as copying the weight)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_speedup(found: list[dict], device: str, path: Path) -> bool:
    """sparse_mm speed-up over dense against M: one panel per shape, one line per backend x layout
    x half type (fp16 solid, bf16 dashed; the tables hold fp32 and int8 too)."""
    chosen = [c for c in found if c["kind"] == "sparse_mm" and c["device"] == device
              and c["dtype"] in PLOTTED_GEMM_DTYPES and first_speedup_baseline(c)]
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(c["model"] for c in chosen))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        lines: dict[tuple, list] = {}
        for c in chosen:
            if c["model"] == model:
                lines.setdefault((c["backend"], c["layout"], c["dtype"]), []).append(c)
        for (backend, layout, dtype), points in sorted(lines.items()):
            points.sort(key=lambda c: c["m"])
            s = [speedup(c["ratios"][first_speedup_baseline(c)]) for c in points]
            ax.errorbar([c["m"] for c in points], [v["median"] for v in s],
                        yerr=[[v["median"] - v["min"] for v in s], [v["max"] - v["median"] for v in s]],
                        marker="o", capsize=3, label=f"{backend} {layout} {dtype}",
                        linestyle=PLOTTED_GEMM_DTYPES[dtype])
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M (rows of x)")
        ax.set_ylabel("speed-up over dense (median, min-max)")
        shape = points[0]["shape"]
        ax.set_title(f"{model} {shape[0]}x{shape[1]} ({device})", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(json_path, out_dir, command: str = "python -m benchmarks.run") -> Path:
    """Write ``RESULTS.md`` and ``plots/*.png`` into ``out_dir``; return the markdown's path."""
    data = load(json_path)
    found = cases(data)
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    plots = {}
    for device in ("cpu", "cuda"):
        for key, draw in (("convert", plot_conversion), ("sparse_mm", plot_speedup)):
            name = f"plots/{key}-{device}.png"
            if draw(found, device, out_dir / name):
                plots[f"{key}-{device}"] = name
    report = out_dir / "RESULTS.md"
    report.write_text(render(data, plots, command, out_dir))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="markdown report + plots from the benchmark JSON")
    parser.add_argument("json", help="pytest-benchmark JSON written by the suite")
    parser.add_argument("--out", default=str(ROOT / "benchmarks"), help="directory for RESULTS.md and plots/")
    args = parser.parse_args(argv)
    print(write(args.json, args.out, command=f"python -m benchmarks.report {args.json}"))


if __name__ == "__main__":
    main()
