"""Peak memory of converting a stack of 7-8B-decoder-shaped layers on CPU, in a fresh process.

Run by ``test_bench_memory.py`` (``python -m benchmarks.memory_probe --layers N``); prints one
JSON line. The process builds the dense stack, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), converts every Linear through ``nxm.sparsify`` (in place, as a user
converting a checkpoint would; ``--method swap``: one layer at a time by hand, the streaming
reference), and reads the peak back: ``peak - dense`` is what conversion
needed beyond the dense model. Conversion streams when that stays at one layer's working set
however many layers the stack has.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import nxm_kernels as nxm

# One decoder block of a 7-8B model (Llama-3-8B / Mistral-7B): (out_features, in_features).
DECODER_BLOCK = {
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM (peak RSS) to the current RSS


def build_stack(layers: int, dtype: torch.dtype) -> nn.Module:
    stack = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        for name, (out_features, in_features) in DECODER_BLOCK.items():
            linear = nn.Linear(in_features, out_features, bias=False, device="meta", dtype=dtype)
            linear.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype).normal_(),
                                         requires_grad=False)
            setattr(block, name, linear)
        stack.append(block)
    return stack


def swap_layer_by_layer(model: nn.Module, pattern: str) -> int:
    converted = 0
    for block in model:
        for name in [name for name, _ in block.named_children()]:
            setattr(block, name, nxm.SparseLinear.from_dense(getattr(block, name), pattern))
            converted += 1
    return converted


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--method", default="sparsify", choices=("sparsify", "swap"),
                        help="sparsify: nxm.sparsify(model) in place; swap: replace one Linear at a time with "
                        "SparseLinear.from_dense, holding no reference to the old one (the streaming reference)")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    rss_start = status_kib("VmRSS")
    model = build_stack(args.layers, dtype)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_dense = status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    if args.method == "sparsify":
        report = nxm.sparsify(model, args.pattern)
        converted, skipped = len(report.converted), report.skipped
    else:
        converted, skipped = swap_layer_by_layer(model, args.pattern), {}
    seconds = time.perf_counter() - start
    result = {
        "method": args.method, "layers": args.layers, "dtype": args.dtype, "pattern": args.pattern,
        "linears": converted, "skipped": skipped,
        "dense_bytes": dense_bytes, "sparse_bytes": sum(t.numel() * t.element_size() for t in model.buffers()),
        "largest_linear_bytes": max(o * i for o, i in DECODER_BLOCK.values()) * dtype.itemsize,
        "rss_start_bytes": rss_start * 1024, "rss_dense_bytes": rss_dense * 1024,
        "rss_peak_bytes": status_kib("VmHWM") * 1024, "rss_after_bytes": status_kib("VmRSS") * 1024,
        "seconds": seconds,
        "compress_backend": nxm.dispatch.select("compress", None, {"w": torch.empty(8, 8, dtype=dtype)}).name,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
