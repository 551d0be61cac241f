"""NxMiFormer on the package's harness: quantization-aware N:M training (magnitude, SR-STE, ADMM)
at uniform 2:4 int8, uniform 2:4 int4 g128, and per-layer plans searched for 87.5% and 93%.

all-MiniLM-L6-v2 on a harness task (``--task``), the protocol of ``nxm_kernels.harness.Config``
(dense phase shared by every row of a seed, then sparsify and fine-tune phases) with every sparse
method training through ``fake_quant`` (``Config.weight_bits``/``plan``), optionally distilling
the dense model's logits and block outputs. The plans are searched on the dense-phase model of
each seed (``nxm_kernels.training.search``, calibration: the first training sentences).

Writes ``<out>/<name>.json`` and ``<name>.md`` after every row and skips the (config, method,
seed) rows the JSON already holds, so an interrupted run resumes. The JSON's ``configs`` list
has one entry per (config, method): name, method, compression (value bits against fp32, as the
paper counts), compression_actual (stored bytes, metadata and scales included), accuracy (mean
over seeds), dense_accuracy, retention (accuracy / dense accuracy), seeds and minutes.

    python experiments/nxmiformer.py                       # every row, seed 0
    python experiments/nxmiformer.py --quick               # a tiny BERT on made-up sentences (a test)
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nxm_kernels import harness
from nxm_kernels.harness.protocol import Config, Protocol, build
from nxm_kernels.plan import parse_config
from nxm_kernels.training.common import select_linears
from nxm_kernels.training.search import compression, search

HERE = Path(__file__).resolve().parent
METHODS = ("magnitude", "srste", "admm")
# name -> a uniform configuration, or the compression target of a searched plan
CONFIGS = {"2:4 int8": "2:4 int8", "2:4 int4 g128": "2:4 int4 g128", "search 87.5%": 0.875, "search 93%": 0.93}
CANDIDATES = ("2:4 fp", "2:4 int8", "2:4 int4 g128", "1:4 int8", "1:4 int4 g128")
GOALS = {0.875: 0.995, 0.93: 0.982}  # the paper's retention at these compressions


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(harness.TASKS), default="sentiment")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--configs", default=";".join(CONFIGS), help=f"';'-separated subset of {';'.join(CONFIGS)}")
    p.add_argument("--distill", type=float, default=0.5, help="weight of logit distillation (default 0.5)")
    p.add_argument("--distill-hidden", type=float, default=1.0, help="weight of block-output distillation")
    p.add_argument("--train-size", type=int, default=None, help="training sentences (default: the harness's)")
    p.add_argument("--name", default="nxmiformer", help="results file stem")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="a tiny BERT on made-up sentences: checks the runner")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def _quick_inputs():
    """A tiny BERT built from a config and a word tokenizer on made-up sentences (no download)."""
    import transformers

    words = ["good", "great", "fine", "bad", "awful", "dull", "the", "film", "was", "a", "plot"]

    class WordTokenizer:
        pad_token_id = 0

        def __call__(self, texts, truncation, max_length):
            return {"input_ids": [[1] + [2 + words.index(w) for w in t.split()][: max_length - 1] for t in texts]}

    def sentences(n, seed):
        rng = random.Random(seed)
        texts, labels = [], []
        for _ in range(n):
            label = rng.random() < 0.5
            chosen = rng.choices(words[6:], k=4) + [rng.choice(words[:3] if label else words[3:6])]
            rng.shuffle(chosen)
            texts.append(" ".join(chosen))
            labels.append(int(label))
        return texts, labels

    def encoder():
        config = transformers.BertConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16)
        return transformers.BertModel(config, add_pooling_layer=False)

    cfg = Config(train_size=96, test_size=64, batch_size=16, max_length=8, lr=1e-3, calibration_size=32)
    return (*sentences(96, 0), *sentences(64, 1), encoder, WordTokenizer()), cfg


def _real_inputs(task, train_size):
    tokenizer, _ = harness.load_minilm()
    cfg = Config() if train_size is None else Config(train_size=train_size)
    return (*harness.load_task(task), lambda: harness.load_minilm()[1], tokenizer), cfg


def _plan_for(protocol, config, seed, log):
    """(plan as JSON dicts, compression by value bits, by bytes, search seconds) on the dense-phase model."""
    model, _, _ = build(protocol.snapshot[0], protocol.cfg, protocol.load_encoder, protocol.total, protocol.num_labels)
    start = time.perf_counter()
    if isinstance(config, str):
        targets, _ = select_linears(model, "2:4")
        plan = {name: parse_config(config) for name in targets}
    else:
        result = search(model, CANDIDATES, protocol.calibration(), config, seed=seed)
        log(f"seed {seed} plan for {config:.1%}: {result}")
        plan = result.plan
    by_bits, by_bytes = compression(model, plan)
    return {n: c.as_dict() for n, c in plan.items()}, by_bits, by_bytes, time.perf_counter() - start


def summarize(runs):
    """One entry per (config, method): the mean over its seeds."""
    entries = {}
    for run in runs:
        entries.setdefault((run["name"], run["method"]), []).append(run)
    configs = []
    for (name, method), rows in entries.items():
        accuracy = sum(r["accuracy"] for r in rows) / len(rows)
        dense = sum(r["dense_accuracy"] for r in rows) / len(rows)
        target = CONFIGS.get(name)
        configs.append({
            "name": name, "method": method,
            "compression": sum(r["compression"] for r in rows) / len(rows),
            "compression_actual": sum(r["compression_actual"] for r in rows) / len(rows),
            "accuracy": accuracy, "dense_accuracy": dense, "retention": accuracy / dense,
            "goal_retention": GOALS.get(target) if isinstance(target, float) else None,
            "seeds": [r["seed"] for r in rows], "accuracy_per_seed": [r["accuracy"] for r in rows],
            "minutes": round(sum(r["minutes"] for r in rows), 2),
            "exact": all(r["exact"] for r in rows),
        })
    return configs


def write(path: Path, record: dict) -> None:
    record["configs"] = summarize(record["runs"])
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    lines = [f"# NxMiFormer: quantization-aware N:M training ({record['task']})", "",
             f"`{record['command']}`", "",
             "| config | method | compression (value bits) | compression (bytes) | accuracy | dense | retention "
             "| goal | seeds | minutes |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["configs"]:
        goal = "" if c["goal_retention"] is None else f"{c['goal_retention']:.3f}"
        lines.append(f"| {c['name']} | {c['method']} | {c['compression']:.2%} | {c['compression_actual']:.2%} | "
                     f"{c['accuracy']:.4f} | {c['dense_accuracy']:.4f} | {c['retention']:.4f} | {goal} | "
                     f"{','.join(map(str, c['seeds']))} | {c['minutes']:.1f} |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else print
    inputs, cfg = _quick_inputs() if args.quick else _real_inputs(args.task, args.train_size)
    cfg = replace(cfg, distill=args.distill, distill_hidden=args.distill_hidden)
    methods = [m for m in args.methods.split(",") if m]
    names = [c for c in args.configs.split(";") if c]
    unknown = [m for m in methods if m not in METHODS] + [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown methods or configs: {unknown}; choose from {METHODS} and {list(CONFIGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    record.update(task="quick" if args.quick else args.task, candidates=list(CANDIDATES),
                  command=" ".join(shlex.quote(a) for a in ["python", "experiments/nxmiformer.py", *sys.argv[1:]]),
                  protocol={k: v for k, v in vars(cfg).items() if k != "plan"})
    done = {(r["name"], r["method"], r["seed"]) for r in record["runs"]}
    protocol = Protocol(*inputs, cfg, quiet=args.quiet)
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [(n, m) for n in names for m in methods if (n, m, seed) not in done]
        if not todo:
            continue
        dense_acc, dense_seconds = protocol.dense_phase(seed)
        log(f"seed {seed}: dense accuracy {dense_acc:.4f} ({dense_seconds:.0f} s)")
        for name in dict.fromkeys(n for n, _ in todo):
            plan, by_bits, by_bytes, search_seconds = _plan_for(protocol, CONFIGS[name], seed, log)
            for method in (m for n, m in todo if n == name):
                protocol.cfg = replace(cfg, plan=plan)
                _, _, row = protocol.sparse_run(method)
                protocol.cfg = cfg
                run = {"name": name, "method": method, "seed": seed, "compression": by_bits,
                       "compression_actual": by_bytes, "accuracy": row["acc"], "dense_accuracy": dense_acc,
                       "acc_at_prune": row.get("acc_at_prune"), "exact": bool(row["exact_nm"]),
                       "minutes": (row["seconds"] - dense_seconds + search_seconds) / 60,
                       "dense_minutes": dense_seconds / 60, "plan": plan}
                record["runs"].append(run)
                write(path, record)
                log(f"seed {seed} {name} {method}: accuracy {run['accuracy']:.4f}, retention "
                    f"{run['accuracy'] / dense_acc:.4f}, compression {by_bits:.2%} ({by_bytes:.2%} in bytes)")
    if not path.exists():
        write(path, record)
    return record


if __name__ == "__main__":
    main()
