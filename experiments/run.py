"""The real-model experiment: does ADMM buy accuracy over one-shot pruning at 2:4?

all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes sentence sentiment (``--task sentiment``), on the
same sentences plus plot synopses (``--task reviews``, 3 labels) or on which group of
Shakespeare's plays a speech comes from (``--task shakespeare``, 6 labels), 2:4 on
all 36 encoder Linears, every method under one protocol (see ``nxm_kernels.harness.Config``),
several seeds. The defaults are the full protocol; flags shrink it. Each run writes, under
``--out`` (experiments/results/): ``<name>.json`` (config, per-seed rows, summary, command,
environment), ``<name>.md`` (the table and the exact command), and regenerates ``SUMMARY.md`` from
every JSON there, so no run is lost.

    python experiments/run.py                                   # full protocol, 3 seeds
    python experiments/run.py --train-size 2000 --seeds 0 --name calib   # a reduced budget
    python experiments/run.py --task shakespeare --methods 'dense;magnitude;sparsegpt;admm[init=sparsegpt]'
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path

import torch

from nxm_kernels import harness

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(harness.TASKS), default="sentiment", help="the data (default: sentiment)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    p.add_argument(
        "--methods",
        default=";".join(harness.METHODS),
        help=f"';'-separated subset of {';'.join(harness.METHODS)}; ADMM variants as "
        "'admm[penalty=loss,rho=1e-3,rho_factor=100,update_every=16]', ADMM from a one-shot mask as "
        "'admm[init=sparsegpt]' (default: all)",
    )
    p.add_argument("--name", default=None, help="results file stem (default: derived from the settings)")
    p.add_argument("--out", default=str(HERE / "results"), help="results directory")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'reduced budget')")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="run every (seed, method) again; by default a rerun keeps the rows that <name>.json already "
        "holds from a run of the same task and settings",
    )
    p.add_argument(
        "--dense-cache",
        default=None,
        help="directory that keeps each seed's dense-phase snapshot, so that runs split over several "
        "processes share it (e.g. experiments/.cache)",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="instead of training, merge finished runs of the same settings (seeds or methods run in "
        "separate processes) into one table named --name",
    )
    defaults = harness.Config()
    for f in fields(harness.Config):
        if f.name == "extra":
            continue
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name)
        )
    return p.parse_args(argv)


def paired_gap(results, method, reference):
    """Mean accuracy gap of ``method`` over ``reference`` on the seeds both ran, in points ("" if none)."""
    ref = {r["seed"]: r["acc"] for r in results if r["method"] == reference}
    gaps = [r["acc"] - ref[r["seed"]] for r in results if r["method"] == method and r["seed"] in ref]
    return f"{100 * sum(gaps) / len(gaps):+.2f} pt" if gaps and method != reference else ""


def _per_seed(rows, key, fmt):
    """One comma-separated cell of ``key`` per seed; "–" where a seed's run did not record it
    (an older run), "" where none did."""
    if not any(r.get(key) is not None for r in rows):
        return ""
    return ", ".join(_value(r, key, fmt) for r in rows)


def _value(row, key, fmt):
    return fmt.format(row[key]) if row.get(key) is not None else "–"


def table(summary, results, methods):
    lines = [
        (
            "| method | test accuracy (mean ± std) | per seed | vs magnitude (same seeds) | vs dense "
            "| acc. right after the one-shot prune | acc. before / right after hard prune | rel. residual at prune "
            "| kept weights outside the magnitude mask | exactly N:M |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        if m not in summary:
            continue
        s = summary[m]
        rows = [r for r in results if r["method"] == m]
        one_shot = _per_seed(rows, "acc_one_shot", "{:.4f}")
        prune = _per_seed(rows, "acc_at_prune", "{:.4f}")
        if any("acc_before_prune" in r for r in rows):  # ADMM: its W is still dense before the prune
            prune = ", ".join(
                f"{_value(r, 'acc_before_prune', '{:.4f}')} / {_value(r, 'acc_at_prune', '{:.4f}')}" for r in rows
            )
        resids = _per_seed(rows, "residual_before_prune", "{:.3f}")
        moved = _per_seed(rows, "mask_moved", "{:.1%}")
        exact = {r["exact_nm"] for r in rows}
        vs_base, vs_dense = paired_gap(results, m, "magnitude"), paired_gap(results, m, "dense")
        per_seed = ", ".join(f"{a:.4f}" for a in s["accs"])
        nm = "n/a" if exact == {None} else ("yes" if exact == {True} else "NO")
        mean_std = f"{s['mean']:.4f} ± {s['std']:.4f}" if len(s["accs"]) > 1 else f"{s['mean']:.4f} (1 seed)"
        lines.append(
            f"| {m} | {mean_std} | {per_seed} | {vs_base} | {vs_dense} | {one_shot} | {prune} | {resids} | {moved} "
            f"| {nm} |"
        )
    return "\n".join(lines)


def settings_line(cfg, task="sentiment"):
    c = cfg
    text = (
        f"task {task}; train {c['train_size']} sentences, test {c['test_size']}; epochs dense/sparsify/fine-tune "
        f"{c['dense_epochs']}/{c['sparse_epochs']}/{c['finetune_epochs']}; batch {c['batch_size']}, "
        f"{c['max_length']} tokens, AdamW lr {c['lr']} wd {c['weight_decay']}; distill {c['distill']}; "
        f"ADMM {c['admm_penalty']} rho {c['admm_rho']} x{c['admm_rho_factor']} geometric, "
        f"Z/U every {c['admm_update_every']} steps; "
        f"SR-STE decay {c['srste_decay']}; pattern {c['pattern']}"
    )
    if "calibration_size" in c:  # runs recorded before the calibrated methods did not have it
        text += f"; calibration {c['calibration_size']} training sentences"
    return text


def run_section(data: dict, level: str = "#", name: str = "") -> list[str]:
    """One run as markdown: note, settings, the table and the exact command."""
    finished = len(data["results"])
    planned = len(data["seeds"]) * len(data["methods"])
    status = (
        "" if data.get("complete") else f"**Incomplete run**: {finished} of {planned} (seed, method) rows finished. "
    )
    if "combined_from" in data:
        status = f"Combined from {', '.join(data['combined_from'])}. "
        for method in data["methods"]:
            seeds = sorted(r["seed"] for r in data["results"] if r["method"] == method)
            if seeds != data["seeds"]:
                status += f"{method} ran on seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} only. "
    return [
        f"{level} {name}",
        "",
        (data.get("note") or "").strip(),
        "",
        status
        + f"Settings: {settings_line(data['config'], data.get('task', 'sentiment'))}. Seeds {data['seeds']}. "
        + f"Wall time {data['wall_seconds'] / 60:.1f} min.",
        "",
        table(data["summary"], data["results"], data["methods"]),
        "",
        "```",
        data["command"],
        "```",
        "",
    ]


def write_summary(out: Path):
    """Re-render ``<name>.md`` of every ``<name>.json`` in ``out`` and ``SUMMARY.md`` of them all
    (JSON files of other experiments, such as ``causal_lm.json``, are left alone)."""
    lines = [
        "# Results of every run (regenerated by experiments/run.py)",
        "",
        "Each section is one run, with its exact command. Runs marked reduced-budget used fewer",
        "sentences, steps or seeds than the full protocol (`python experiments/run.py`).",
        "",
    ]
    for path in sorted(out.glob("*.json")):
        data = json.loads(path.read_text())
        if not {"results", "methods", "config"} <= data.keys():
            continue
        path.with_suffix(".md").write_text("\n".join(run_section(data, "#", path.stem)))
        lines += run_section(data, "##", path.stem)
    (out / "SUMMARY.md").write_text("\n".join(lines))


def combine(paths, note=""):
    """One run's data from finished runs of the same settings (``threads`` aside): their rows,
    seeds and methods merged, their commands listed. A (seed, method) found twice is an error."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    tasks = {r.get("task", "sentiment") for r in runs}
    if len(tasks) > 1:
        raise SystemExit(f"cannot combine runs of different tasks: {sorted(tasks)}")
    settings = [{k: v for k, v in r["config"].items() if k != "threads"} for r in runs]
    for path, other in zip(paths[1:], settings[1:]):
        if other != settings[0]:
            diff = sorted(k for k in other if other[k] != settings[0].get(k))
            raise SystemExit(f"cannot combine {path} with {paths[0]}: settings differ in {diff}")
    results, seen = [], set()
    for path, run in zip(paths, runs):
        for row in run["results"]:
            key = (row["seed"], row["method"])
            if key in seen:
                raise SystemExit(f"seed {key[0]} of {key[1]!r} appears twice (again in {path}): combine it once")
            seen.add(key)
            results.append(row)
    methods = list(dict.fromkeys(m for run in runs for m in run["methods"]))
    results.sort(key=lambda r: (r["seed"], methods.index(r["method"])))
    return {
        "note": note or " ".join(dict.fromkeys(filter(None, (r.get("note") for r in runs)))),  # each note once
        "task": tasks.pop(),
        "complete": True,  # the rows are final; run_section names the (seed, method) cells not run
        "command": "\n".join(r["command"] for r in runs),
        "config": runs[0]["config"],
        "seeds": sorted({r["seed"] for r in results}),
        "methods": methods,
        "results": results,
        "summary": harness.summarize(results, methods),
        "wall_seconds": sum(r["wall_seconds"] for r in runs),
        "combined_from": [Path(p).name for p in paths],
        "environment": runs[0].get("environment"),
    }


def earlier_run(path: Path, task, cfg) -> dict | None:
    """The run already in ``path``, if any, when it had the same task and settings (``threads``
    aside); a run with other settings is refused, not mixed in."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    ours = {k: v for k, v in harness.config_dict(cfg).items() if k != "threads"}
    theirs = {k: v for k, v in data["config"].items() if k != "threads"}
    if data.get("task", "sentiment") != task or theirs != ours:
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        raise SystemExit(
            f"{path} holds a run of other settings ({diff or 'task'}): pass another --name, or --fresh to replace it"
        )
    return data


def main(argv=None):
    args = parse_args(argv)
    if args.combine:
        if not args.name:
            raise SystemExit("--combine needs --name for the merged results")
        out = Path(args.out)
        data = combine(args.combine, args.note)
        (out / f"{args.name}.json").write_text(json.dumps(data, indent=2) + "\n")
        write_summary(out)
        print(table(data["summary"], data["results"], data["methods"]))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = [m.strip() for m in args.methods.split(";")]
    for method in methods:
        try:
            harness.parse_method(method)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    cfg = harness.Config(**{f.name: getattr(args, f.name) for f in fields(harness.Config) if f.name != "extra"})
    prefix = "rt" if args.task == "sentiment" else args.task
    name = (
        args.name
        or f"{prefix}{cfg.train_size}_e{cfg.dense_epochs:g}-{cfg.sparse_epochs:g}-{cfg.finetune_epochs:g}_s{len(seeds)}"
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python experiments/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))

    earlier = None if args.fresh else earlier_run(out / f"{name}.json", args.task, cfg)
    finished = [r for r in (earlier or {}).get("results", []) if r["seed"] in seeds and r["method"] in methods]
    earlier_seconds = 0.0
    if finished:
        print(f"keeping {len(finished)} finished (seed, method) rows of {out / (name + '.json')}", flush=True)
        command = earlier["command"] + "\n" + command
        earlier_seconds = earlier["wall_seconds"]
    texts, labels, test_texts, test_labels = harness.load_task(args.task)
    tokenizer, _ = harness.load_minilm()
    start = time.perf_counter()

    def write(results, done):
        summary = harness.summarize(results, methods)
        data = {
            "note": args.note,
            "task": args.task,
            "complete": done,
            "command": command,
            "config": harness.config_dict(cfg),
            "seeds": seeds,
            "methods": methods,
            "results": results,
            "summary": summary,
            "wall_seconds": earlier_seconds + time.perf_counter() - start,
            "environment": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        }
        (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        write_summary(out)
        return summary

    results = harness.train_and_evaluate(
        texts,
        labels,
        test_texts,
        test_labels,
        lambda: harness.load_minilm()[1],
        tokenizer,
        cfg,
        seeds,
        methods,
        quiet=args.quiet,
        log=lambda s: print(s, flush=True),
        on_result=lambda rows: write(rows, done=False),
        cache_dir=args.dense_cache,
        finished=finished,
    )
    summary = write(results, done=True)
    print(table(summary, results, methods))
    print(f"written: {out / (name + '.json')}, {out / (name + '.md')}, {out / 'SUMMARY.md'}")


if __name__ == "__main__":
    main()
