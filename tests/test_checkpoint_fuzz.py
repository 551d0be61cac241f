"""Random damage to checkpoints: every damaged copy is refused with CheckpointError or loads as
exactly the saved model. One checkpoint per stored layout and value dtype, and per quantized
encoding each layout holds (int8 per row, int4 in groups; fp32 weights), four kinds of damage:
one bit flipped in the JSON header, one bit flipped in the tensor data, the file truncated, a run
of up to 15 random bytes written anywhere. Without verification, the same damage loads silently
as a different model, which is what the checksums are for."""

import random

import pytest
import torch
from torch import nn

import nxm_kernels as nxm
from nxm_kernels.encodings import as_encoding
from nxm_kernels.layouts import get_layout
from nxm_kernels.nn import FLOAT_DTYPES, STORED_LAYOUTS, SparseLinear

COPIES_PER_KIND = 25  # x 4 kinds x each checkpoint of CASES
KINDS = ("header bit", "data bit", "truncation", "random run")
QUANTIZED = ("int8", "int4-g32", "int4-g64")  # each quantized encoding kind (tiled_q: groups of 64 or more)
# (layout, encoding, dtype): every stored layout that holds float values in every float dtype, and
# every quantized encoding it holds.
CASES = [(layout, "float", dtype) for layout in STORED_LAYOUTS if "float" in get_layout(layout).encodings
         for dtype in FLOAT_DTYPES] + [
    (layout, encoding, torch.float32)
    for layout in STORED_LAYOUTS
    for encoding in QUANTIZED
    if not get_layout(layout).encoding_reasons(as_encoding(encoding))
]


def dense_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 8)).to(dtype)


def sparse_model(layout, dtype, encoding="float"):
    """``dense_model`` with its first Linear in ``layout`` and ``encoding``, in the first pattern
    the layout holds for ``dtype`` (cutlass: 2:4 for fp16/bf16 and int8, 1:2 for fp32; block: 2:2x2)."""
    model = dense_model(dtype)
    encoding = as_encoding(encoding)
    for pattern in ("2:4", "1:2", "2:2x2"):
        try:
            model[0] = SparseLinear.from_dense(model[0], pattern, layout=layout, weight_bits=encoding.bits,
                                               group_size=encoding.group_size)
            return model
        except (TypeError, ValueError):
            continue
    raise AssertionError(f"layout {layout} holds {dtype} in none of 2:4, 1:2, 2:2x2")


def outputs(model, dtype):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        return model(x)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def damage(data: bytes, kind: str, rng: random.Random) -> bytes:
    header_end = 8 + int.from_bytes(data[:8], "little")
    copy = bytearray(data)
    if kind == "header bit":
        copy[rng.randrange(8, header_end)] ^= 1 << rng.randrange(8)
    elif kind == "data bit":
        copy[rng.randrange(header_end, len(data))] ^= 1 << rng.randrange(8)
    elif kind == "truncation":
        del copy[rng.randrange(len(data)) :]
    else:
        length = rng.randint(1, 15)
        start = rng.randrange(len(data) - length + 1)
        copy[start : start + length] = rng.randbytes(length)
    return bytes(copy)


def fuzz(tmp_path, verify: bool) -> dict[str, list[str]]:
    """Load damaged copies of each checkpoint; the copies sorted by outcome."""
    rng = random.Random(21)
    found = {"refused": [], "identical": [], "silently different": [], "crashed": []}
    for layout, encoding, dtype in CASES:
        model = sparse_model(layout, dtype, encoding)
        assert model[0].layout == layout and model[0].weight_sparse.encoding == encoding
        saved, damaged = tmp_path / "saved.safetensors", tmp_path / "damaged.safetensors"
        nxm.save(model, saved)
        data, expected, state = saved.read_bytes(), outputs(model, dtype), model.state_dict()
        for kind in KINDS:
            for _ in range(COPIES_PER_KIND):
                damaged.write_bytes(damage(data, kind, rng))
                case = f"{layout} {encoding} {dtype} {kind}"
                try:
                    loaded = nxm.load(damaged, dense_model(dtype), verify=verify)
                    got, got_state = outputs(loaded, dtype), loaded.state_dict()
                except nxm.CheckpointError:
                    found["refused"].append(case)
                    continue
                except Exception as e:  # what the test is looking for: any other exception
                    found["crashed"].append(f"{case}: {type(e).__name__}: {e}")
                    continue
                unchanged = same_bits(got, expected) and all(
                    same_bits(got_state[k], v) for k, v in state.items()
                )
                found["identical" if unchanged else "silently different"].append(case)
    assert sum(map(len, found.values())) == len(CASES) * len(KINDS) * COPIES_PER_KIND
    return found


def test_cases_cover_every_stored_layout_and_encoding():
    held = {(layout, kind) for layout in STORED_LAYOUTS for kind in get_layout(layout).encodings}
    covered = {(layout, as_encoding(encoding).name) for layout, encoding, _ in CASES}
    assert covered == held
    assert {"int8", "int4"} <= {kind for _, kind in held}


def test_every_damaged_copy_is_refused_or_loads_identically(tmp_path):
    found = fuzz(tmp_path, verify=True)
    assert sum(map(len, found.values())) >= 500
    assert found["crashed"] == []
    assert found["silently different"] == []
    assert len(found["refused"]) > 0.9 * sum(map(len, found.values()))


@pytest.mark.filterwarnings("ignore::UserWarning")  # a damaged version number can make it read as version 1
def test_without_verification_damage_loads_as_a_different_model(tmp_path):
    found = fuzz(tmp_path, verify=False)
    assert found["crashed"] == []
    assert len(found["silently different"]) > 0
