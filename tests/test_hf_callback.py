"""The Hugging Face Trainer callback: Trainer.train() on a tiny BERT built from a config ends
exactly 2:4, logs the residual and sparsity, and equals the hand-written ADMM loop."""

import pytest
import torch

import nxm_kernels as nxm
from conftest import tiny_bert_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from nxm_kernels.integrations.hf import NMSparsityCallback  # noqa: E402
from nxm_kernels.training import ADMMSparsifier, SRSTESparsifier  # noqa: E402

BATCH = 8


def _model():
    torch.manual_seed(0)
    config = tiny_bert_config(num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (BATCH, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": (ids[:, 1] > 31).long()}


def _dataset():
    batch = _batch()  # exactly one batch: every step sees the same examples, whatever the sampler
    return [{k: v[i] for k, v in batch.items()} for i in range(BATCH)]


def _args(tmp_path, steps, **kw):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", max_steps=steps,
        per_device_train_batch_size=BATCH, logging_steps=2, disable_tqdm=True, **kw)


def _sgd(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_trainer_admm_loss_penalty_equals_the_manual_loop(tmp_path):
    steps, finalize = 10, 7
    model = _model()
    admm = ADMMSparsifier(model, "2:4", rho=0.5, update_every=2)
    callback = NMSparsityCallback(admm, finalize_step=finalize)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, steps, max_grad_norm=0.0),
                                   train_dataset=_dataset(), callbacks=[callback], optimizers=_sgd(model))
    trainer.train()

    reference = _model()
    ref_admm = ADMMSparsifier(reference, "2:4", rho=0.5, update_every=2)
    opt, _ = _sgd(reference)
    reference.train()
    for step in range(1, steps + 1):
        (reference(**_batch()).loss + ref_admm.penalty()).backward()
        opt.step()
        opt.zero_grad()
        ref_admm.step()
        if step == finalize:
            ref_admm.finalize()

    assert list(admm.targets) == list(ref_admm.targets) and len(admm.targets) == 6  # q k v o, 2 FFN
    for name, module in admm.targets.items():
        w, ref = module.weight.detach(), ref_admm.targets[name].weight.detach()
        assert nxm.is_nm_sparse(w, "2:4"), name
        assert torch.equal(w != 0, ref != 0), name
        # float64 rounding over 10 steps (~1e-15 per op) against a penalty step of rho*lr*|W| ~ 1e-3
        assert torch.allclose(w, ref, rtol=0, atol=1e-10), (name, float((w - ref).abs().max()))
    logged = [entry for entry in trainer.state.log_history if "nxm/primal" in entry]
    assert len(logged) >= steps // 2 - 1
    assert logged[0]["nxm/primal"] > 0 and logged[0]["nxm/sparsity"] < 0.5
    assert logged[-1]["nxm/primal"] == 0.0 and logged[-1]["nxm/sparsity"] >= 0.5


def test_trainer_builds_the_sparsifier_and_finalizes_at_the_epoch_end(tmp_path):
    model = _model()
    callback = NMSparsityCallback(lambda m: SRSTESparsifier(m, "2:4"), finalize_epoch=1)
    args = _args(tmp_path, -1, num_train_epochs=2, learning_rate=1e-3)
    transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[callback]).train()
    sparsifier = callback.sparsifier
    assert sparsifier.finalized and sparsifier.steps == 2  # one step per epoch, finalized after the first
    for name, module in sparsifier.targets.items():
        assert nxm.is_nm_sparse(module.weight.detach(), "2:4"), name
    assert set(nxm.sparsify(model.float()).converted) == set(sparsifier.targets)


def test_bad_callback_settings_are_refused():
    with pytest.raises(ValueError, match="not both"):
        NMSparsityCallback(lambda m: None, finalize_step=3, finalize_epoch=1)
    with pytest.raises(TypeError, match="NMSparsifier"):
        NMSparsityCallback("admm")
