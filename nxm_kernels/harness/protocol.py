"""One training protocol for every method (dense; one-shot magnitude, Wanda or SparseGPT, then
masked fine-tuning; SR-STE; ADMM), shared by ``experiments/run.py`` and the demo.

Nothing here is tied to the data set: :func:`train_and_evaluate` takes any Hugging Face encoder
and tokenizer and any ``(texts, labels)`` with labels 0..K-1 (K is read from the data).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..training import ADMMSparsifier, MagnitudePruner, SRSTESparsifier, geometric_rho, prune
from ..training.common import select_linears
from .data import TEST_SIZE, Batches, SentenceClassifier, count_labels

METHODS = ("dense", "magnitude", "wanda", "sparsegpt", "srste", "admm")
# Pruned in one shot at the start of the sparsification phase, then trained with the masks fixed.
ONE_SHOT = ("magnitude", "wanda", "sparsegpt")


@dataclass
class Config:
    """One protocol for every method: the same steps, optimizer, schedule and data order.

    Phases, in epochs over the training sentences: ``dense_epochs`` of dense fine-tuning (shared by
    every method of a seed, run once), then ``sparse_epochs`` in which each method sparsifies
    (magnitude, Wanda, SparseGPT: pruned in one shot at its start and masked; SR-STE; ADMM; dense:
    keeps training dense), then
    ``finetune_epochs`` of masked fine-tuning (SR-STE and ADMM hard-prune at its start). One AdamW
    and one learning-rate schedule (linear warm-up, linear decay to 0) span all phases.
    Wanda, SparseGPT and ADMM started from them (``admm[init=sparsegpt]``) calibrate on the first
    ``calibration_size`` training sentences.
    ``distill`` > 0 mixes in distillation from the dense model at the end of the dense phase, for
    every sparse method alike.
    """

    train_size: int = 10752
    test_size: int = TEST_SIZE
    dense_epochs: float = 1.0
    sparse_epochs: float = 1.0
    finetune_epochs: float = 1.0
    batch_size: int = 32
    max_length: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.06
    max_grad_norm: float = 1.0
    distill: float = 0.0
    temperature: float = 2.0
    pattern: str = "2:4"
    srste_decay: float = 2e-4
    # Damped (rho x update_every = 1.6, see ADMMSparsifier): the runs recorded before 2026-12-02
    # used rho 3e-3 x30, every 4 steps, which swings pruned weights through zero and costs 3 points.
    admm_penalty: str = "proximal"
    admm_rho: float = 0.1
    admm_rho_factor: float = 1.0
    admm_update_every: int = 16
    # Quantization-aware training (nxm_kernels.training.qat) for every sparse method: one encoding
    # for every target, or ``plan`` ({layer name: configuration}, as nxm search writes it).
    weight_bits: int | None = None
    group_size: int | None = None
    act_bits: int | None = None
    plan: dict | None = None
    # Distillation of the encoder blocks' outputs from the dense model's, beside ``distill``'s
    # logits: distill_hidden x mean over blocks of ||h - h_dense||^2 / ||h_dense||^2.
    distill_hidden: float = 0.0
    calibration_size: int = 256
    eval_batch_size: int = 128
    threads: int = 0
    extra: dict = field(default_factory=dict)


def steps_per_epoch(n, batch_size):
    return n // batch_size


def stream(data: Batches, seed, batch_size, start_step, steps):
    """``steps`` batches starting at global step ``start_step`` of the seeded epoch sequence."""
    per_epoch = steps_per_epoch(len(data), batch_size)
    step = start_step
    while step < start_step + steps:
        epoch, offset = divmod(step, per_epoch)
        for i, batch in enumerate(data.epoch(seed, epoch, batch_size)):
            if i < offset:
                continue
            yield batch
            step += 1
            if step == start_step + steps:
                return


@torch.no_grad()
def accuracy(model, data: Batches, batch_size=128):
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        ids, mask, labels = data.batch(torch.arange(start, min(start + batch_size, len(data))))
        correct += int((model(ids, mask).argmax(-1) == labels).sum())
    return correct / len(data)


def _progress(iterable, total, desc, quiet):
    if quiet:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(
        iterable, total=total, desc=desc, leave=False, mininterval=1 if sys.stderr.isatty() else 30, file=sys.stderr
    )


def train_steps(
    model, opt, sched, batches, steps, cfg: Config, sparsifier=None, teacher=None, distill=0.0, desc="", quiet=False
):
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    last = {}
    for ids, mask, labels in _progress(batches, steps, desc, quiet):
        hidden = _BlockOutputs(model) if teacher is not None and cfg.distill_hidden > 0 else None
        logits = model(ids, mask)
        loss = F.cross_entropy(logits, labels)
        if teacher is not None and (distill > 0 or hidden is not None):
            dense_hidden = _BlockOutputs(teacher) if hidden is not None else None
            with torch.no_grad():
                teacher_logits = teacher(ids, mask)
            if distill > 0:
                target = F.softmax(teacher_logits / cfg.temperature, -1)
                kd = F.kl_div(F.log_softmax(logits / cfg.temperature, -1), target, reduction="batchmean")
                loss = (1 - distill) * loss + distill * cfg.temperature**2 * kd
            if hidden is not None:
                pairs = list(zip(hidden.pop(), dense_hidden.pop()))
                mismatch = sum((h - t).pow(2).sum() / t.pow(2).sum() for h, t in pairs) / len(pairs)
                loss = loss + cfg.distill_hidden * mismatch
        total = loss + sparsifier.penalty() if sparsifier is not None else loss
        total.backward()
        if cfg.max_grad_norm:
            nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if sparsifier is not None:
            sparsifier.step()
        last = {"loss": loss.item()}
    return last


class _BlockOutputs:
    """Records the output hidden state of each block of ``model``'s largest ``nn.ModuleList`` (the
    encoder's layers) in the next forward pass; ``pop()`` returns them and removes the hooks."""

    def __init__(self, model):
        blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
        self.outputs = []
        self.handles = [b.register_forward_hook(lambda m, a, out: self.outputs.append(
            out[0] if isinstance(out, tuple) else out)) for b in blocks]

    def pop(self):
        for handle in self.handles:
            handle.remove()
        return self.outputs


def quantization(cfg: Config) -> dict:
    """The sparsifiers' quantization arguments from ``cfg`` (nothing when it has none)."""
    if cfg.plan is not None:
        return {"plan": cfg.plan}
    if cfg.weight_bits is None:
        return {}
    return {"weight_bits": cfg.weight_bits, "group_size": cfg.group_size, "act_bits": cfg.act_bits}


def _one_shot_method(value: str) -> str:
    if value not in ONE_SHOT:
        raise ValueError(f"is not one of {', '.join(ONE_SHOT)}")
    return value


# Settings a method may override in ``method[key=value,...]``. ``sparse_epochs`` moves the hard
# prune inside the same total budget (sparse + fine-tune epochs stay fixed); ``distill`` gives the
# method distillation from the dense-phase model (give its baseline the same for a fair comparison);
# ``retrain=srste`` has ADMM retrain with SR-STE after its hard prune (ADMM pattern pruning's recipe).
METHOD_KEYS = {
    "dense": {},
    "magnitude": {"distill": float},
    "wanda": {"distill": float},
    "sparsegpt": {"distill": float},
    "srste": {"decay": float, "sparse_epochs": float, "distill": float},
    "admm": {
        "penalty": str,
        "rho": float,
        "rho_factor": float,
        "update_every": int,
        "sparse_epochs": float,
        "distill": float,
        "init": _one_shot_method,
        "retrain": str,
    },
}


def parse_method(method: str):
    """``"admm"`` or ``"admm[penalty=loss,rho=1e-3,rho_factor=100,update_every=16]"`` (a variant
    overriding the config's settings, see :data:`METHOD_KEYS`; ``init=sparsegpt`` starts ADMM's Z
    from that one-shot mask) -> ``(name, overrides)``."""
    name, _, rest = method.partition("[")
    if name not in METHODS or (rest and not rest.endswith("]")):
        raise ValueError(f"unknown method {method!r}: choose from {METHODS}, optionally with [key=value,...]")
    keys = METHOD_KEYS[name]
    overrides = {}
    for item in filter(None, rest[:-1].split(",")):
        key, _, value = item.partition("=")
        if key not in keys:
            raise ValueError(f"unknown setting {key!r} for {name} in {method!r}: use {list(keys) or 'none'}")
        try:
            overrides[key] = keys[key](value)
        except ValueError as e:
            reason = f"is not a {keys[key].__name__}" if isinstance(keys[key], type) else str(e)
            raise ValueError(f"setting {key}={value!r} in {method!r} {reason}") from None
    return name, overrides


def make_sparsifier(method, model, cfg: Config, steps, calibration=()):
    """The method's sparsifier on ``model``; ``calibration`` (model inputs) feeds Wanda, SparseGPT
    and ADMM started from them. Wanda and SparseGPT prune ``model`` here, in one shot: the
    magnitude pruner built after them keeps exactly their masks (the nonzeros, n of every m)."""
    name, overrides = parse_method(method)
    if name in ("wanda", "sparsegpt"):
        prune(model, cfg.pattern, method=name, calibration=calibration, progress=False, measure_error=False)
    if name in ONE_SHOT:
        return MagnitudePruner(model, cfg.pattern, **quantization(cfg))
    if name == "srste":
        return SRSTESparsifier(model, cfg.pattern, decay=overrides.get("decay", cfg.srste_decay), **quantization(cfg))
    admm = {
        "penalty": cfg.admm_penalty,
        "rho": cfg.admm_rho,
        "rho_factor": cfg.admm_rho_factor,
        "update_every": cfg.admm_update_every,
        **overrides,
    }
    init = overrides.get("init")
    return ADMMSparsifier(
        model,
        cfg.pattern,
        rho=admm["rho"],
        rho_schedule=geometric_rho(admm["rho_factor"], max(steps, 1)),
        update_every=admm["update_every"],
        penalty=admm["penalty"],
        init=init,
        calibration=calibration if init not in (None, "magnitude") else None,
        retrain=overrides.get("retrain"),
        **quantization(cfg),
    )


def build(encoder_state, cfg: Config, load_encoder, total_steps, num_labels: int):
    """A fresh model, optimizer and schedule (embeddings frozen: they are not sparsified, and
    their 11.7M-entry AdamW update would double the step time on a CPU)."""
    model = SentenceClassifier(load_encoder(), num_labels)
    if encoder_state is not None:
        model.load_state_dict(encoder_state)
    model.encoder.embeddings.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    warmup = max(1, int(cfg.warmup * total_steps))

    def schedule(step):
        return step / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def magnitude_masks(model, pattern) -> dict:
    """The magnitude N:M mask of every target weight of ``model`` as it is now."""
    targets, _ = select_linears(model, pattern)
    return {n: ops.nm_mask(m.weight.detach(), pattern) for n, m in targets.items()}


def mask_moved(before: dict, after: dict) -> float:
    """Fraction of the kept weights in ``after`` that ``before`` prunes: 0 when a method keeps the
    one-shot magnitude mask, how far its own selection moved otherwise."""
    moved = sum(int((after[n] & ~before[n]).sum()) for n in after)
    return moved / max(1, sum(int(after[n].sum()) for n in after))


def nm_exact(sparsifier) -> bool:
    return all(ops.is_nm_sparse(m.weight.detach(), sparsifier.configs[n].pattern)
               for n, m in sparsifier.targets.items())


class Protocol:
    """The steps of one run: ``dense_phase(seed)`` once per seed, then ``sparse_run(method)`` from
    its snapshot for each method (the same batches, schedule and dropout stream for all).

    ``cache_dir`` keeps each seed's dense-phase snapshot on disk, keyed by every setting it depends
    on, so runs split over several processes (a variant, a seed each) share it instead of redoing it.
    """

    def __init__(
        self, texts, labels, test_texts, test_labels, load_encoder, tokenizer, cfg: Config, quiet=False, cache_dir=None
    ):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg, self.load_encoder, self.quiet = cfg, load_encoder, quiet
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.num_labels = count_labels(labels[: cfg.train_size], test_labels[: cfg.test_size])
        self.train = Batches(tokenizer, texts[: cfg.train_size], labels[: cfg.train_size], cfg.max_length)
        self.test = Batches(tokenizer, test_texts[: cfg.test_size], test_labels[: cfg.test_size], cfg.max_length)
        self.per_epoch = steps_per_epoch(len(self.train), cfg.batch_size)
        self.data_digest = _digest(texts[: cfg.train_size], labels[: cfg.train_size])
        self.steps = tuple(
            round(e * self.per_epoch) for e in (cfg.dense_epochs, cfg.sparse_epochs, cfg.finetune_epochs)
        )
        self.total = sum(self.steps)

    def accuracy(self, model):
        return accuracy(model, self.test, self.cfg.eval_batch_size)

    def calibration(self) -> list[dict]:
        """The first ``calibration_size`` training sentences as model inputs, batched by length so
        that padding tokens hardly enter the calibration statistics."""
        count = min(self.cfg.calibration_size, len(self.train))
        by_length = sorted(range(count), key=lambda i: len(self.train.ids[i]))
        batches = []
        for start in range(0, count, self.cfg.batch_size):
            ids, mask, _ = self.train.batch(by_length[start : start + self.cfg.batch_size])
            batches.append({"input_ids": ids, "attention_mask": mask})
        return batches

    def _cache_path(self, seed):
        c = self.cfg
        key = {
            "version": 1,
            "data": self.data_digest,
            "seed": seed,
            "train_size": c.train_size,
            "test_size": c.test_size,
            "batch_size": c.batch_size,
            "max_length": c.max_length,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "warmup": c.warmup,
            "max_grad_norm": c.max_grad_norm,
            "dense_steps": self.steps[0],
            "total_steps": self.total,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"dense_seed{seed}_{digest}.pt"

    def dense_phase(self, seed):
        """Dense fine-tuning shared by every method; returns (test accuracy, seconds)."""
        cfg, d_steps = self.cfg, self.steps[0]
        path = self._cache_path(seed) if self.cache_dir else None
        self.seed, self._teacher = seed, None
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=True)
            self.snapshot, self.dense_acc, self.dense_seconds = saved["snapshot"], saved["acc"], saved["seconds"]
            return self.dense_acc, self.dense_seconds
        torch.manual_seed(seed)
        model, opt, sched = build(None, cfg, self.load_encoder, self.total, self.num_labels)
        start = time.perf_counter()
        train_steps(
            model,
            opt,
            sched,
            stream(self.train, seed, cfg.batch_size, 0, d_steps),
            d_steps,
            cfg,
            desc=f"seed {seed} dense phase",
            quiet=self.quiet,
        )
        self.dense_seconds = time.perf_counter() - start
        self.snapshot = (
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()),
        )
        self.dense_acc = self.accuracy(model)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.tmp")  # atomic: processes may share the cache
            torch.save({"snapshot": self.snapshot, "acc": self.dense_acc, "seconds": self.dense_seconds}, partial)
            partial.replace(path)
        return self.dense_acc, self.dense_seconds

    def teacher(self):
        """The dense-phase model, frozen, for distillation (built on first use)."""
        if self._teacher is None:
            self._teacher = SentenceClassifier(self.load_encoder(), self.num_labels)
            self._teacher.load_state_dict(self.snapshot[0])
            self._teacher.eval().requires_grad_(False)
        return self._teacher

    def sparse_run(self, method):
        """``(model, sparsifier or None, result row)`` for ``method`` after the dense phase."""
        cfg, seed = self.cfg, self.seed
        name, overrides = parse_method(method)
        d_steps, s_steps, f_steps = self.steps
        if "sparse_epochs" in overrides:  # same total: the hard prune moves, the budget does not
            s_steps = min(round(overrides["sparse_epochs"] * self.per_epoch), s_steps + f_steps)
            f_steps = self.steps[1] + self.steps[2] - s_steps
        distill = overrides.get("distill", cfg.distill) if name != "dense" else 0.0
        teacher = self.teacher() if distill > 0 or (name != "dense" and cfg.distill_hidden > 0) else None
        torch.manual_seed(seed + 1)  # dropout stream, the same for every method
        model, opt, sched = build(self.snapshot[0], cfg, self.load_encoder, self.total, self.num_labels)
        opt.load_state_dict(self.snapshot[1])
        sched.load_state_dict(self.snapshot[2])
        start = time.perf_counter()
        row = {"seed": seed, "method": method, "dense_phase_acc": self.dense_acc}
        dense_masks = None if name == "dense" else magnitude_masks(model, cfg.pattern)
        calibration = self.calibration() if name in ("wanda", "sparsegpt") or overrides.get("init") else ()
        sparsifier = None if name == "dense" else make_sparsifier(method, model, cfg, s_steps, calibration)
        if name in ONE_SHOT:  # what the one-shot prune alone costs, before any masked training
            row["acc_one_shot"] = self.accuracy(model)

        def phase(first_step, steps, what):
            train_steps(
                model,
                opt,
                sched,
                stream(self.train, seed, cfg.batch_size, first_step, steps),
                steps,
                cfg,
                sparsifier,
                teacher,
                distill,
                desc=f"seed {seed} {method} {what}",
                quiet=self.quiet,
            )

        phase(d_steps, s_steps, "sparsify")
        if sparsifier is not None:
            row["residual_before_prune"] = sparsifier.residual().get("primal")
            if isinstance(sparsifier, ADMMSparsifier):  # its W is still dense: what does the prune cost?
                row["acc_before_prune"] = self.accuracy(model)
            sparsifier.finalize()
            row["acc_at_prune"] = self.accuracy(model)
        phase(d_steps + s_steps, f_steps, "fine-tune")
        if getattr(sparsifier, "retraining", False):  # admm[retrain=srste]: its masks moved until now
            sparsifier.finalize()
        if sparsifier is not None:
            row["mask_moved"] = mask_moved(dense_masks, sparsifier.masks)
        row["acc"] = self.accuracy(model)
        row["exact_nm"] = None if sparsifier is None else nm_exact(sparsifier)
        row["seconds"] = round(time.perf_counter() - start + self.dense_seconds, 1)
        row["steps"] = {"dense": d_steps, "sparsify": s_steps, "finetune": f_steps}
        return model, sparsifier, row


def _digest(texts, labels) -> str:
    """A short hash of the training data: a dense-phase snapshot belongs to one task and split."""
    h = hashlib.sha256()
    for text, label in zip(texts, labels):
        h.update(f"{label}\t{text}\n".encode())
    return h.hexdigest()[:16]


def train_and_evaluate(
    texts,
    labels,
    test_texts,
    test_labels,
    load_encoder,
    tokenizer,
    cfg: Config,
    seeds,
    methods,
    quiet=False,
    log=print,
    on_result=None,
    cache_dir=None,
    finished=(),
):
    """Run every method for every seed; returns a list of per-(seed, method) result dicts
    (``on_result(results so far)`` is called after each, so partial runs leave their numbers).
    ``finished``: rows of an interrupted run of the same settings, kept; their (seed, method) are
    not run again."""
    protocol = Protocol(texts, labels, test_texts, test_labels, load_encoder, tokenizer, cfg, quiet, cache_dir)
    results = list(finished)
    done = {(r["seed"], r["method"]) for r in results}
    for seed in seeds:
        todo = [m for m in methods if (seed, m) not in done]
        if not todo:
            continue
        acc, seconds = protocol.dense_phase(seed)
        log(f"seed {seed}: after the dense phase ({protocol.steps[0]} steps, {seconds:.0f} s) test accuracy {acc:.4f}")
        for method in todo:
            _, _, row = protocol.sparse_run(method)
            log(
                f"seed {seed} {method}: "
                + ", ".join(
                    f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in row.items()
                    if k not in ("seed", "method", "steps")
                )
            )
            results.append(row)
            if on_result is not None:
                on_result(results)
    return results


def summarize(results, methods):
    out = {}
    for method in methods:
        accs = [r["acc"] for r in results if r["method"] == method]
        if accs:
            mean = sum(accs) / len(accs)
            std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
            out[method] = {"mean": mean, "std": std, "accs": accs}
    return out


def config_dict(cfg: Config):
    return asdict(cfg)
