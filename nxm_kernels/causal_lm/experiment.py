"""The causal-LM experiment: one-shot 2:4 pruning of every decoder Linear by each method, then
perplexity on held-out plays, served through ``SparseLinear`` and saved compact.

Results go to a JSON file (and a markdown table beside it) row by row: each method's row is
written as soon as it finishes, and a rerun skips the rows the file already has, so a long run
can be completed across sessions. Rows are only comparable under the same settings, so a rerun
with other settings is refused.
"""

from __future__ import annotations

import copy
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import nxm_kernels as nxm

from . import data
from .model import checkpoint_bytes, generate, mean_by_type, perplexity, reconstruction_errors, serve_sparse

# Rows: a prune method, or a method with a quantization grid (prune's weight_bits/group_size).
GRIDS = {"sparsegpt+int4g128": ("sparsegpt", {"weight_bits": 4, "group_size": 128}),
         "admm+int4g128": ("admm", {"weight_bits": 4, "group_size": 128})}
METHODS = ("magnitude", "wanda", "sparsegpt", "admm", *GRIDS)
LAYER_TYPES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Settings:
    """What a row depends on. The defaults fit all methods in an hour on 2 CPU cores."""

    pattern: str = "2:4"
    context: int = 512  # tokens per window, calibration and evaluation alike
    calibration_windows: int = 64  # 32,768 tokens: H = X^T X of a 1536-wide layer is well determined
    calibration_batch: int = 8  # windows per calibration input
    eval_windows: int = 40  # 20,480 held-out tokens, evenly spread over the four held-out plays
    eval_batch: int = 4
    error_windows: int = 4  # held-out windows on which each layer's reconstruction error is measured
    check_tokens: int = 128  # tokens of the sparse-vs-masked-dense logits check (SparseLinear is slow on CPU)
    new_tokens: int = 30  # greedy generation length
    seed: int = 0  # calibration window positions
    eval_plays: tuple[str, ...] = data.EVAL_PLAYS
    options: dict = field(default_factory=dict, hash=False)  # per-method keyword arguments of prune


QUICK = dict(context=64, calibration_windows=4, calibration_batch=2, eval_windows=4, eval_batch=2, error_windows=2,
             check_tokens=32, new_tokens=8)


def _jsonable(settings: Settings) -> dict:
    return json.loads(json.dumps(asdict(settings)))


class Results:
    """The JSON file: top-level perplexities ``dense`` and one per method, details under ``rows``."""

    def __init__(self, path: Path | None, settings: Settings, info: dict):
        self.path = path
        self.doc = {"settings": _jsonable(settings), **info, "rows": {}}
        if path is not None and path.exists():
            stored = json.loads(path.read_text())
            if stored.get("settings") != self.doc["settings"]:
                raise SystemExit(
                    f"{path} was measured with other settings ({stored.get('settings')}); rows are only comparable "
                    "under one set: pass --out to write elsewhere, or delete the file to start again"
                )
            self.doc = stored

    def has(self, key: str) -> bool:
        return key in self.doc["rows"]

    def add(self, key: str, row: dict, perplexity_value: float) -> None:
        self.doc[key] = perplexity_value
        self.doc["rows"][key] = row
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.doc, indent=1) + "\n")
            self.path.with_suffix(".md").write_text(markdown(self.doc))

    def set(self, key: str, value) -> None:
        self.doc[key] = value


def markdown(doc: dict) -> str:
    """The results as a markdown table, with the generations and checkpoint bytes below it."""
    s = doc["settings"]
    rows = doc["rows"]
    lines = [
        f"# SmolLM2-135M-Instruct, one-shot {s['pattern']} on every decoder Linear",
        "",
        f"Held-out perplexity on {', '.join(s['eval_plays'])} ({s['eval_windows']} windows of {s['context']} tokens); "
        f"calibration: {s['calibration_windows']} random windows of the other plays (seed {s['seed']}).",
        f"Relative reconstruction error ||X(W-W0)^T||^2/||XW0^T||^2, mean over the layers of each type, on "
        f"{s['error_windows']} held-out windows. Minutes: wall time of the pruning (CPU minutes of the process in "
        "brackets: other jobs shared the machine).",
        "",
        "| method | perplexity | x dense | prune min | " + " | ".join(LAYER_TYPES) + " |",
        "|---|---|---|---|" + "---|" * len(LAYER_TYPES),
    ]
    dense = doc.get("dense")
    for key in ("dense",) + METHODS:
        if key not in rows:
            continue
        row = rows[key]
        errors = row.get("reconstruction_error", {})
        ratio = f"{doc[key] / dense:.2f}" if dense else "–"
        minutes = f"{row['prune_minutes']:.1f} ({row['prune_cpu_minutes']:.1f})" if "prune_minutes" in row else "–"
        cells = " | ".join(f"{errors[t]:.3f}" if t in errors else "–" for t in LAYER_TYPES)
        lines.append(f"| {key} | {doc[key]:.2f} | {ratio} | {minutes} | {cells} |")
    lines += ["", f"Greedy continuation of {json.dumps(doc.get('prompt', ''))}:", ""]
    for key in ("dense",) + METHODS:
        if key in rows and "generation" in rows[key]:
            served = " (served through SparseLinear)" if key != "dense" else ""
            lines.append(f"- {key}{served}: {json.dumps(rows[key]['generation'])}")
    ckpt = doc.get("checkpoint")
    if ckpt:
        lines += ["", f"Checkpoint bytes (nxm.save): dense {ckpt['dense']:,}, {s['pattern']} {ckpt['sparse']:,} "
                  f"({ckpt['ratio']:.1%}; embeddings and lm_head stay dense)."]
    for key in METHODS:
        if key in rows and "checkpoint" in rows[key]:
            ckpt = rows[key]["checkpoint"]
            lines.append(f"{key}: {ckpt['sparse']:,} ({ckpt['ratio']:.1%} of dense).")
    lines += ["", f"Command: `{doc.get('command', '')}`; torch threads {doc.get('threads')}."]
    return "\n".join(lines) + "\n"


def run(model: nn.Module, tokenizer, plays: dict[str, str], settings: Settings, methods=METHODS,
        out: Path | None = None, info: dict | None = None, log=print) -> dict:
    """Measure dense and each method in ``methods`` (skipping rows ``out`` already has).

    ``info`` (the command, thread count, versions) is stored at the top level and in every new
    row, since rows may come from different sessions.
    """
    from ..training import prune

    from .model import PROMPT

    info = info or {}
    results = Results(out, settings, {"prompt": PROMPT, **info})
    results.doc.update(info)
    calibration_plays, held_out = data.split_plays(plays, settings.eval_plays)
    calibration_ids = data.tokenize(tokenizer, [plays[p] for p in calibration_plays])
    eval_ids = data.tokenize(tokenizer, [plays[p] for p in held_out])
    results.set("tokens", {"calibration_plays": calibration_ids.numel(), "held_out_plays": eval_ids.numel()})
    results.set("calibration_plays", calibration_plays)
    windows = data.eval_windows(eval_ids, settings.context, settings.eval_windows)
    error_windows = windows[:: max(1, len(windows) // settings.error_windows)][: settings.error_windows]
    check_window = windows[0, : settings.check_tokens]
    calibration = data.calibration_windows(calibration_ids, settings.context, settings.calibration_windows, settings.seed)
    batches = list(calibration.split(settings.calibration_batch))
    log(f"text: {calibration_ids.numel():,} calibration tokens, {eval_ids.numel():,} held-out tokens; "
        f"{len(windows)} eval windows of {settings.context}")

    if not results.has("dense"):
        start = time.perf_counter()
        value = perplexity(model, windows, settings.eval_batch)
        row = {"eval_minutes": (time.perf_counter() - start) / 60,
               "generation": generate(model, tokenizer, settings.new_tokens), **info}
        log(f"dense: perplexity {value:.3f}")
        results.add("dense", row, value)

    for method in methods:
        if results.has(method):
            log(f"{method}: already in {out}, skipped")
            continue
        pruned = copy.deepcopy(model)
        options = settings.options.get(method, {})
        base, grid = GRIDS.get(method, (method, {}))
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            report = prune(pruned, settings.pattern, method=base,
                           calibration=None if base == "magnitude" else batches, **grid, **options)
        except (ValueError, TypeError, NotImplementedError) as e:
            log(f"{method}: not run: {e}")
            continue
        prune_minutes, prune_cpu_minutes = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
        targets = list(report.layers)
        dense_weights = {name: model.get_submodule(name).weight.detach() for name in targets}
        start = time.perf_counter()
        value = perplexity(pruned, windows, settings.eval_batch)
        eval_minutes = (time.perf_counter() - start) / 60
        errors = reconstruction_errors(pruned, dense_weights, error_windows, settings.eval_batch)
        exact = all(nxm.is_nm_sparse(pruned.get_submodule(n).weight, settings.pattern) for n in targets)
        sparse_model, check = serve_sparse(pruned, settings.pattern, targets, check_window)
        row = {
            "prune_minutes": prune_minutes,
            "prune_cpu_minutes": prune_cpu_minutes,
            "seed": settings.seed,
            "eval_minutes": eval_minutes,
            "options": options,
            "layers_pruned": len(targets),
            "layers_left_dense": sorted(report.skipped),
            "exact_pattern": exact,
            "reconstruction_error": mean_by_type(errors),
            "reconstruction_error_per_layer": errors,
            "calibration_error": mean_by_type({n: r.error for n, r in report.layers.items() if r.error is not None}),
            "sparse_check": check,
            "generation": generate(sparse_model, tokenizer, settings.new_tokens),
            **info,
        }
        # The bytes depend on the encoding only: measured once for the float rows, and in each grid row.
        if grid:
            row.update(grid=grid, checkpoint=checkpoint_bytes(sparse_model, model, check_window))
        elif "checkpoint" not in results.doc:
            results.set("checkpoint", checkpoint_bytes(sparse_model, model, check_window))
        log(f"{method}: perplexity {value:.3f} (dense {results.doc['dense']:.3f}), pruning {prune_minutes:.1f} min, "
            f"sparse == masked dense: {check['sparse_equals_masked_dense']}")
        results.add(method, row, value)
        del pruned, sparse_model
    return results.doc


def environment(threads: int, command: str) -> dict:
    return {"command": command, "threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}
