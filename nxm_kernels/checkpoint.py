"""Compact checkpoints: ``save(model, path)`` / ``load(path, model=None, verify=True)``.

A checkpoint is one safetensors file (no pickle: loading executes no code) holding the model's
``state_dict`` — for each :class:`~nxm_kernels.nn.SparseLinear` the tensors its layout stores
(``values``, ``metadata``, ...) and ``bias`` — plus a JSON header in the safetensors metadata
under the key ``"nxm"``::

    {"format": "nxm-kernels", "format_version": 2, "nxm_version": "0.1.0",
     "layers": {"encoder.0.ffn.up": {"pattern": "2:4", "layout": "cutlass", "dtype": "float16",
                                      "in_features": 64, "out_features": 256, "shape": [256, 64],
                                      "bias": true}},
     "aliases": {"head.weight": "embed.weight"},    # tied tensors, stored once
     "info": {...},                                 # free-form (e.g. where the model came from)
     "checksums": {"algorithm": "xxh3_64",
                   "tensors": {"encoder.0.ffn.up.values": {"dtype": "float16", "shape": [256, 32],
                                                           "digest": "9f3c..."}, ...},
                   "header": "51ab..."}}

Integrity (format version 2): every tensor in the file has a digest of its bytes, whatever its
layout stores, and the header has one of its canonical JSON (sorted keys, compact separators,
without ``checksums.header``). ``load`` checks them all before it builds anything, so a damaged
file is refused instead of loading as a different model. Version-1 files (no checksums) still
load, with a warning once per path and process.

``load`` then validates everything before it touches a model: the header, every layer's
pattern, layout, dtype and shapes, and every metadata index (in range, not repeated within a group).

``save`` is atomic: safetensors writes into a temporary folder ``.<name>.<random>.tmp`` beside
the target, the file is fsynced and renamed over the target, and the folder is fsynced. A save
that raises removes the temporary folder; one killed part-way may leave it behind, but never a
partial file under the target's name: the previous checkpoint stays loadable.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import threading
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ._version import __version__
from .layouts import NMSparseWeight
from .layouts.weight import tensor_names
from .nn import FLOAT_DTYPES, SparseLinear
from .nn.policy import stored_layouts
from .nn.torch_layers import prepare_parents
from .encodings import as_encoding
from .pattern import as_pattern

FORMAT = "nxm-kernels"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksums
HEADER_KEY = "nxm"
# xxhash's XXH3 (64 bits): as fast as a memory copy, permissively licensed (benchmarks/RESULTS.md).
DIGEST_ALGORITHM = "xxh3_64"
_DTYPES = {str(d).removeprefix("torch."): d for d in FLOAT_DTYPES}
_LAYER_FIELDS = {"pattern", "layout", "dtype", "in_features", "out_features", "shape", "bias"}
# Written for quantized layers only: "encoding" ("int8", "int4-g128"; absent: "float") and
# "act_bits" (8: W8A8; absent: float activations). "dtype" is then the dtype they dequantize to.
_QUANT_FIELDS = {"encoding", "act_bits"}


class CheckpointError(ValueError):
    """The file is not a valid nxm checkpoint, or does not fit the model; the message says why.

    ``unreadable`` is True when the file could not be read as an nxm checkpoint at all (missing,
    not safetensors, truncated, no nxm header, a format version this package does not read);
    False when it was read and found corrupt or invalid, or does not fit the model.
    """

    def __init__(self, message: str, unreadable: bool = False):
        super().__init__(message)
        self.unreadable = unreadable


@dataclass
class SparseCheckpoint:
    """What ``load(path)`` returns without a model: the validated layers and everything else.

    ``layers``: ``{name: SparseLinear}``; ``tensors``: the other entries of the saved
    ``state_dict`` (dense parameters and buffers, tied ones resolved); ``header``: the JSON header.
    Put them into a model with ``nxm.load(path, model)``.
    """

    path: str
    header: dict
    layers: dict[str, SparseLinear] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def sparse_bytes(self) -> int:
        """Bytes of the sparse layers (values, metadata, bias) as stored."""
        return sum(layer_bytes(layer)[0] for layer in self.layers.values())

    def dense_bytes(self) -> int:
        """Bytes the sparse layers would take as dense ``nn.Linear`` of the same dtype."""
        return sum(layer_bytes(layer)[1] for layer in self.layers.values())


def layer_bytes(layer: SparseLinear) -> tuple[int, int]:
    """(bytes stored: the weight's tensors and the bias; bytes of the same layer as a dense nn.Linear)."""
    stored = layer.weight_sparse.nbytes + (layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0)
    # (the weight's dtype: a quantized layer's values are codes, its dense form is its float dtype)
    dense = (layer.in_features + (layer.bias is not None)) * layer.out_features * layer.weight_sparse.dtype.itemsize
    return stored, dense


def _layer_header(layer: SparseLinear) -> dict:
    return {
        "pattern": str(layer.pattern),
        "layout": layer.layout,
        "dtype": str(layer.weight_sparse.dtype).removeprefix("torch."),
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "shape": list(layer.padded_shape),
        "bias": layer.bias is not None,
        **({"encoding": str(layer.weight_sparse.encoding), "act_bits": layer.act_bits}
           if layer.weight_sparse.encoding.quantized else {}),
    }


def _xxh3(data) -> str:
    # Imported on use: a GPU server's environment without xxhash still imports the package and
    # runs everything but checkpoints, and this says what to install.
    try:
        import xxhash
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "nxm checkpoints need the xxhash package for their checksums: pip install 'xxhash>=2'"
        ) from None
    return xxhash.xxh3_64_hexdigest(data)


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _digest(tensor: torch.Tensor) -> str:
    """Digest of a CPU tensor's bytes, read in place (no copy, and no numpy, which torch does not require)."""
    tensor = tensor.contiguous()
    in_place = (ctypes.c_char * (tensor.numel() * tensor.element_size())).from_address(tensor.data_ptr())
    return _xxh3(in_place)


def _canonical_header(header: dict) -> bytes:
    """The header as the header digest covers it: sorted keys, compact, without that digest."""
    checksums = {k: v for k, v in header["checksums"].items() if k != "header"}
    return json.dumps({**header, "checksums": checksums}, sort_keys=True, separators=(",", ":")).encode()


def _seal(header: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """``header`` with the checksums of format version 2: each tensor's dtype, shape and digest,
    then the digest of the canonical header (which covers the tensors' entries)."""
    entries = {
        name: {"dtype": _dtype_name(t), "shape": list(t.shape), "digest": _digest(t)} for name, t in tensors.items()
    }
    sealed = {**header, "checksums": {"algorithm": DIGEST_ALGORITHM, "tensors": entries}}
    sealed["checksums"]["header"] = _xxh3(_canonical_header(sealed))
    return sealed


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _write_atomically(path, write) -> None:
    """``write(file)`` into a temporary folder beside ``path``, then put the file in place in one
    step: fsync it, rename it over ``path``, fsync the folder. Any exception removes the temporary
    folder and leaves ``path`` as it was. (safetensors creates its own temporary file inside
    ours, so a save killed part-way leaves only a ``.<name>.<random>.tmp`` folder.)"""
    directory, name = os.path.split(os.path.abspath(path))
    staging = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.tmp")
    os.mkdir(staging)
    try:
        staged = os.path.join(staging, name)
        write(staged)
        # The writer makes a private (0600) file: give it the mode any new file gets here.
        os.chmod(staged, 0o666 & ~_umask())
        _fsync(staged)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        _fsync(directory)


def save(model: nn.Module, path: str | os.PathLike, info: dict | None = None) -> None:
    """Write ``model``'s state_dict (sparse layers compressed), its checksums and the header to
    ``path``, atomically: the file at ``path`` is either the previous one or the complete new one.

    ``info``: a JSON-serialisable dict stored in the header as is (e.g. the model's source).
    """
    from safetensors.torch import save_file

    layers = {name: _layer_header(m) for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    storages: dict[int, int] = {}
    for tensor in state.values():
        ptr = tensor.untyped_storage().data_ptr()
        storages[ptr] = storages.get(ptr, 0) + 1
    tensors, aliases, seen = {}, {}, {}
    for name, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        key = (ptr, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key in seen and tensor.numel():  # a tied tensor: store it once
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.to("cpu").contiguous()
        # safetensors refuses tensors whose memory overlaps: views of one storage get a copy each.
        tensors[name] = tensor.clone() if storages[ptr] > 1 else tensor
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "nxm_version": __version__,
        "torch_version": torch.__version__,
        "layers": layers,
        "aliases": aliases,
        "info": info or {},
    }
    header = _seal(header, tensors)
    _write_atomically(
        os.fspath(path), lambda staged: save_file(tensors, staged, metadata={HEADER_KEY: json.dumps(header)})
    )


def _fail(path, what: str, unreadable: bool = False) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)}: {what}", unreadable)


def _read(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The header and every tensor, read once; the header's fields are checked, not its checksums."""
    import safetensors

    if not os.path.isfile(path):
        raise _fail(path, "no such file", unreadable=True)
    try:
        with safetensors.safe_open(os.fspath(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    # What a damaged file makes the parser raise varies (SafetensorError, OverflowError for a
    # huge length, RuntimeError from torch for an impossible tensor ...): each means unreadable.
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError, OverflowError, MemoryError) as e:
        raise _fail(
            path,
            f"not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or corrupt: "
            "write it again with nxm.save",
            unreadable=True,
        ) from None
    if HEADER_KEY not in metadata:
        raise _fail(
            path, "has no nxm header: it is a plain safetensors file, not one written by nxm.save", unreadable=True
        )
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
        raise _fail(
            path, f"nxm header is not valid JSON ({e}): the file is corrupt; write it again with nxm.save"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _fail(path, f"nxm header does not say format {FORMAT!r}: the file is corrupt or is not ours")
    version = header.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise _fail(
            path,
            f"format_version {version!r}, this nxm-kernels reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (written by nxm-kernels {header.get('nxm_version')!r}): "
            "the file is corrupt, or use a matching nxm-kernels",
            unreadable=True,
        )
    return header, tensors


def _verify(path, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Check the format-version-2 checksums: the header's, then every tensor's."""
    def corrupt(what):
        return _fail(path, f"{what}: the file is corrupt; write it again with nxm.save")

    checksums = header.get("checksums")
    if not (
        isinstance(checksums, dict)
        and isinstance(checksums.get("tensors"), dict)
        and isinstance(checksums.get("header"), str)
    ):
        raise corrupt("the nxm header has no valid 'checksums' entry, which format version 2 requires")
    if checksums.get("algorithm") != DIGEST_ALGORITHM:
        raise corrupt(f"checksum algorithm {checksums.get('algorithm')!r} is not {DIGEST_ALGORITHM!r}")
    if _xxh3(_canonical_header(header)) != checksums["header"]:
        raise corrupt("the nxm header does not match its checksum")
    recorded = checksums["tensors"]
    for name in sorted(set(tensors) | set(recorded)):
        if name not in recorded:
            raise corrupt(f"tensor {name!r} has no checksum")
        if name not in tensors:
            raise corrupt(f"tensor {name!r} has a checksum but is missing from the file")
        tensor, entry = tensors[name], recorded[name]
        stored = {"dtype": _dtype_name(tensor), "shape": list(tensor.shape)}
        if not isinstance(entry, dict) or {k: entry.get(k) for k in stored} != stored:
            raise corrupt(f"tensor {name!r} is {stored} but its checksum entry says {entry}")
        if entry.get("digest") != _digest(tensor):
            raise corrupt(f"tensor {name!r} does not match its checksum")


def _check_fields(path, header: dict) -> None:
    for key, kind in (("layers", dict), ("aliases", dict), ("info", dict)):
        if not isinstance(header.get(key), kind):
            raise _fail(path, f"nxm header field {key!r} is missing or not a {kind.__name__}")


def _build_layer(path, name: str, spec, tensors: dict) -> SparseLinear:
    def bad(what):
        return _fail(path, f"layer {name!r}: {what}")

    if not isinstance(spec, dict) or not (set(spec) == _LAYER_FIELDS or set(spec) == _LAYER_FIELDS | _QUANT_FIELDS):
        raise bad(f"header entry must have exactly the fields {sorted(_LAYER_FIELDS)}, plus {sorted(_QUANT_FIELDS)} "
                  "for a quantized layer")
    try:
        encoding = as_encoding(spec.get("encoding", "float"))
    except ValueError as e:
        raise bad(str(e)) from None
    if spec.get("act_bits") not in (None, 8):
        raise bad(f"act_bits {spec['act_bits']!r} is not one SparseLinear runs (8, or null)")
    try:
        pattern = as_pattern(spec["pattern"])
    except (TypeError, ValueError) as e:
        raise bad(f"pattern: {e}") from None
    layout = next((stored for stored in stored_layouts() if stored.name == spec["layout"]), None)
    if layout is None:  # unknown, or a backend's own form (Layout.stored False)
        names = ", ".join(stored.name for stored in stored_layouts())
        raise bad(f"layout {spec['layout']!r} is not one a checkpoint stores ({names})")
    if spec["dtype"] not in _DTYPES:
        raise bad(f"dtype {spec['dtype']!r} is not one SparseLinear holds ({', '.join(_DTYPES)})")
    ints = [spec["in_features"], spec["out_features"]] + (spec["shape"] if isinstance(spec["shape"], list) else [None])
    if len(ints) != 4 or not all(type(i) is int and i > 0 for i in ints) or not isinstance(spec["bias"], bool):
        raise bad("in_features, out_features and shape [rows, cols] must be positive integers, bias a bool")
    prefix = f"{name}." if name else ""
    # the layout's, plus W^T's for a transposable pattern, plus the encoding's (scales)
    names = tensor_names(layout, pattern) + encoding.tensor_names
    needed = list(names) + (["bias"] if spec["bias"] else [])
    missing = [prefix + k for k in needed if prefix + k not in tensors]
    if missing:
        raise bad(f"tensor(s) {', '.join(missing)} missing from the file")
    parts = {k: tensors[prefix + k] for k in names}
    values = parts["values"]
    dtype = _DTYPES[spec["dtype"]]
    if not encoding.quantized and values.dtype != dtype:
        raise bad(f"values are {values.dtype} but the header says {dtype}")
    try:  # the layout and the encoding validate: dtype/pattern/shape fit, tensors' shapes, every index and code
        sw = NMSparseWeight(**parts, shape=tuple(spec["shape"]), pattern=pattern, layout=layout, encoding=encoding,
                            float_dtype=dtype if encoding.quantized else None)
        return SparseLinear.from_compressed(
            sw, tensors[prefix + "bias"] if spec["bias"] else None, spec["in_features"], spec["out_features"],
            act_bits=spec.get("act_bits"),
        )
    except (TypeError, ValueError) as e:
        raise bad(str(e)) from None


def _read_checkpoint(path, verify: bool) -> SparseCheckpoint:
    header, tensors = _read(path)
    if header["format_version"] == 1 and "checksums" in header:  # a later file, its version altered
        raise _fail(path, "format_version 1 with checksums, which only version 2 has: the file is corrupt")
    if verify and header["format_version"] >= 2:
        _verify(path, header, tensors)
    _check_fields(path, header)
    for alias, target in header["aliases"].items():
        if not isinstance(target, str) or target not in tensors or alias in tensors:
            raise _fail(path, f"alias {alias!r} -> {target!r} does not name one stored tensor")
        tensors[alias] = tensors[target]
    checkpoint = SparseCheckpoint(os.fspath(path), header)
    claimed = set()
    for name, spec in header["layers"].items():
        checkpoint.layers[name] = _build_layer(path, name, spec, tensors)
        # whatever the layer's layout stores, by the names its state_dict gives them
        claimed.update(f"{name}.{k}" if name else k for k in checkpoint.layers[name].state_dict())
    checkpoint.tensors = {k: v for k, v in tensors.items() if k not in claimed}
    return checkpoint


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


_warned_unverifiable: set[str] = set()
_warned_lock = threading.Lock()


def _warn_no_checksums(path) -> None:
    """Warn once per file (by real path) and process that a version-1 file cannot be verified."""
    key = os.path.realpath(path)
    with _warned_lock:
        if key in _warned_unverifiable:
            return
        _warned_unverifiable.add(key)
    warnings.warn(
        f"{os.fspath(path)}: format version 1 stores no checksums, so damage to this file cannot be "
        "detected; load it and save it again with nxm.save to add them",
        UserWarning,
        stacklevel=3,
    )


def load(path: str | os.PathLike, model: nn.Module | None = None, *, verify: bool = True):
    """Read, verify and validate a checkpoint written by :func:`save`.

    ``verify``: check every tensor's and the header's checksum first (format version 2), and
    refuse a file that does not match them. ``verify=False`` skips that (the structure is still
    validated); a version-1 file has no checksums and loads with a warning.

    With ``model`` (the same architecture, dense or already sparsified): each saved sparse layer
    replaces the module of that name (an ``nn.Linear`` or ``SparseLinear`` of the same size and,
    for a ``SparseLinear``, the same pattern), converted to that module's device and dtype and
    keeping a ``SparseLinear``'s backend; every other tensor must match the model's ``state_dict``
    (names and shapes) and is loaded into it. Returns ``model``.

    Without ``model``: returns a :class:`SparseCheckpoint` (the validated ``SparseLinear`` layers
    by name, the other tensors, the header), e.g. to inspect a file or rebuild a model by hand.

    Raises :class:`CheckpointError` naming what is wrong, before changing the model.
    """
    checkpoint = _read_checkpoint(path, verify)
    if verify and checkpoint.header["format_version"] == 1:
        _warn_no_checksums(path)
    if model is None:
        return checkpoint
    modules = dict(model.named_modules())
    swaps = []
    for name, layer in checkpoint.layers.items():
        if name == "":
            raise _fail(path, "the file holds a single SparseLinear: use load(path).layers[''] instead")
        target = modules.get(name)
        if not isinstance(target, (nn.Linear, SparseLinear)):
            found = "nothing" if target is None else type(target).__name__
            raise _fail(
                path,
                f"layer {name!r} is sparse in the file but the model has {found} there: build the same architecture",
            )
        if (target.in_features, target.out_features) != (layer.in_features, layer.out_features):
            raise _fail(
                path,
                f"layer {name!r} is {layer.in_features}->{layer.out_features} in the file but "
                f"{target.in_features}->{target.out_features} in the model",
            )
        if (target.bias is not None) != (layer.bias is not None):
            raise _fail(
                path,
                f"layer {name!r}: bias is {layer.bias is not None} in the file "
                f"but {target.bias is not None} in the model",
            )
        if isinstance(target, SparseLinear):
            if target.pattern != layer.pattern:
                raise _fail(
                    path,
                    f"pattern mismatch: layer {name!r} is {layer.pattern} in the file "
                    f"but {target.pattern} in the model",
                )
            layer.backend = target.backend
            device, dtype = target.values.device, target.weight_sparse.dtype  # (a quantized layer's float dtype)
        else:
            device, dtype = target.weight.device, target.weight.dtype
        swaps.append((name, layer, device, dtype))
    # Check the rest against the model as it will be, before changing anything.
    dense_state = checkpoint.tensors
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(f"{n}.") for n, *_ in swaps)}
    missing, unexpected = sorted(set(expected) - set(dense_state)), sorted(set(dense_state) - set(expected))
    problems = [f"missing {_some(missing)}"] if missing else []
    problems += [f"unexpected {_some(unexpected)}"] if unexpected else []
    problems += [
        f"{k} is {list(v.shape)} in the file but {list(expected[k].shape)} in the model"
        for k, v in dense_state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise _fail(
            path,
            f"does not fit this model: {'; '.join(problems)}. Build the same architecture (and "
            "sparsify it the same way) before loading",
        )
    model.load_state_dict(dense_state, strict=False)
    for name, layer, device, dtype in swaps:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer.train(getattr(parent, child).training)
        setattr(parent, child, layer.to(device=device, dtype=dtype))
    prepare_parents(model)  # PyTorch Transformer layers must call their sparse children as modules
    return model
