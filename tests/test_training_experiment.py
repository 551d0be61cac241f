"""The experiment's protocol (experiments/sentiment.py, run.py) on a tiny BERT and made-up
sentences: every method gets the same steps, sparse methods end exactly 2:4, and a run leaves its
JSON, table, command and summary."""

import json
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import run  # noqa: E402
import sentiment  # noqa: E402
from conftest import tiny_bert_config  # noqa: E402

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


def test_protocol_same_steps_exact_pattern_and_results_files(tmp_path):
    texts, labels = _sentences(96, 0)
    test_texts, test_labels = _sentences(64, 1)
    cfg = sentiment.Config(train_size=96, test_size=64, batch_size=16, max_length=8, lr=1e-3, distill=0.5)
    methods = ["dense", "magnitude", "srste", "admm", "admm[penalty=loss,rho=1e-2]"]
    results = sentiment.train_and_evaluate(
        texts,
        labels,
        test_texts,
        test_labels,
        _encoder,
        WordTokenizer(),
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

    run.write_summary(tmp_path)  # no JSON yet: an empty summary, not an error
    data = {
        "note": "test",
        "complete": True,
        "command": "python experiments/run.py --seeds 0",
        "config": sentiment.config_dict(cfg),
        "seeds": [0],
        "methods": methods,
        "results": results,
        "summary": sentiment.summarize(results, methods),
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
        ("admm[mu=1]", "unknown ADMM setting"),
    ],
)
def test_bad_method_names_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        sentiment.parse_method(bad)
