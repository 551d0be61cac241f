"""The `nxm` command: sparsify a model into a compact checkpoint, inspect one, list backends,
run the benchmarks and the demo. `nxm COMMAND --help` explains each command.

Exit codes: 0 success, 1 the command failed (the message says why and what to do), 2 bad usage.
`nxm verify` has its own: 0 the file verifies, 3 corrupt or invalid, 4 unreadable or not an nxm
checkpoint, 5 format version 1 (no checksums, so its data cannot be verified).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback, exit code 1."""


# ---------------------------------------------------------------- the built-in demo model


class DemoBlock(nn.Module):
    """A pre-norm Transformer block written with plain ``nn.Linear`` calls."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (
            proj(h).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.query, self.key, self.value)
        )
        attention = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + self.out(attention)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DemoTransformer(nn.Module):
    """The model ``nxm sparsify demo`` converts: a small token classifier (its head has 10
    outputs, so padding is exercised too). Load its checkpoint with
    ``nxm.load(path, DemoTransformer())``."""

    def __init__(
        self, vocab: int = 1000, dim: int = 128, heads: int = 4, hidden: int = 512, depth: int = 2, classes: int = 10
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(DemoBlock(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ---------------------------------------------------------------- commands


def _progress_bar(done: int, total: int, name: str, width: int = 30) -> None:
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {name[-40:]:<40}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def _load_source(source: str, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    if source == "demo":
        torch.manual_seed(0)
        return DemoTransformer().to(dtype).eval(), {"source": "demo", "architecture": "nxm_kernels.cli.DemoTransformer"}
    path = Path(source)
    if not (path / "config.json").is_file():
        raise CommandError(
            f"{source!r} is neither 'demo' nor a model directory with a config.json: give a directory "
            "saved by save_pretrained() (Hugging Face transformers), or 'demo'"
        )
    try:
        import transformers
    except ImportError:
        raise CommandError(
            "reading a model directory needs Hugging Face transformers: pip install transformers"
        ) from None
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    architecture = (getattr(config, "architectures", None) or ["AutoModel"])[0]
    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise CommandError(f"config.json names architecture {architecture!r}, which this transformers does not have")
    model = model_class.from_pretrained(path, local_files_only=True, dtype=dtype).eval()
    return model, {"source": str(path), "architecture": f"transformers.{architecture}", "config": config.to_dict()}


def cmd_sparsify(args) -> int:
    from . import checkpoint, dispatch
    from . import nn as nxm_nn
    from .encodings import from_bits
    from .pattern import as_pattern

    from .plan import load_plan

    try:
        pattern = as_pattern(args.pattern)
        from_bits(args.bits, args.group_size).check(torch.float32, (1, pattern.block[1]), pattern, None)
        if args.backend != "auto":
            dispatch.get_backend(args.backend)
        plan = None if args.plan is None else load_plan(args.plan)
    except (OSError, ValueError) as e:
        raise CommandError(str(e)) from None
    if plan is not None and (args.bits or args.group_size or args.act_bits or args.include):
        raise CommandError("--plan sets each layer's pattern and encoding: leave out --bits, --group-size, "
                           "--act-bits and --include")
    model, info = _load_source(args.source, DTYPES[args.dtype])
    options = (dict(plan=plan) if plan is not None else
               dict(pattern=args.pattern, include=args.include, weight_bits=args.bits, group_size=args.group_size,
                    act_bits=args.act_bits))
    try:
        report = nxm_nn.sparsify(model, exclude=args.exclude, backend=args.backend,
                                 progress=None if args.quiet else _progress_bar, **options)
    except ValueError as e:
        raise CommandError(str(e)) from None
    print(report)
    if not report.converted:
        raise CommandError("no layer was converted (see the reasons above): loosen --include/--exclude")
    checkpoint.save(model, args.output, info=info)
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({size:,} bytes)")
    print(f"next: nxm inspect {args.output}   (in Python: nxm.load({str(args.output)!r}, model))")
    return 0


def _load_causal_lm(source: str, gguf_file: str | None, dtype: torch.dtype):
    """(model, tokenizer, info) of a Hugging Face directory, or of a GGUF file (``source`` itself,
    or ``gguf_file`` inside the directory ``source``), which transformers dequantizes."""
    path = Path(source)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    try:
        import transformers
    except ImportError:
        raise CommandError("reading a model needs Hugging Face transformers: pip install transformers") from None
    gguf = {} if gguf_file is None else {"gguf_file": gguf_file}
    if gguf_file is None:
        model, info = _load_source(source, dtype)
    elif not (path / gguf_file).is_file():
        raise CommandError(f"no GGUF file {gguf_file!r} in {str(path)!r}")
    else:  # transformers dequantizes it; reading GGUF needs the `gguf` package (transformers says so)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **gguf)
        model.eval()
        info = {"source": str(path / gguf_file), "architecture": f"transformers.{type(model).__name__}",
                "config": model.config.to_dict()}
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, **gguf)
    except (OSError, ValueError) as e:
        raise CommandError(
            f"no tokenizer for {str(path)!r} ({e}): calibration text needs the model's tokenizer"
        ) from None
    return model, tokenizer, info


def _calibration_windows(tokenizer, text_file: str, samples: int, seq_len: int) -> list[dict]:
    """``samples`` windows of ``seq_len`` tokens, evenly spaced over the tokenized text file."""
    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except OSError as e:
        raise CommandError(f"cannot read the calibration text: {e}") from None
    ids = torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    if len(ids) < seq_len:
        raise CommandError(f"{text_file} has {len(ids)} tokens, fewer than --seq-len {seq_len}: give more text")
    starts = torch.linspace(0, len(ids) - seq_len, samples).long().tolist()
    return [{"input_ids": ids[s : s + seq_len][None]} for s in starts]


def cmd_prune(args) -> int:
    from . import checkpoint
    from . import nn as nxm_nn
    from .pattern import as_pattern
    from .training import prune

    try:
        as_pattern(args.pattern)
    except ValueError as e:
        raise CommandError(str(e)) from None
    if args.samples < 1 or args.seq_len < 1:
        raise CommandError("--samples and --seq-len must be at least 1")
    model, tokenizer, info = _load_causal_lm(args.source, args.gguf_file, DTYPES[args.dtype])
    calibration = _calibration_windows(tokenizer, args.calibration, args.samples, args.seq_len)
    options = {k: getattr(args, k) for k in ("iterations", "rho", "ramp", "damp") if getattr(args, k) is not None}
    try:
        report = prune(model, args.pattern, method=args.method, calibration=calibration, include=args.include,
                       exclude=args.exclude, progress=False if args.quiet else _progress_bar,
                       weight_bits=args.bits, group_size=args.group_size, **options)
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(report)
    # Exactly the pruned layers become SparseLinear; the heads and skipped layers stay dense.
    converted = nxm_nn.sparsify(model, args.pattern, include=list(report.layers))
    info["pruned"] = {"method": args.method, "pattern": args.pattern, "samples": args.samples,
                      "seq_len": args.seq_len, "options": options, "bits": args.bits, "group_size": args.group_size}
    checkpoint.save(model, args.output, info=info)
    size = os.path.getsize(args.output)
    print(f"converted {len(converted.converted)} layer(s); wrote {args.output} ({size:,} bytes)")
    return 0


def cmd_search(args) -> int:
    from .training.search import save_result, search

    if args.samples < 1 or args.seq_len < 1:
        raise CommandError("--samples and --seq-len must be at least 1")
    if args.source == "demo":
        model, _ = _load_source("demo", torch.float32)
        g = torch.Generator().manual_seed(0)
        calibration = [torch.randint(0, 1000, (1, args.seq_len), generator=g) for _ in range(args.samples)]
    elif args.calibration is None:
        raise CommandError("a model directory needs --calibration FILE (text to run through the model)")
    else:
        model, tokenizer, _ = _load_causal_lm(args.source, None, torch.float32)
        calibration = _calibration_windows(tokenizer, args.calibration, args.samples, args.seq_len)
    try:
        result = search(model, args.candidates, calibration, args.target, include=args.include, exclude=args.exclude,
                        progress=None if args.quiet else _progress_bar)
    except (TypeError, ValueError) as e:
        raise CommandError(str(e)) from None
    print(result)
    result.save(args.output)
    if args.report:
        save_result(result, args.report)
    print(f"wrote {args.output}; next: nxm sparsify {args.source} --plan {args.output} -o model.nxm.safetensors")
    return 0


def _integrity(header: dict, verified: bool) -> str:
    """What the checksums say about a file that loaded (with or without verification)."""
    version = header["format_version"]
    if version == 1:
        return "format version 1: no checksums, its data cannot be verified (load and nxm.save it again to add them)"
    if not verified:
        return f"format version {version}: checksums not checked (--no-verify)"
    checksums = header["checksums"]
    return (
        f"format version {version}: the header and all {len(checksums['tensors'])} tensors match their "
        f"{checksums['algorithm']} checksums"
    )


def _load_quietly(path: str, verify: bool):
    """checkpoint.load without its version-1 warning: the commands print that themselves."""
    from . import checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return checkpoint.load(path, verify=verify)


def cmd_inspect(args) -> int:
    from . import checkpoint

    try:
        ckpt = _load_quietly(args.checkpoint, verify=not args.no_verify)
    except checkpoint.CheckpointError as e:
        raise CommandError(f"invalid checkpoint: {e}") from None
    header = ckpt.header
    info = header["info"]
    print(f"checkpoint   {ckpt.path} ({os.path.getsize(ckpt.path):,} bytes)")
    print(f"integrity    {_integrity(header, verified=not args.no_verify)}")
    print(f"written by   nxm-kernels {header.get('nxm_version')}, torch {header.get('torch_version')}")
    if info.get("source"):
        print(f"source       {info['source']} ({info.get('architecture', 'unknown architecture')})")
    patterns = sorted({str(layer.pattern) for layer in ckpt.layers.values()})
    print(f"sparse layers {len(ckpt.layers)} (pattern {', '.join(patterns) or 'none'})")
    rows = [("layer", "in->out", "pattern", "layout", "dtype", "values", "scales min/mean/max", "bytes", "of dense")]
    for name, layer in ckpt.layers.items():
        stored, dense = checkpoint.layer_bytes(layer)
        sw = layer.weight_sparse
        rows.append(
            (
                name,
                f"{layer.in_features}->{layer.out_features}",
                str(layer.pattern),
                layer.layout,
                str(sw.dtype).removeprefix("torch."),
                # bits and group size, e.g. int4-g128 (int8: one scale per row), and W8A8's activations
                str(sw.encoding) + (f" a{layer.act_bits}" if layer.act_bits else ""),
                _scale_stats(sw.scales),
                f"{stored:,}",
                f"{stored / dense:.1%}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    sparse, dense = ckpt.sparse_bytes(), ckpt.dense_bytes()
    if dense:
        print(f"sparse layers: {sparse:,} bytes, {sparse / dense:.1%} of their dense {dense:,}")
    other = sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    print(f"other tensors: {len(ckpt.tensors)} ({other:,} bytes)")
    print("validation   OK (header, patterns, layouts, dtypes, shapes, every metadata index)")
    return 0


def _scale_stats(scales) -> str:
    if scales is None:
        return "-"
    return f"{scales.min().item():.3g}/{scales.mean().item():.3g}/{scales.max().item():.3g}"


VERIFY_CORRUPT, VERIFY_UNREADABLE, VERIFY_NO_CHECKSUMS = 3, 4, 5


def cmd_verify(args) -> int:
    from . import checkpoint

    try:
        ckpt = _load_quietly(args.checkpoint, verify=True)
    except checkpoint.CheckpointError as e:
        print(f"{'UNREADABLE' if e.unreadable else 'CORRUPT'}: {e}", file=sys.stderr)
        return VERIFY_UNREADABLE if e.unreadable else VERIFY_CORRUPT
    if ckpt.header["format_version"] == 1:
        print(f"NO CHECKSUMS: {ckpt.path}: {_integrity(ckpt.header, verified=True)}; its structure is valid")
        return VERIFY_NO_CHECKSUMS
    print(f"OK: {ckpt.path}: {_integrity(ckpt.header, verified=True)}; its structure is valid")
    return 0


def cmd_backends(args) -> int:
    from .dispatch import backends

    print("backends in auto-dispatch priority order:")
    available = backends()
    width = max(len(name) for name in available)
    for name, why in available.items():
        print(f"  {name.ljust(width)}  {'available' if why is None else 'unavailable: ' + why}")
    env = os.environ.get("NXM_BACKEND")
    print(f"NXM_BACKEND={env} (overrides 'auto')" if env else "NXM_BACKEND is not set: calls use 'auto'")
    from . import _extension

    if _extension.unavailable_reason() is None:  # the CPU GEMM lives in _C (CuPy alone serves CUDA only)
        import torch

        forced = os.environ.get("NXM_CPU_ISA")
        print(f"native CPU GEMM: {torch.ops.nxm.cpu_isa()} kernels on this CPU"
              + (f" (NXM_CPU_ISA={forced} chooses which run)" if forced else ""))
    return 0


def benchmarks_dir() -> Path:
    """``benchmarks/`` of the source checkout this package runs from."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args) -> int:
    where = benchmarks_dir()
    if not (where / "run.py").is_file():
        raise CommandError(
            f"no benchmark suite at {where}: nxm bench runs the benchmarks/ folder of a source checkout; "
            "clone the repository, install it with `pip install -e .` and run nxm bench there"
        )
    # The suite's own runner (pytest over benchmarks/, then the report), as `make bench` runs it.
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *args.bench_args], cwd=where.parent)


def cmd_demo(args) -> int:
    from . import demo

    demo.run(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nxm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser(
        "sparsify",
        help="convert a model's linear layers to N:M and write a compact checkpoint",
        description="Swap the model's nn.Linear layers for SparseLinear (the weights projected onto the "
        "pattern: keep the n largest |w| of every m) and save the result with nxm.save.",
    )
    p.add_argument("source", help="'demo' (the built-in DemoTransformer) or a Hugging Face model directory")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write, e.g. model.nxm.safetensors")
    p.add_argument("--pattern", default="2:4", help="keep n of every m weights along in_features (default 2:4)")
    p.add_argument("--dtype", choices=DTYPES, default="float16", help="weight dtype (default float16)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only layers whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip layers whose name matches (repeatable)")
    p.add_argument("--backend", default="auto", help="backend the layers run on (default auto; see nxm backends)")
    p.add_argument("--bits", type=int, choices=(8, 4), help="store the kept weights as int8 or int4 codes with "
                   "fp32 scales (default: the weight dtype)")
    p.add_argument("--group-size", type=int, metavar="G", help="with --bits: one scale per G input features, a "
                   "multiple of m, e.g. 128 (default: one per output row)")
    p.add_argument("--act-bits", type=int, choices=(8,), help="with --bits: quantize activations per token to int8 "
                   "and multiply integers (W8A8)")
    p.add_argument("--plan", metavar="JSON", help="each layer's pattern and encoding, as nxm search writes it "
                   "(instead of --pattern/--bits/--group-size/--act-bits/--include)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_sparsify)

    from .training.search import DEFAULT_CANDIDATES

    p = commands.add_parser(
        "search",
        help="choose each layer's pattern and encoding for a compression target; write a plan",
        description="Measure each Linear's sensitivity to each candidate configuration on calibration data "
        "(the model's output error with only that layer converted) and choose one per layer reaching "
        "--target (value bits against fp32) at the least total sensitivity (a knapsack). Writes the plan "
        "JSON that nxm sparsify --plan, nxm.sparsify(plan=) and the sparsifiers (plan=) read.",
    )
    p.add_argument("source", help="'demo' (the built-in DemoTransformer, random tokens) or a Hugging Face "
                   "model directory with its tokenizer")
    p.add_argument("-o", "--output", required=True, help="plan JSON to write")
    p.add_argument("--calibration", metavar="FILE", help="calibration text (UTF-8); required for a model directory")
    p.add_argument("--candidates", nargs="+", default=list(DEFAULT_CANDIDATES), metavar="CONFIG",
                   help=f"configurations to choose from (default: {' / '.join(DEFAULT_CANDIDATES)}); "
                   "a pattern or 'dense', then fp/int8/int4, g<N>, a8")
    p.add_argument("--target", type=float, default=0.875, help="compression by value bits against fp32 (default "
                   "0.875 = 2:4 int8 everywhere)")
    p.add_argument("--samples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
    p.add_argument("--report", metavar="JSON", help="also write every sensitivity and both compressions here")
    p.add_argument("--include", action="append", metavar="GLOB", help="only layers whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip layers whose name matches (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_search)

    p = commands.add_parser(
        "inspect",
        help="validate a checkpoint and show its layers and sizes",
        description="Read a checkpoint written by nxm sparsify / nxm.save, verify its checksums, "
        "validate everything (header, shapes, every metadata index) and print its format version and "
        "layers. Exit code 1 if invalid.",
    )
    p.add_argument("checkpoint")
    p.add_argument("--no-verify", action="store_true", help="skip the checksums (the structure is still validated)")
    p.set_defaults(run=cmd_inspect)

    p = commands.add_parser(
        "verify",
        help="check a checkpoint's checksums and structure: OK, or exactly what is wrong",
        description="Verify every tensor's and the header's checksum, then validate the structure as "
        "nxm.load does. Prints OK or what is wrong. Exit codes: 0 OK; 3 corrupt or invalid (a checksum "
        "or a layer does not match); 4 unreadable or not an nxm checkpoint (missing, not safetensors, "
        "truncated, no nxm header, a format version this nxm-kernels does not read); 5 format version 1, "
        "which has no checksums (structure valid, data unverifiable); 2 bad usage.",
    )
    p.add_argument("checkpoint")
    p.set_defaults(run=cmd_verify)

    p = commands.add_parser(
        "prune",
        help="prune a causal LM one-shot (magnitude, Wanda, SparseGPT, ADMM) on calibration text",
        description="Prune the model's decoder Linears to the pattern with calibration windows cut from a "
        "text file (nxm.training.prune; the output head stays dense), then convert them with "
        "nxm.sparsify and save the checkpoint with nxm.save.",
    )
    p.add_argument("source", help="a Hugging Face model directory (with its tokenizer), or a .gguf file")
    p.add_argument("--gguf-file", help="the GGUF file inside the directory SOURCE (transformers' gguf_file=)")
    p.add_argument("--calibration", required=True, metavar="FILE", help="calibration text (UTF-8)")
    p.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt", "admm"), default="sparsegpt")
    p.add_argument("--pattern", default="2:4", help="keep n of every m weights along in_features (default 2:4)")
    p.add_argument("--iterations", type=int, help="admm: iterations (default 20)")
    p.add_argument("--rho", type=float, help="admm: penalty, relative to the unit scaled diagonal (default 1)")
    p.add_argument("--ramp", type=int, help="admm: iterations over which the mask is chosen (default 15)")
    p.add_argument("--damp", type=float, help="sparsegpt/admm: fraction of H's mean diagonal added to it")
    p.add_argument("--bits", type=int, choices=(8, 4), help="end the kept weights on the int8 or int4 grid and "
                   "store them so (sparsegpt and admm round jointly; default: the weight dtype)")
    p.add_argument("--group-size", type=int, metavar="G", help="with --bits: one scale per G input features, a "
                   "multiple of m, e.g. 128 (default: one per output row)")
    p.add_argument("-o", "--output", required=True, help="checkpoint to write, e.g. model.nxm.safetensors")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to prune and save in (default float32)")
    p.add_argument("--include", action="append", metavar="GLOB", help="only layers whose name matches (repeatable)")
    p.add_argument("--exclude", action="append", metavar="GLOB", help="skip layers whose name matches (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_prune)

    p = commands.add_parser("backends", help="which backends can run here, and why not")
    p.set_defaults(run=cmd_backends)

    p = commands.add_parser(
        "bench",
        help="run the microbenchmarks (pytest benchmarks/) and print the table",
        description="Runs the benchmark suite of the source checkout (`python -m benchmarks.run`, what "
        "`make bench` runs: pytest over benchmarks/, the table, then the report). Arguments go to it, "
        "e.g. `nxm bench --full`, `nxm bench -- -k sparse_mm` (after its own `--`, to pytest).",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed to python -m benchmarks.run")
    p.set_defaults(run=cmd_bench)

    from . import demo

    p = commands.add_parser(
        "demo",
        help="the end-to-end demo (what `make demo` runs)",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_arguments(p)
    p.set_defaults(run=cmd_demo)

    # Listed here for `nxm --help`; main() hands its arguments to nxm_kernels.gpu_check, which parses them.
    commands.add_parser("gpu-check", add_help=False, help="the acceptance run on a GPU server, with its own torch: "
                        "build, gpu tests, cuSPARSELt algorithm check, benchmarks (nxm gpu-check --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:
        from . import gpu_check

        return gpu_check.main(argv[1:])
    bench_args = None
    if argv[:1] == ["bench"] and argv[1:2] not in (["-h"], ["--help"]):
        argv, bench_args = ["bench"], argv[1:]  # everything after `bench` belongs to the suite's runner
    args = build_parser().parse_args(argv)
    if bench_args is not None:
        args.bench_args = bench_args
    try:
        return args.run(args)
    except CommandError as e:
        print(f"nxm {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
