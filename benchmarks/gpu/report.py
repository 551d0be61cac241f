"""Table and plot of the sparse GEMM benchmark: time of every implementation, and speed-up over
cuBLAS dense (t_dense / t_impl, > 1: faster than dense) against M."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

IMPLS = ("cusparselt", "cusparselt tuned", "torch._cslt_sparse_mm", "triton", "cuBLAS dense")
RESULTS: list[dict] = []  # one per (shape, dtype, M): {"shape", "dtype", "m", "gpu", "us": {impl: us or None}}
# the quantized 2:4 GEMM (test_bench_quant_gemm.py), one per (shape, encoding, M):
# {"shape", "encoding", "m", "gpu", "us", "dense_us", "bound": weight-bytes bound of the speed-up}
QUANT_RESULTS: list[dict] = []


def output_dir() -> Path:
    return Path(os.environ.get("NXM_BENCH_OUT", Path(__file__).parent / "results"))


def _speedup(row, impl):
    us, dense = row["us"].get(impl), row["us"]["cuBLAS dense"]
    return None if us is None else dense / us


def table(results: list[dict]) -> str:
    gpu = results[0]["gpu"]
    lines = [f"# Sparse GEMM y = x @ W.T on {gpu}", "",
             "Times in microseconds (triton.testing.do_bench medians, interleaved); "
             "speed-up = cuBLAS dense time / time (> 1: faster than dense).", ""]
    groups = defaultdict(list)
    for row in results:
        groups[(row["shape"], row["dtype"])].append(row)
    for (shape, dtype), rows in groups.items():
        lines += [f"## {shape} {dtype}", "",
                  "| M | " + " | ".join(f"{impl} us" for impl in IMPLS) + " | "
                  + " | ".join(f"{impl} speed-up" for impl in IMPLS[:-1]) + " |",
                  "|" + "---|" * (2 * len(IMPLS))]
        for row in sorted(rows, key=lambda r: r["m"]):
            times = [("n/a" if row["us"].get(i) is None else f"{row['us'][i]:.1f}") for i in IMPLS]
            speedups = [("n/a" if _speedup(row, i) is None else f"{_speedup(row, i):.2f}x") for i in IMPLS[:-1]]
            lines.append(f"| {row['m']} | " + " | ".join(times + speedups) + " |")
        notes = {note for row in rows for note in row.get("notes", [])}
        lines += [f"- {note}" for note in sorted(notes)] + [""]
    return "\n".join(lines)


def quant_table(results: list[dict]) -> str:
    lines = [f"# Quantized 2:4 GEMM (Triton, tiled_q) against cuBLAS dense fp16 on {results[0]['gpu']}", "",
             "speed-up = dense time / time; bound = dense fp16 weight bytes / quantized weight bytes.", "",
             "| layer | encoding | M | triton us | dense us | speed-up | bound |", "|---|---|---:|---:|---:|---:|---:|"]
    for row in sorted(results, key=lambda r: (r["shape"], r["encoding"], r["m"])):
        lines.append(f"| {row['shape']} | {row['encoding']} | {row['m']} | {row['us']:.1f} | {row['dense_us']:.1f} "
                     f"| {row['dense_us'] / row['us']:.2f}x | {row['bound']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for row in results:
        groups[(row["shape"], row["dtype"])].append(row)
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.6 * rows_n), squeeze=False)
    for ax, ((shape, dtype), rows) in zip(axes.flat, groups.items()):
        rows = sorted(rows, key=lambda r: r["m"])
        for impl in IMPLS[:-1]:
            points = [(r["m"], _speedup(r, impl)) for r in rows if _speedup(r, impl) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=impl)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} {dtype}", fontsize=9)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speed-up over cuBLAS dense")
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"N:M sparse GEMM on {results[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: list[dict], quant: list[dict] = ()) -> list[Path]:
    folder = output_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stem = "sparse_gemm-" + "".join(c if c.isalnum() else "_" for c in (results or quant)[0]["gpu"])
    md, png = folder / f"{stem}.md", folder / f"{stem}.png"
    md.write_text("\n".join(part for part in (table(results) if results else "",
                                              quant_table(list(quant)) if quant else "") if part))
    if not results:
        return [md]
    plot(results, png)
    return [md, png]
