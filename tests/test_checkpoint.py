"""save/load: round trips, size on disk, checksums, atomic saves, version-1 files, and every
corruption refused with a clear error (random damage: test_checkpoint_fuzz.py)."""

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import checkpoint
from nxm_kernels.checkpoint import SparseCheckpoint
from nxm_kernels.nn import SparseLinear


def build_model():
    """Dense fp16 model: layer 0 becomes cutlass 2:4, layer 2 packed 2:4 (10 outputs), layer 3
    packed 2:6 with padded in_features (10 -> 12); the LayerNorm stays dense."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10), nn.Linear(10, 12)).half()


def sparsified():
    model = build_model()
    nxm.sparsify(model, "2:4", include=["2"])
    model[0] = SparseLinear.from_dense(model[0], "2:4", layout="cutlass")  # (on CPU the default is packed)
    model[3] = SparseLinear.from_dense(model[3], "2:6")
    return model


@pytest.fixture
def saved(tmp_path):
    model = sparsified()
    path = tmp_path / "model.nxm.safetensors"
    nxm.save(model, path, info={"source": "test"})
    return model, path


def run(model):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        return model(x)


def test_round_trip_into_a_dense_model(saved):
    model, path = saved
    fresh = build_model()
    assert nxm.load(path, fresh) is fresh
    assert [type(m).__name__ for m in fresh] == ["SparseLinear", "LayerNorm", "SparseLinear", "SparseLinear"]
    assert [m.layout for m in (fresh[0], fresh[2], fresh[3])] == ["cutlass", "packed", "packed"]
    assert str(fresh[3].pattern) == "2:6" and fresh[3].padded_shape == (12, 12)
    assert torch.equal(run(fresh), run(model))


def test_round_trip_into_a_sparsified_model_keeps_its_backend(saved):
    model, path = saved
    target = build_model()
    nxm.sparsify(target, "2:4", include=["0", "2"], backend="reference")
    target[3] = SparseLinear.from_dense(target[3], "2:6")
    nxm.load(path, target)
    assert target[0].backend == "reference"
    assert torch.equal(run(target), run(model))


def test_load_converts_to_the_models_dtype(saved):
    model, path = saved
    fresh = nxm.load(path, build_model().float())
    assert fresh[0].values.dtype == torch.float32 and fresh[0].layout == "packed"  # fp32 cutlass is 1:2 only
    assert torch.equal(fresh[0].to_dense().weight, model[0].to_dense().weight.float())


def test_load_without_a_model(saved):
    model, path = saved
    checkpoint = nxm.load(path)
    assert isinstance(checkpoint, SparseCheckpoint)
    assert sorted(checkpoint.layers) == ["0", "2", "3"] and sorted(checkpoint.tensors) == ["1.bias", "1.weight"]
    assert checkpoint.header["info"] == {"source": "test"} and checkpoint.header["nxm_version"] == nxm.__version__
    x = torch.randn(2, 64).half()
    assert torch.equal(checkpoint.layers["0"](x), model[0](x))


@pytest.mark.parametrize("layout", ["cutlass", "packed"])
def test_fp16_2_4_takes_at_most_9_16_of_dense_bytes(tmp_path, layout):
    torch.manual_seed(0)
    dense = nn.Sequential(*(nn.Linear(256, 256) for _ in range(3))).half()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, tmp_path / "dense.safetensors")
    sparse = nn.Sequential(*(SparseLinear.from_dense(layer, "2:4", layout=layout) for layer in dense))
    nxm.save(sparse, tmp_path / "sparse.safetensors")
    ratio = os.path.getsize(tmp_path / "sparse.safetensors") / os.path.getsize(tmp_path / "dense.safetensors")
    assert ratio <= 9 / 16 + 0.02, ratio


def test_tied_tensors_are_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(32, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 32, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    report = nxm.sparsify(model)
    assert list(report.converted) == ["body"] and "head" in report.skipped
    nxm.save(model, tmp_path / "tied.safetensors")
    with safe_open(tmp_path / "tied.safetensors", "pt") as f:
        assert "head.weight" not in f.keys()
        assert json.loads(f.metadata()["nxm"])["aliases"] == {"head.weight": "embed.weight"}
    fresh = nxm.load(tmp_path / "tied.safetensors", Tied())
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)


def test_views_of_one_storage_are_saved(tmp_path):
    model = nn.Linear(8, 8)
    both = torch.arange(8.0)
    model.register_buffer("low", both[:6])
    model.register_buffer("high", both[2:])
    nxm.save(model, tmp_path / "views.safetensors")  # safetensors alone refuses overlapping memory
    tensors = nxm.load(tmp_path / "views.safetensors").tensors
    assert tensors["low"].tolist() == [0, 1, 2, 3, 4, 5] and tensors["high"].tolist() == [2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------- refusing bad files


def rewrite(path, edit_tensors=None, edit_header=None, new_checksums=True):
    """Edit a saved file; ``new_checksums``: as a forger would, so that only validation is left."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors, header = load_file(path), json.loads(metadata["nxm"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_header:
        edit_header(header)
    if new_checksums:
        header = checkpoint._seal(header, tensors)
    save_file(tensors, path, metadata={"nxm": json.dumps(header)})


def set_tensor(key, make):
    return lambda t: t.__setitem__(key, make(t[key]))


def set_layer(layer, field, value):
    return lambda h: h["layers"][layer].__setitem__(field, value)


TAMPERING = {
    "values shape": (set_tensor("0.values", lambda v: v[:, :-2].contiguous()), None, r"layer '0': values have shape"),
    "index repeated": (set_tensor("2.metadata", torch.zeros_like), None, r"layer '2'.*index repeated within its group"),
    "index out of range": (
        set_tensor("3.metadata", lambda m: torch.full_like(m, 0xFF)),
        None,
        r"layer '3'.*index out of range \[0, 6\)",
    ),
    "cutlass metadata": (set_tensor("0.metadata", torch.zeros_like), None, r"layer '0': corrupt cutlass metadata"),
    "pattern changed": (None, set_layer("2", "pattern", "1:4"), r"layer '2': values have shape"),
    "pattern the layout cannot hold": (None, set_layer("0", "pattern", "1:2"), r"holds torch.float16 only as 2:4"),
    "unparsable pattern": (None, set_layer("0", "pattern", "two of four"), r"layer '0': pattern: cannot parse"),
    "shape": (None, set_layer("0", "shape", [64, 128]), r"layer '0'"),
    "in_features": (None, set_layer("2", "in_features", 1000), r"layer '2': a 10x1000 .* is stored as 10x1000"),
    "negative size": (None, set_layer("2", "out_features", -10), r"must be positive integers"),
    "dtype": (
        None,
        set_layer("0", "dtype", "bfloat16"),
        r"values are torch.float16 but the header says torch.bfloat16",
    ),
    "layout": (None, set_layer("0", "layout", "cusparselt"), r"layout 'cusparselt' is not one a checkpoint stores"),
    "extra field": (None, set_layer("0", "trust_me", True), r"exactly the fields"),
    "missing tensor": (lambda t: t.pop("2.bias"), None, r"tensor\(s\) 2.bias missing"),
    "bias shape": (
        set_tensor("2.bias", lambda b: torch.zeros(11, dtype=b.dtype)),
        None,
        r"bias must be torch.float16 \[10\]",
    ),
    "bad alias": (None, lambda h: h["aliases"].__setitem__("1.weight", "nowhere"), r"alias '1.weight' -> 'nowhere'"),
    "format version": (None, lambda h: h.__setitem__("format_version", 99), r"format_version 99"),
    "not our format": (None, lambda h: h.__setitem__("format", "other"), r"does not say format"),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_file_is_refused(saved, case):
    _, path = saved
    edit_tensors, edit_header, message = TAMPERING[case]
    rewrite(path, edit_tensors, edit_header)
    with pytest.raises(nxm.CheckpointError, match=message):
        nxm.load(path)
    fresh = build_model()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(nxm.CheckpointError, match=message):
        nxm.load(path, fresh)
    assert all(isinstance(fresh[i], nn.Linear) for i in (0, 2, 3))  # the model was not touched
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("cut", [1, 100, 2000])
def test_truncated_file_is_refused(saved, cut):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(nxm.CheckpointError, match="truncated or corrupt"):
        nxm.load(path)


def test_files_that_are_not_checkpoints_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    with pytest.raises(nxm.CheckpointError, match="no nxm header.*not one written by nxm.save"):
        nxm.load(plain)
    garbage = tmp_path / "garbage.safetensors"
    save_file({"w": torch.zeros(2)}, garbage, metadata={"nxm": "{not json"})
    with pytest.raises(nxm.CheckpointError, match="not valid JSON"):
        nxm.load(garbage)
    pickled = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, pickled)  # a pickle is never unpickled
    with pytest.raises(nxm.CheckpointError, match="not a readable safetensors file"):
        nxm.load(pickled)
    with pytest.raises(nxm.CheckpointError, match="no such file"):
        nxm.load(tmp_path / "missing.safetensors")


def test_file_that_does_not_fit_the_model_is_refused(saved):
    _, path = saved
    wrong_size = build_model()
    wrong_size[2] = nn.Linear(64, 11).half()
    with pytest.raises(nxm.CheckpointError, match=r"layer '2' is 64->10 in the file but 64->11 in the model"):
        nxm.load(path, wrong_size)
    other_dense = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 10), nn.Linear(10, 12))
    with pytest.raises(nxm.CheckpointError, match=r"does not fit this model: missing 1.num_batches_tracked"):
        nxm.load(path, other_dense)
    not_linear = build_model()
    not_linear[2] = nn.Identity()
    with pytest.raises(nxm.CheckpointError, match="layer '2' is sparse in the file but the model has Identity"):
        nxm.load(path, not_linear)
    other_pattern = build_model()
    other_pattern[3] = SparseLinear.from_dense(other_pattern[3], "2:4")
    with pytest.raises(nxm.CheckpointError, match="pattern mismatch: layer '3' is 2:6 in the file but 2:4"):
        nxm.load(path, other_pattern)


# ---------------------------------------------------------------- checksums and format versions


def flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def tensor_offset(path, name) -> int:
    """Where tensor ``name``'s bytes start in the file."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        return 8 + header_size + json.loads(f.read(header_size))[name]["data_offsets"][0]


def test_every_tensor_and_the_header_have_a_checksum(saved):
    _, path = saved
    with safe_open(path, "pt") as f:
        names, header = set(f.keys()), json.loads(f.metadata()["nxm"])
    assert header["format_version"] == 2 and header["checksums"]["algorithm"] == "xxh3_64"
    assert set(header["checksums"]["tensors"]) == names  # whatever each layout stores: no per-layout list
    assert header["checksums"]["tensors"]["0.values"]["dtype"] == "float16"
    assert len(header["checksums"]["header"]) == 16


@pytest.mark.parametrize("tensor", ["0.values", "0.metadata", "2.metadata", "3.bias", "1.weight"])
def test_a_flipped_bit_in_a_tensor_is_refused_naming_it(saved, tensor):
    _, path = saved
    flip_bit(path, tensor_offset(path, tensor), bit=1)
    with pytest.raises(nxm.CheckpointError, match=rf"tensor '{tensor}' does not match its checksum: the file is corrupt"):
        nxm.load(path, build_model())


def test_unverified_damage_can_load_as_a_different_model(saved):
    model, path = saved
    flip_bit(path, tensor_offset(path, "0.values") + 1, bit=6)  # the exponent of the first weight
    assert not torch.equal(run(nxm.load(path, build_model(), verify=False)), run(model))


CORRUPT_HEADERS = {
    "a layer field": (set_layer("2", "in_features", 63), "the nxm header does not match its checksum"),
    "the info": (lambda h: h["info"].__setitem__("source", "elsewhere"), "the nxm header does not match"),
    "a tensor's checksum": (
        lambda h: h["checksums"]["tensors"]["0.values"].__setitem__("digest", "0" * 16),
        "the nxm header does not match",
    ),
    "no checksums": (lambda h: h.pop("checksums"), "has no valid 'checksums' entry"),
    "another algorithm": (
        lambda h: h["checksums"].__setitem__("algorithm", "md5"),
        "checksum algorithm 'md5' is not 'xxh3_64'",
    ),
    "version 1 with checksums": (lambda h: h.__setitem__("format_version", 1), "format_version 1 with checksums"),
}


@pytest.mark.parametrize("case", CORRUPT_HEADERS)
def test_a_header_changed_without_new_checksums_is_refused(saved, case):
    _, path = saved
    edit, message = CORRUPT_HEADERS[case]
    rewrite(path, edit_header=edit, new_checksums=False)
    with pytest.raises(nxm.CheckpointError, match=message) as error:
        nxm.load(path)
    assert "the file is corrupt" in str(error.value) and not error.value.unreadable


def test_tensors_renamed_or_dropped_without_new_checksums_are_refused(saved):
    _, path = saved
    rewrite(path, edit_tensors=lambda t: t.__setitem__("extra", torch.zeros(2)), new_checksums=False)
    with pytest.raises(nxm.CheckpointError, match="tensor 'extra' has no checksum: the file is corrupt"):
        nxm.load(path)
    rewrite(path, edit_tensors=lambda t: t.pop("2.bias"), new_checksums=False)
    with pytest.raises(nxm.CheckpointError, match="tensor '2.bias' has a checksum but is missing"):
        nxm.load(path)


def test_the_header_checksum_covers_its_content_not_its_spelling(saved):
    model, path = saved
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    header = json.loads(metadata["nxm"])
    reordered = json.dumps(dict(reversed(list(header.items()))), indent=2)
    save_file(load_file(path), path, metadata={"nxm": reordered})
    assert torch.equal(run(nxm.load(path, build_model())), run(model))


def test_huge_lengths_and_deep_nesting_are_refused(tmp_path):
    path = tmp_path / "huge.safetensors"
    for size in (2**63, 2**64 - 1, 100_000_001):
        path.write_bytes(size.to_bytes(8, "little") + b"{}")
        with pytest.raises(nxm.CheckpointError, match="not a readable safetensors file") as error:
            nxm.load(path)
        assert error.value.unreadable
    save_file({"w": torch.zeros(2)}, path, metadata={"nxm": "[" * 100_000})
    with pytest.raises(nxm.CheckpointError, match="not valid JSON"):
        nxm.load(path)


DATA = Path(__file__).parent / "data"


def test_version_1_file_loads_with_a_warning_once(monkeypatch):
    monkeypatch.setattr(checkpoint, "_warned_unverifiable", set())
    expected = load_file(DATA / "checkpoint_v1_io.safetensors")
    with pytest.warns(UserWarning, match="format version 1 stores no checksums") as caught:
        model = nxm.load(DATA / "checkpoint_v1.safetensors", build_model())
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    for i in (0, 2, 3):
        model[i].backend = "reference"  # the backend the expected output was made with
    with torch.no_grad():
        assert torch.equal(model(expected["input"]), expected["output"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per path and process: no second warning
        assert nxm.load(DATA / "checkpoint_v1.safetensors").header["format_version"] == 1


def test_version_1_without_verification_does_not_warn(monkeypatch):
    monkeypatch.setattr(checkpoint, "_warned_unverifiable", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sorted(nxm.load(DATA / "checkpoint_v1.safetensors", verify=False).layers) == ["0", "2", "3"]


# ---------------------------------------------------------------- atomic saves


def test_a_save_that_raises_leaves_the_previous_file_and_no_temporary(saved, monkeypatch):
    import safetensors.torch

    _, path = saved
    before = path.read_bytes()
    real_save_file = safetensors.torch.save_file

    def fails_half_way(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fails_half_way)
    other = build_model()
    nxm.sparsify(other, "1:4")
    with pytest.raises(OSError, match="No space left"):
        nxm.save(other, path)
    assert os.listdir(path.parent) == [path.name] and path.read_bytes() == before
    nxm.load(path, build_model())


def test_a_saved_file_gets_the_mode_of_any_new_file(saved, tmp_path):
    """The staged file is private while written; the saved one follows the umask, like open()."""
    model, _ = saved
    old = os.umask(0o027)
    try:
        nxm.save(model, tmp_path / "shared.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.safetensors").stat().st_mode & 0o777 == 0o640


def writing(path) -> bool:
    """Whether a save to ``path`` has begun writing bytes into its temporary folder."""
    for staged in path.parent.glob(f".{path.name}.*.tmp/*"):
        try:
            if staged.stat().st_size:
                return True
        except FileNotFoundError:  # renamed meanwhile
            pass
    return False


def test_a_killed_save_leaves_the_previous_file(saved):
    _, path = saved
    before = path.read_bytes()
    big_save = (
        "import sys, torch, nxm_kernels as nxm\n"
        "model = torch.nn.Module()\n"
        "model.register_buffer('big', torch.ones(64 << 20))  # 256 MB: long enough to be killed part-way\n"
        "print('saving', flush=True)\n"
        "nxm.save(model, sys.argv[1])\n"
    )
    process = subprocess.Popen([sys.executable, "-c", big_save, str(path)], stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"saving\n"
        deadline = time.monotonic() + 60
        while not writing(path):
            assert process.poll() is None, "the save ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.001)
    finally:
        process.kill()  # SIGKILL: no cleanup runs
        process.wait()
    # The guarantee: the previous file or the complete new one (if a busy machine let the save
    # finish its rename before the kill landed), never a partial file under the target's name.
    if path.read_bytes() == before:
        nxm.load(path, build_model())
    else:
        assert nxm.load(path).tensors["big"].shape == (64 << 20,)
    leftovers = [p for p in os.listdir(path.parent) if p != path.name]
    assert all(p.startswith(f".{path.name}.") and p.endswith(".tmp") for p in leftovers) and len(leftovers) <= 1


def test_without_xxhash_the_package_imports_and_a_save_says_what_to_install(tmp_path):
    """A GPU server's own environment may lack xxhash: only checkpoints need it."""
    code = (
        "import sys; sys.modules['xxhash'] = None\n"
        "import torch, nxm_kernels as nxm\n"
        "model = torch.nn.Sequential(torch.nn.Linear(8, 8)); nxm.sparsify(model, include='0')\n"
        f"try:\n    nxm.save(model, {str(tmp_path / 'm.safetensors')!r})\n"
        "except ModuleNotFoundError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'xxhash>=2'" in out
