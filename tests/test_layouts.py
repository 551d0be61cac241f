"""Layouts are objects: a new one is one module plus one registration.

The toy layout below lives only in this file. Registered, it runs through every path a built-in
layout does (compress, decompress, sparse_mm on the reference backend, SparseLinear, save/load),
with no package file changed. The rest checks the built-in layouts' objects and the padding-bit
refusal (a planted-bug check: packed metadata with a set padding bit is refused everywhere a weight
comes in from outside).
"""

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import nxm_kernels as nxm
from nxm_kernels import dispatch, reference
from nxm_kernels.layouts import Layout, TensorSpec, get_layout, register_layout, unregister_layout
from nxm_kernels.pattern import Pattern

from conftest import random_weight


class ToyLayout(Layout):
    """values: the projected weight, dense; metadata: the bool mask of the kept entries."""

    name = "toy"
    description = "a dense masked copy plus a bitmap (test only)"
    value_dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def storage(self, dtype, shape, pattern):
        return {"values": TensorSpec(tuple(shape), dtype), "metadata": TensorSpec(tuple(shape), torch.bool)}

    def check_metadata(self, values, metadata, shape, pattern):
        kept = metadata.reshape(-1, pattern.m).sum(-1)
        if bool((kept > pattern.n).any()):
            raise ValueError(f"corrupt toy bitmap: a group keeps more than {pattern.n}")
        if bool((values[~metadata] != 0).any()):
            raise ValueError("corrupt toy values: a dropped entry is not zero")

    def compress(self, w, pattern, scores=None):
        mask = reference.nm_mask(w, pattern, scores)
        return torch.where(mask, w, torch.zeros((), dtype=w.dtype)), mask

    def decompress(self, values, metadata, shape, pattern):
        return torch.where(metadata, values, torch.zeros((), dtype=values.dtype))


def _header(path) -> dict:
    """The safetensors metadata of a file, to write it back around altered tensors."""
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))["__metadata__"]


@pytest.fixture
def toy():
    layout = register_layout(ToyLayout())
    yield layout
    unregister_layout(layout.name)


def test_toy_layout_compress_decompress_sparse_mm(toy):
    w = random_weight((8, 16), torch.float32, torch.Generator().manual_seed(0))
    assert "toy" in nxm.LAYOUTS
    sw = nxm.compress(w, "2:4", layout="toy")
    assert sw.layout is toy and sw.layout == "toy" and sw.metadata.dtype == torch.bool
    assert torch.equal(nxm.decompress(sw), nxm.project(w, "2:4"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(nxm.sparse_mm(x, sw), x @ nxm.project(w, "2:4").T)
    # Validation goes through the layout: a corrupt bitmap is refused.
    bad = sw.metadata.clone()
    bad[0, :4] = True
    with pytest.raises(ValueError, match="corrupt toy bitmap"):
        nxm.NMSparseWeight(sw.values, bad, sw.shape, "2:4", "toy")
    # Backends that do not handle it say so, from their tables.
    why = dispatch.reasons(dispatch.get_backend("native"), "decompress", {"sw": sw})
    assert why and "not 'toy'" in why[0]


def test_toy_layout_sparse_linear_and_checkpoint(toy, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(14, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(5, 14)
    masked = copy.deepcopy(model)
    sparse = nn.Sequential(nxm.SparseLinear.from_dense(model[0], "2:4", layout="toy"), nn.ReLU(),
                           nxm.SparseLinear.from_dense(model[2], "1:4", layout="toy"))
    assert sparse[0].layout == "toy" and sparse[0].padded_shape == (8, 16)  # in_features padded to groups of 4
    with torch.no_grad():
        for i, pattern in ((0, "2:4"), (2, "1:4")):
            w = model[i].weight
            padded = torch.nn.functional.pad(w, (0, -w.shape[1] % 4))  # zeros, never kept over a real value
            masked[i].weight.copy_(nxm.project(padded, pattern)[:, : w.shape[1]])
    torch.testing.assert_close(sparse(x), masked(x))

    path = tmp_path / "toy.safetensors"
    nxm.save(sparse, path)
    loaded = nxm.load(path)
    assert loaded.layers["0"].layout == "toy" and loaded.layers["0"].metadata.dtype == torch.bool
    fresh = nxm.load(path, nn.Sequential(nn.Linear(14, 8), nn.ReLU(), nn.Linear(8, 4)))
    torch.testing.assert_close(fresh(x), sparse(x), rtol=0, atol=0)

    # The checkpoint is validated by the layout too.
    tensors = load_file(path)
    header = _header(path)
    tensors["0.metadata"] = torch.ones_like(tensors["0.metadata"])
    save_file(tensors, path, metadata=header)
    with pytest.raises(nxm.CheckpointError, match="layer '0'.*corrupt toy bitmap"):
        nxm.load(path, verify=False)


def test_unknown_and_duplicate_layouts():
    with pytest.raises(ValueError, match="unknown layout 'toy'"):
        get_layout("toy")
    with pytest.raises(TypeError, match="named Layout"):
        register_layout(Layout())
    with pytest.raises(ValueError, match="already registered"):
        register_layout(type(get_layout("packed"))())


# ------------------------------------------------------------------ the built-in layout objects


@pytest.mark.parametrize("name", ["packed", "cutlass", "cusparselt"])
def test_builtin_layouts_are_objects_resolved_once(name):
    layout = get_layout(name)
    assert get_layout(layout) is layout and str(layout) == name and layout == name
    assert layout.stored == (name != "cusparselt")
    assert layout.tensor_names == ("values", "metadata")


@pytest.mark.parametrize("dtype, pattern", [(torch.float16, "2:4"), (torch.float32, "1:2"), (torch.int8, "2:4")])
def test_storage_is_what_compress_makes(dtype, pattern):
    p = Pattern.parse(pattern)
    w = random_weight((32, 64), dtype, torch.Generator().manual_seed(1))
    for layout in (get_layout("packed"), get_layout("cutlass")):
        values, metadata = layout.compress(w, p)
        specs = layout.storage(dtype, w.shape, p)
        assert (tuple(values.shape), values.dtype) == (specs["values"].shape, specs["values"].dtype)
        assert (tuple(metadata.shape), metadata.dtype) == (specs["metadata"].shape, specs["metadata"].dtype)


def test_padded_shapes():
    p24 = Pattern(2, 4)
    assert get_layout("packed").padded_shape(10, 30, p24, torch.float16) == (10, 32)
    assert get_layout("cutlass").padded_shape(10, 30, p24, torch.float16) == (32, 32)
    assert get_layout("cutlass").padded_shape(10, 30, Pattern(1, 2), torch.float32) == (32, 32)
    assert get_layout("cusparselt").padded_shape(10, 30, p24, torch.float16) == (16, 32)
    assert get_layout("cusparselt").padded_shape(10, 30, Pattern(1, 2), torch.float32) == (16, 32)


def test_reasons_in_the_backend_style():
    cutlass = get_layout("cutlass")
    assert cutlass.not_supported_reasons(torch.float16, (32, 64), Pattern(2, 4)) == []
    assert "only as 2:4" in cutlass.not_supported_reasons(torch.float16, (32, 64), Pattern(1, 4))[0]
    assert "cannot hold dtype torch.float64" in cutlass.not_supported_reasons(torch.float64, (32, 64), Pattern(2, 4))[0]
    assert "2-D" in get_layout("packed").not_supported_reasons(torch.float16, (2, 4, 8), Pattern(2, 4))[0]
    assert "not divisible by m=4" in get_layout("packed").not_supported_reasons(torch.float16, (4, 10), Pattern(2, 4))[0]


# ------------------------------------------------------------------ planted bug: a set padding bit


def _with_padding_bit(metadata):
    """1:4 of 12 columns: 3 indices x 2 bits, so the top 2 bits of each row's byte are padding."""
    bad = metadata.clone()
    bad[1, -1] |= 0b1000_0000
    return bad


def test_padding_bit_is_refused_on_construction_and_check():
    sw = nxm.compress(torch.randn(4, 12), "1:4", layout="packed")
    bad = _with_padding_bit(sw.metadata)
    with pytest.raises(ValueError, match="padding bits"):
        nxm.NMSparseWeight(sw.values, bad, sw.shape, sw.pattern, "packed")
    unchecked = nxm.NMSparseWeight(sw.values, bad, sw.shape, sw.pattern, "packed", check_metadata=False)
    with pytest.raises(ValueError, match="padding bits"):
        unchecked.check()
    layer = nxm.SparseLinear.from_dense(nn.Linear(12, 4), "1:4", layout="packed")
    state = layer.state_dict()
    state["metadata"] = _with_padding_bit(state["metadata"])
    with pytest.raises(RuntimeError, match="padding bits"):
        layer.load_state_dict(state)


def test_padding_bit_is_refused_on_checkpoint_load(tmp_path):
    model = nn.Sequential(nn.Linear(12, 4))
    model[0] = nxm.SparseLinear.from_dense(nn.Linear(12, 4), "1:4", layout="packed")
    path = tmp_path / "m.safetensors"
    nxm.save(model, path)
    nxm.load(path)  # valid as written
    header = _header(path)
    tensors = load_file(path)
    tensors["0.metadata"] = _with_padding_bit(tensors["0.metadata"])
    save_file(tensors, path, metadata=header)
    with pytest.raises(nxm.CheckpointError, match="padding bits"):
        nxm.load(path, verify=False)  # (the digests would refuse the altered file first)
