"""The `nxm` command, called in-process through cli.main (one run through `python -m`)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nxm_kernels as nxm
from conftest import tiny_bert_config
from nxm_kernels import cli


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("sparsify", "inspect", "verify", "backends", "bench", "demo"):
        assert command in out
    assert "`nxm verify` has its own: 0 the file verifies, 3 corrupt" in out


def test_usage_errors_exit_2(capsys):
    for argv in ([], ["frobnicate"], ["sparsify", "demo"]):  # no command, unknown, missing --output
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2


def test_sparsify_demo_then_inspect(tmp_path, capsys):
    out = tmp_path / "demo.nxm.safetensors"
    assert cli.main(["sparsify", "demo", "-o", str(out), "--exclude", "head"]) == 0
    captured = capsys.readouterr()
    assert "converted 12 linear layer(s), skipped 1" in captured.out and "head: excluded by 'head'" in captured.out
    assert f"next: nxm inspect {out}" in captured.out
    assert "[##############################] 13/13" in captured.err  # the progress bar
    model = nxm.load(out, cli.DemoTransformer().half())
    assert isinstance(model.blocks[0].up, nxm.SparseLinear) and model.blocks[0].up.values.dtype == torch.float16

    assert cli.main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "sparse layers 12 (pattern 2:4)" in shown and "blocks.1.down" in shown
    assert "source       demo (nxm_kernels.cli.DemoTransformer)" in shown
    assert "integrity    format version 2: the header and all 49 tensors match their xxh3_64 checksums" in shown
    assert "validation   OK" in shown


def test_sparsify_a_hugging_face_directory(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    config = tiny_bert_config()
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    out = tmp_path / "bert.nxm.safetensors"
    assert cli.main(["sparsify", str(tmp_path / "bert"), "-o", str(out), "--dtype", "float32", "-q"]) == 0
    assert "converted 6 linear layer(s)" in capsys.readouterr().out  # q, k, v, o, up, down (the pooler stays dense)
    checkpoint = nxm.load(out)
    assert checkpoint.header["info"]["architecture"] == "transformers.BertModel"
    rebuilt = nxm.load(out, transformers.BertModel(transformers.BertConfig(**checkpoint.header["info"]["config"])))
    original = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    nxm.sparsify(original)
    tokens = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(tokens).last_hidden_state, original(tokens).last_hidden_state)


def test_failures_exit_1_and_say_what_to_do(tmp_path, capsys):
    assert cli.main(["sparsify", str(tmp_path), "-o", str(tmp_path / "x")]) == 1
    assert "neither 'demo' nor a model directory with a config.json" in capsys.readouterr().err
    assert cli.main(["sparsify", "demo", "-o", str(tmp_path / "x"), "--pattern", "4:2"]) == 1
    assert "unsupported pattern 4:2" in capsys.readouterr().err
    assert cli.main(["sparsify", "demo", "-o", str(tmp_path / "x"), "--backend", "cuda9"]) == 1
    assert "unknown backend 'cuda9': choose 'auto' or one of" in capsys.readouterr().err
    assert cli.main(["sparsify", "demo", "-o", str(tmp_path / "x"), "--include", "nothing*"]) == 1
    assert "no layer was converted" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "missing.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "invalid checkpoint" in err and "no such file" in err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    assert cli.main(["inspect", str(broken)]) == 1
    assert "truncated or corrupt" in capsys.readouterr().err


def test_verify_says_ok_or_what_is_wrong_with_its_own_exit_codes(tmp_path, capsys):
    path = tmp_path / "model.nxm.safetensors"
    nxm.save(torch.nn.Sequential(nxm.SparseLinear.from_dense(torch.nn.Linear(16, 8), "2:4")), path)
    assert cli.main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"OK: {path}: format version 2: the header and all 3 tensors match")

    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # inside the last tensor's bytes
    damaged = tmp_path / "damaged.nxm.safetensors"
    damaged.write_bytes(bytes(data))
    assert cli.main(["verify", str(damaged)]) == cli.VERIFY_CORRUPT == 3
    assert "does not match its checksum: the file is corrupt" in capsys.readouterr().err
    assert cli.main(["inspect", str(damaged)]) == 1
    assert "invalid checkpoint" in capsys.readouterr().err
    assert cli.main(["inspect", "--no-verify", str(damaged)]) == 0
    assert "integrity    format version 2: checksums not checked (--no-verify)" in capsys.readouterr().out

    damaged.write_bytes(path.read_bytes()[:-100])
    for unreadable in (damaged, tmp_path / "missing.safetensors"):
        assert cli.main(["verify", str(unreadable)]) == cli.VERIFY_UNREADABLE == 4
        assert capsys.readouterr().err.startswith("UNREADABLE: ")

    version_1 = Path(__file__).parent / "data" / "checkpoint_v1.safetensors"
    assert cli.main(["verify", str(version_1)]) == cli.VERIFY_NO_CHECKSUMS == 5
    captured = capsys.readouterr()
    assert captured.out.startswith("NO CHECKSUMS: ") and "format version 1: no checksums" in captured.out
    assert captured.err == ""  # the load warning is not repeated
    assert cli.main(["inspect", str(version_1)]) == 0
    assert "integrity    format version 1: no checksums" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["verify"])
    assert exit_info.value.code == 2
    command = [sys.executable, "-m", "nxm_kernels.cli", "verify"]
    assert subprocess.run([*command, str(path)], capture_output=True).returncode == 0
    assert subprocess.run([*command, str(tmp_path / "missing")], capture_output=True).returncode == 4


def test_backends(capsys, monkeypatch):
    monkeypatch.delenv("NXM_BACKEND", raising=False)
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name, why in nxm.backends().items():
        assert any(
            line.split()[:2] == [name, "available" if why is None else "unavailable:"]
            for line in out.splitlines()
            if line.strip()
        )
        assert why is None or why in out
    assert "NXM_BACKEND is not set" in out


def test_bench_runs_the_benchmark_suite(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, cwd: calls.append((command, cwd)) or 3)
    assert cli.main(["bench", "--", "-k", "matmul"]) == 3  # the suite's exit code comes back
    assert calls == [([sys.executable, "-m", "benchmarks.run", "--", "-k", "matmul"], cli.benchmarks_dir().parent)]
    assert cli.main(["bench", "--full", "--", "-k", "nn"]) == 3  # the runner's own options pass through
    assert calls[-1][0][3:] == ["--full", "--", "-k", "nn"]
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "none")
    assert cli.main(["bench"]) == 1


def test_demo_runs_the_demo(monkeypatch):
    from nxm_kernels import demo

    calls = []  # `nxm demo` takes the demo's own options
    monkeypatch.setattr(demo, "run", calls.append)
    assert cli.main(["demo", "--method", "magnitude", "--train-size", "64"]) == 0
    assert (calls[0].method, calls[0].train_size, calls[0].epochs) == ("magnitude", 64, 1.0)


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "nxm_kernels.cli", "backends"], capture_output=True, text=True)
    assert result.returncode == 0 and "reference" in result.stdout
