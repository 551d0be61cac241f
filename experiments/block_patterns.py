"""Block patterns on the package's harness: row 2:4, transposable 2:4t, 8-of-4x4 blocks and a
library of 8 4x4 masks, each trained with magnitude (one-shot + masked fine-tuning), SR-STE, ADMM
and ADMM then SR-STE (ADMM pattern pruning, arXiv 2407.08334: ADMM, hard prune, SR-STE retraining).

all-MiniLM-L6-v2 on a harness task (``--task``), the protocol of ``nxm_kernels.harness.Config``:
the dense phase is shared by every row of a seed; ``dense`` keeps training dense for the same
budget and is the reference of every retention. Per row: accuracy, retention against dense, the
mask agreement with one-shot magnitude (the share of kept weights that magnitude keeps too), and
minutes.

Writes ``<out>/<name>.json`` and ``<name>.md`` after every row and skips the (kind, method, seed)
rows the JSON already holds, so an interrupted run resumes.

    python experiments/block_patterns.py --train-size 2000 --seeds 0,1
    python experiments/block_patterns.py --quick            # a tiny BERT on made-up sentences (a test)
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from nxm_kernels import harness
from nxm_kernels.harness.protocol import Protocol

HERE = Path(__file__).resolve().parent
# Each mask keeps 8 of 16: the six 4x4 blocks whose rows all keep the same 2 columns, and the two
# checkerboards (hex, row-major, first entry the most significant bit; see Pattern.library).
LIBRARY = "4x4{cccc,3333,aaaa,5555,9999,6666,a5a5,5a5a}"
KINDS = {"2:4": "2:4", "2:4t": "2:4t", "8:4x4": "8:4x4", "library": LIBRARY}
METHODS = {"magnitude": "magnitude", "srste": "srste", "admm": "admm", "admm+srste": "admm[retrain=srste]"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(harness.TASKS), default="sentiment")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default: 0,1)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--train-size", type=int, default=None, help="training sentences (default: the harness's)")
    p.add_argument("--name", default="block_patterns", help="results file stem")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="a tiny BERT on made-up sentences: checks the runner")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def summarize(runs):
    """One entry per (kind, method): the mean over its seeds, retention paired with dense by seed."""
    dense = {r["seed"]: r["accuracy"] for r in runs if r["method"] == "dense"}
    entries = {}
    for run in runs:
        if run["method"] != "dense":
            entries.setdefault((run["kind"], run["method"]), []).append(run)
    rows = [{"kind": "dense", "method": "dense", "accuracy": sum(dense.values()) / len(dense), "retention": 1.0,
             "agreement": None, "seeds": sorted(dense), "accuracy_per_seed": [dense[s] for s in sorted(dense)],
             "minutes": round(sum(r["minutes"] for r in runs if r["method"] == "dense"), 2), "exact": True}] if dense else []
    for (kind, method), group in entries.items():
        paired = [r for r in group if r["seed"] in dense]
        rows.append({
            "kind": kind, "method": method,
            "accuracy": sum(r["accuracy"] for r in group) / len(group),
            "retention": sum(r["accuracy"] / dense[r["seed"]] for r in paired) / len(paired) if paired else None,
            "agreement": sum(r["agreement"] for r in group) / len(group),
            "seeds": [r["seed"] for r in group], "accuracy_per_seed": [r["accuracy"] for r in group],
            "minutes": round(sum(r["minutes"] for r in group), 2),
            "exact": all(r["exact"] for r in group),
        })
    return rows


def write(path: Path, record: dict) -> None:
    record["rows"] = summarize(record["runs"])
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    lines = [f"# Block patterns ({record['task']}, {record['protocol']['train_size']} training sentences)", "",
             *(f"`{c}`" for c in record["commands"]), "",
             "| kind | method | accuracy | retention | agreement with magnitude | per seed | exact | minutes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        retention = "" if r["retention"] is None else f"{r['retention']:.4f}"
        agreement = "" if r["agreement"] is None else f"{r['agreement']:.1%}"
        per_seed = ", ".join(f"{a:.4f}" for a in r["accuracy_per_seed"])
        lines.append(f"| {r['kind']} | {r['method']} | {r['accuracy']:.4f} | {retention} | {agreement} | {per_seed} "
                     f"| {'yes' if r['exact'] else 'NO'} | {r['minutes']:.1f} |")
    lines += ["", f"Library: `{LIBRARY}`."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _inputs(args):
    if args.quick:  # the same tiny BERT and sentences as the NxMiFormer runner's check
        sys.path.insert(0, str(HERE))
        from nxmiformer import _quick_inputs

        return _quick_inputs()
    tokenizer, _ = harness.load_minilm()
    cfg = harness.Config() if args.train_size is None else harness.Config(train_size=args.train_size)
    return (*harness.load_task(args.task), lambda: harness.load_minilm()[1], tokenizer), cfg


def main(argv=None):
    args = parse_args(argv)
    log = (lambda *a: None) if args.quiet else print
    kinds = [k for k in args.kinds.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [k for k in kinds if k not in KINDS] + [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown kinds or methods: {unknown}; choose from {list(KINDS)} and {list(METHODS)}")
    inputs, cfg = _inputs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    record = json.loads(path.read_text()) if path.exists() else {"runs": []}
    command = " ".join(shlex.quote(a) for a in ["python", "experiments/block_patterns.py", *(argv or sys.argv[1:])])
    record.update(task="quick" if args.quick else args.task, library=LIBRARY,
                  protocol={k: v for k, v in vars(cfg).items() if k not in ("plan", "pattern")})
    record["commands"] = list(dict.fromkeys([*record.get("commands", []), command]))  # each run that added rows
    done = {(r["kind"], r["method"], r["seed"]) for r in record["runs"]}
    protocol = Protocol(*inputs, cfg, quiet=args.quiet)
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [("dense", "dense")] + [(k, m) for k in kinds for m in methods]
        todo = [(k, m) for k, m in todo if (k, m, seed) not in done]
        if not todo:
            continue
        dense_acc, dense_seconds = protocol.dense_phase(seed)
        log(f"seed {seed}: dense-phase accuracy {dense_acc:.4f} ({dense_seconds:.0f} s)")
        for kind, method in todo:
            protocol.cfg = replace(cfg, pattern=KINDS.get(kind, "2:4"))
            _, _, row = protocol.sparse_run(METHODS.get(method, "dense"))
            protocol.cfg = cfg
            run = {"kind": kind, "method": method, "seed": seed, "accuracy": row["acc"],
                   "agreement": None if method == "dense" else 1 - row["mask_moved"],
                   "acc_at_prune": row.get("acc_at_prune"), "exact": method == "dense" or bool(row["exact_nm"]),
                   "minutes": (row["seconds"] - dense_seconds) / 60, "dense_phase_minutes": dense_seconds / 60}
            record["runs"].append(run)
            write(path, record)
            log(f"seed {seed} {kind} {method}: accuracy {run['accuracy']:.4f}, agreement {run['agreement']}")
    if not path.exists():
        write(path, record)
    return record


if __name__ == "__main__":
    main()
