"""One-shot (post-training, before any quantization-aware training) 2:4 conversion of a fine-tuned
model, with the kept weights as they are, as int8 codes per row, and as int4 codes in groups of
128: the accuracy of each beside the bytes of its converted weights. The demo's ``--quantized``
option runs it on the fine-tuned MiniLM (``nxm_kernels.demo``)."""

from __future__ import annotations

from typing import Callable

from torch import nn

from . import nn as nxm_nn

# (label, weight_bits, group_size)
VARIANTS = (("2:4 fp", None, None), ("2:4 int8 per row", 8, None), ("2:4 int4 g128", 4, 128))


def one_shot_rows(make_dense: Callable[[], nn.Module], accuracy: Callable[[nn.Module], float], pattern="2:4",
                  variants=VARIANTS) -> list[dict]:
    """For each variant: a fresh dense model from ``make_dense``, converted by ``sparsify`` (magnitude
    selection, the default layers), its ``accuracy`` and the bytes of the converted weights (codes or
    values, metadata, scales) against the same layers dense."""
    rows = []
    for label, bits, group_size in variants:
        model = make_dense()
        report = nxm_nn.sparsify(model, pattern, weight_bits=bits, group_size=group_size)
        layers = [m for m in model.modules() if isinstance(m, nxm_nn.SparseLinear)]
        stored = sum(layer.weight_sparse.nbytes for layer in layers)
        dense = sum(layer.in_features * layer.out_features * layer.weight_sparse.dtype.itemsize for layer in layers)
        rows.append({
            "variant": label, "accuracy": accuracy(model), "layers": len(layers), "weight_bytes": stored,
            "dense_weight_bytes": dense, "max_quant_error": max(report.quant_error.values(), default=0.0),
        })
    return rows


def table(rows: list[dict], dense_accuracy: float) -> str:
    lines = ["| variant | test accuracy | weight bytes (converted layers) | of dense | max layer quantization error |",
             "|---|---|---|---|---|", f"| dense | {dense_accuracy:.4f} | | 100% | |"]
    for row in rows:
        error = f"{row['max_quant_error']:.2e}" if row["max_quant_error"] else "-"
        lines.append(f"| {row['variant']} | {row['accuracy']:.4f} | {row['weight_bytes']:,} | "
                     f"{row['weight_bytes'] / row['dense_weight_bytes']:.1%} | {error} |")
    return "\n".join(lines)
