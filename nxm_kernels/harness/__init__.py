"""The sentence-classification harness of the real-model experiment (``experiments/run.py``) and
of ``nxm demo``: data and model (:mod:`.data`), and one training protocol for every method
(:mod:`.protocol`). It needs the experiment's extra packages; importing it does not."""

from .data import (
    TASKS,
    Batches,
    SentenceClassifier,
    count_labels,
    load_minilm,
    load_reviews,
    load_rotten_tomatoes,
    load_shakespeare,
    load_task,
)
from .protocol import (
    METHOD_KEYS,
    METHODS,
    ONE_SHOT,
    Config,
    Protocol,
    config_dict,
    mask_moved,
    parse_method,
    summarize,
    train_and_evaluate,
)

__all__ = [
    "METHODS",
    "METHOD_KEYS",
    "ONE_SHOT",
    "TASKS",
    "Batches",
    "Config",
    "Protocol",
    "SentenceClassifier",
    "config_dict",
    "count_labels",
    "load_minilm",
    "load_reviews",
    "load_rotten_tomatoes",
    "load_shakespeare",
    "load_task",
    "mask_moved",
    "parse_method",
    "summarize",
    "train_and_evaluate",
]
