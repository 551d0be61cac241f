"""Roofline of ``y = x @ W.T`` for dense fp16 vs 2:4 fp16 at BERT-base and 7-8B decoder shapes,
and of the quantized 2:4 GEMM (W8A16 / W4A16, ``tiled_q``) at decode sizes.

    python -m benchmarks.roofline            # print the table
    python -m benchmarks.roofline --write    # regenerate benchmarks/ROOFLINE.md

A paper model, until a GPU is at hand: time = max(bytes / bandwidth, FLOPs / peak), every
operand moved between DRAM and the chip exactly once (perfect on-chip reuse: a lower bound).
- dense: x, W and y in fp16, 2*M*N*K FLOPs at the dense tensor-core peak;
- triton 2:4 (this package's GEMM): W read as kept values (half of W) + 2-bit indices
  (1/8 byte per weight), 9/16 of the dense weight bytes; the tile is expanded in registers and
  multiplied on dense tensor cores, so it executes the same 2*M*N*K FLOPs at the dense peak;
- sparse tensor cores (cuSPARSELt / CUTLASS, for comparison): the same bytes, the FLOPs at the
  2:4 sparse peak (twice dense).
- quantized 2:4 (``backends/triton/quant_gemm.py``, M <= 16): W read as int8 or int4 codes of the
  kept half (1/2 or 1/4 byte per weight), 2-bit indices (1/8 byte per weight) and fp32 scales
  (4 bytes per row, or per row and group of g input features); x and y in fp16.
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass

from .cases import GEMM_M, MODEL_SHAPES

FP16 = 2  # bytes


@dataclass(frozen=True)
class Gpu:
    name: str
    bandwidth: float  # bytes/s
    dense_peak: float  # FLOP/s, fp16 tensor cores, dense
    sparse_peak: float  # FLOP/s, fp16 tensor cores, 2:4


GPUS = (
    Gpu("A100-40GB", 1.56e12, 312e12, 624e12),
    Gpu("H100 SXM", 3.35e12, 990e12, 1980e12),
)


def traffic(m: int, n: int, k: int) -> dict:
    """Bytes and FLOPs of one product ``[m, k] @ [n, k].T``."""
    activations = FP16 * (m * k + m * n)
    return dict(
        flops=2 * m * n * k,
        dense_bytes=activations + FP16 * n * k,
        sparse_bytes=activations + FP16 * n * k // 2 + n * k // 2 * 2 // 8,  # values + 2-bit indices
    )


# Decode-size shapes for the quantized GEMM: a 7-8B decoder's 4096x4096, SmolLM2-135M (hidden 576,
# MLP 1536, 3 key/value heads of 64) and BERT-base; every one a multiple of tiled_q's 16x64 tile.
QUANT_SHAPES = {
    "decoder-8b.attn-qo": (4096, 4096),
    "smollm2-135m.attn-q": (576, 576),
    "smollm2-135m.attn-kv": (192, 576),
    "smollm2-135m.mlp-up": (1536, 576),
    "smollm2-135m.mlp-down": (576, 1536),
    "bert-base.attn": (768, 768),
    "bert-base.ffn-up": (3072, 768),
    "bert-base.ffn-down": (768, 3072),
}
QUANT_M = (1, 4, 16)
# (label, bits, group size): what the bytes bound is computed for
ENCODINGS = (("int8 2:4", 8, None), ("int4 2:4", 4, None), ("int4 2:4 g128", 4, 128))
SCALE = 4  # bytes, fp32


def weight_bytes(n: int, k: int, bits: int | None = None, group: int | None = None) -> float:
    """Bytes of W [n, k]: fp16 dense (bits None), else 2:4 codes + 2-bit indices + fp32 scales."""
    if bits is None:
        return FP16 * n * k
    groups = 1 if group is None else -(-k // group)
    return n * k // 2 * bits / 8 + n * k // 2 * 2 / 8 + SCALE * n * groups


def quant_rows(gpu: Gpu):
    """Bytes read per GEMM and the bound speed-up over dense fp16 of each encoding, at decode sizes."""
    for layer, (n, k) in QUANT_SHAPES.items():
        for m in QUANT_M:
            activations = FP16 * (m * k + m * n)
            flops = 2 * m * n * k
            dense_bytes = activations + weight_bytes(n, k)
            dense, bound = seconds(dense_bytes, flops, gpu.bandwidth, gpu.dense_peak)
            row = dict(layer=f"{layer} {n}x{k}", m=m, dense_mb=dense_bytes / 1e6, dense_us=dense * 1e6, bound=bound)
            for label, bits, group in ENCODINGS:
                nbytes = activations + weight_bytes(n, k, bits, group)
                t, t_bound = seconds(nbytes, flops, gpu.bandwidth, gpu.dense_peak)
                row[label] = dict(mb=nbytes / 1e6, us=t * 1e6, speedup=dense / t, bound=t_bound)
            yield row


def seconds(nbytes: float, flops: float, bandwidth: float, peak: float) -> tuple[float, str]:
    memory, compute = nbytes / bandwidth, flops / peak
    return max(memory, compute), ("memory" if memory >= compute else "compute")


def rows(gpu: Gpu):
    for layer, (n, k) in MODEL_SHAPES.items():
        for m in GEMM_M:
            t = traffic(m, n, k)
            dense, dense_bound = seconds(t["dense_bytes"], t["flops"], gpu.bandwidth, gpu.dense_peak)
            ours, ours_bound = seconds(t["sparse_bytes"], t["flops"], gpu.bandwidth, gpu.dense_peak)
            stc, stc_bound = seconds(t["sparse_bytes"], t["flops"], gpu.bandwidth, gpu.sparse_peak)
            yield dict(layer=f"{layer} {n}x{k}", m=m, gflop=t["flops"] / 1e9,
                       dense_mb=t["dense_bytes"] / 1e6, sparse_mb=t["sparse_bytes"] / 1e6,
                       dense_us=dense * 1e6, dense_bound=dense_bound,
                       ours_us=ours * 1e6, ours_speedup=dense / ours,
                       stc_us=stc * 1e6, stc_speedup=dense / stc, stc_bound=stc_bound)


def markdown() -> str:
    out = [
        "# Roofline: dense fp16 vs 2:4 fp16 linear layers",
        "",
        "Generated by `python -m benchmarks.roofline --write`; do not edit by hand. A paper model",
        "(no GPU measured): time = max(bytes / bandwidth, FLOPs / peak), each operand moved once.",
        "`triton 2:4` is this package's GEMM (9/16 of the weight bytes, dense tensor-core FLOPs);",
        "`sparse TC` is a Sparse Tensor Core kernel (cuSPARSELt) at the 2:4 peak, for comparison.",
        "Speed-ups are predicted dense time / sparse time; the weight-bytes bound is 16/9 = 1.78x.",
        "",
    ]
    for gpu in GPUS:
        table = list(rows(gpu))
        ridge = gpu.dense_peak / gpu.bandwidth
        out += [
            f"## {gpu.name}: {gpu.bandwidth / 1e12:.2f} TB/s, {gpu.dense_peak / 1e12:.0f} TFLOP/s dense, "
            f"{gpu.sparse_peak / 1e12:.0f} TFLOP/s 2:4 (ridge {ridge:.0f} FLOP/byte)",
            "",
            "| layer (out x in) | M | GFLOP | dense MB | 2:4 MB | dense us | bound | triton 2:4 us | speed-up "
            "| sparse TC us | speed-up | bound |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for r in table:
            out.append(
                f"| {r['layer']} | {r['m']} | {r['gflop']:.3g} | {r['dense_mb']:.2f} | {r['sparse_mb']:.2f} "
                f"| {r['dense_us']:.2f} | {r['dense_bound']} | {r['ours_us']:.2f} | {r['ours_speedup']:.2f}x "
                f"| {r['stc_us']:.2f} | {r['stc_speedup']:.2f}x | {r['stc_bound']} |"
            )
        wins = [r for r in table if r["ours_speedup"] > 1.05]
        largest = {}
        for r in wins:
            largest[r["layer"]] = max(largest.get(r["layer"], 0), r["m"])
        out += ["", f"Where the Triton 2:4 GEMM should win on {gpu.name} (predicted > 1.05x): "
                + "; ".join(f"{layer} up to M={m}" for layer, m in largest.items()) + ".", ""]
    out += [
        "Reading: at M <= 64 (decoding) every layer is memory-bound, time follows the weight bytes",
        "and the 2:4 GEMM should approach 1.78x. As M grows the activations' bytes dilute the",
        "saving, and past the ridge point the layer is compute-bound: the Triton kernel, which",
        "multiplies the expanded tile on dense tensor cores, then predicts 1.0x at best (in practice",
        "below, by the expansion cost), and only Sparse Tensor Cores (cuSPARSELt) can approach 2x.",
        "These are limits, not measurements: the Triton kernel loads each kept value with a gathered",
        "(not vectorised) load, which may keep it off the bandwidth roof; `tests/test_triton_gpu.py`",
        "times it against dense cuBLAS on a GPU.",
        "",
    ]
    return "\n".join(out + quant_markdown()) + "\n"


def quant_markdown() -> list[str]:
    gpu = GPUS[-1]
    out = [
        "# Roofline: quantized 2:4 (W8A16 / W4A16, `tiled_q` Triton GEMM) vs dense fp16 at decode sizes",
        "",
        "Bytes read per GEMM `y = x @ W.T` (x, y fp16): dense fp16 W is 2 bytes per weight; 2:4 keeps half",
        "of W as int8 or int4 codes (1/2 or 1/4 byte per weight) with 2-bit indices (1/8 byte per weight)",
        "and fp32 scales (one per row, or per row and 128 input features). At M <= 16 every row is",
        "memory-bound on both GPUs, so the bound speed-up is the ratio of bytes and does not depend on",
        f"the GPU; times are for the {gpu.name} ({gpu.bandwidth / 1e12:.2f} TB/s). Weight bytes alone: int8 2:4",
        f"{weight_bytes(4096, 4096) / weight_bytes(4096, 4096, 8):.2f}x, int4 2:4 "
        f"{weight_bytes(4096, 4096) / weight_bytes(4096, 4096, 4):.2f}x, int4 2:4 g128 "
        f"{weight_bytes(4096, 4096) / weight_bytes(4096, 4096, 4, 128):.2f}x fewer than fp16 at 4096x4096 "
        "(fp16 2:4: 1.78x).",
        "",
        "| layer (out x in) | M | dense fp16 MB | " + " | ".join(f"{label} MB" for label, _, _ in ENCODINGS)
        + " | dense us | " + " | ".join(f"{label} us | bound speed-up" for label, _, _ in ENCODINGS) + " |",
        "|---|---:|" + "---:|" * (2 + 3 * len(ENCODINGS)),
    ]
    for r in quant_rows(gpu):
        assert r["bound"] == "memory" and all(r[label]["bound"] == "memory" for label, _, _ in ENCODINGS)
        out.append(
            f"| {r['layer']} | {r['m']} | {r['dense_mb']:.3f} | "
            + " | ".join(f"{r[label]['mb']:.3f}" for label, _, _ in ENCODINGS)
            + f" | {r['dense_us']:.2f} | "
            + " | ".join(f"{r[label]['us']:.2f} | {r[label]['speedup']:.2f}x" for label, _, _ in ENCODINGS) + " |"
        )
    out += [
        "",
        "Reading: the int4 2:4 bound is about 5.3x at per-row scales and 4.9x with a scale per 128",
        "inputs (the scales are 1/64 of the fp16 bytes); the activations' bytes lower it at small",
        "layers (SmolLM2's 192x576 k/v projections) and as M grows. A kernel reaches it only when it",
        "streams the codes at full bandwidth: `tiled_q` stores each 16-row block contiguously so that",
        "the codes load as 128-bit vectors, and the decoding (nibbles, positions, scales) must hide",
        "under the loads. The model leaves out the launch: a kernel launch costs a few microseconds,",
        "more than the bytes of every SmolLM2 and BERT layer here, so at those sizes the gain shows",
        "only in CUDA graphs or with layers fused. Measured: to run on a GPU server",
        "(`benchmarks/gpu/test_bench_quant_gemm.py`).",
    ]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write benchmarks/ROOFLINE.md")
    args = parser.parse_args(argv)
    text = markdown()
    if args.write:
        path = pathlib.Path(__file__).with_name("ROOFLINE.md")
        path.write_text(text)
        print(f"wrote {path}")
    else:
        print(text)


if __name__ == "__main__":
    main()
