"""``SparseLinear``, a drop-in for ``nn.Linear`` holding an N:M weight compressed, and
``sparsify(model)``, which swaps a model's eligible ``nn.Linear`` layers for it.

SparseLinear talks only to the op surface (``compress``, ``decompress``, ``sparse_mm``) and
dispatch; whichever backend dispatch picks runs its forward.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, ops
from .formats import CUTLASS_PATTERN, LAYOUTS, NMSparseWeight, check_layout, cusparselt_multiples, cutlass_multiples
from .pattern import Pattern, PatternLike, as_pattern

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# What a SparseLinear stores (and saves). Backend-specific forms such as the cusparselt buffer are
# made on the device from these and never stored.
STORED_LAYOUTS = ("packed", "cutlass")
DERIVED_LAYOUTS = tuple(layout for layout in LAYOUTS if layout not in STORED_LAYOUTS)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def default_layout(dtype: torch.dtype, pattern: Pattern, out_features: int, in_features: int) -> str:
    """The layout ``SparseLinear`` picks when none is given.

    ``cutlass`` (the Sparse Tensor Core layout) when the dtype's hardware pattern is ``pattern``
    (2:4 for fp16/bf16, 1:2 for fp32) and the shape already fits it (``cutlass_multiples``), so no
    padding is spent just to reach it; otherwise ``packed``.
    """
    if CUTLASS_PATTERN.get(dtype) != pattern:
        return "packed"
    row_mult, col_mult = cutlass_multiples(dtype)
    return "cutlass" if out_features % row_mult == 0 and in_features % col_mult == 0 else "packed"


def padded_shape(out_features: int, in_features: int, pattern: Pattern, layout: str, dtype: torch.dtype):
    """The weight shape a layout holds: in_features padded to whole groups of m (``packed``), or
    rows and columns to the layout's multiples (``cutlass``, and the derived ``cusparselt``).
    Padding is zeros, never selected over a real value."""
    if layout == "cutlass":
        row_mult, col_mult = cutlass_multiples(dtype)
        return _round_up(out_features, row_mult), _round_up(in_features, col_mult)
    if layout == "cusparselt":  # a derived form: both dimensions to cuSPARSELt's multiple
        mult = cusparselt_multiples(dtype)[0]
        return _round_up(out_features, mult), _round_up(in_features, math.lcm(mult, pattern.m))
    return out_features, _round_up(in_features, pattern.m)


def _sparse_weight(values: torch.Tensor, metadata: torch.Tensor, pattern: Pattern, layout: str) -> NMSparseWeight:
    """Rebuild the (trusted) compressed weight from a module's buffers."""
    shape = (values.shape[0], values.shape[1] // pattern.n * pattern.m)
    return NMSparseWeight(values, metadata, shape, pattern, layout, check_metadata=False)


def _backend_arg(backend: str) -> str | None:
    # "auto" defers to dispatch's default, so NXM_BACKEND applies to modules built with "auto".
    return None if backend == "auto" else backend


# ---------------------------------------------------------------- the forward as custom ops
# torch.compile sees opaque ops with fake kernels instead of tracing into dispatch (which
# imports modules and reads the environment); eager calls run the same code.


@torch.library.custom_op("nxm::sparse_linear", mutates_args=())
def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_features: int,
    pattern: str,
    layout: str,
    backend: str,
    run_values: Optional[torch.Tensor],
    run_metadata: Optional[torch.Tensor],
    run_layout: str,
    run_shape: list[int],
) -> torch.Tensor:
    """``x @ W.T + bias`` for the N:M weight W stored padded in ``values``/``metadata``: pads
    ``x`` (zeros) and ``bias`` to the weight's shape and crops the output to ``out_features``.

    ``run_*``: a backend-specific form of the same weight (e.g. cuSPARSELt's buffer) to multiply
    with instead, when given; the stored form still serves the backward.
    """
    if run_values is not None:
        sw = NMSparseWeight(
            run_values, run_metadata, tuple(run_shape), as_pattern(pattern), run_layout, check_metadata=False
        )
    else:
        sw = _sparse_weight(values, metadata, as_pattern(pattern), layout)
    in_features = x.shape[-1]
    if in_features < sw.in_features:
        x = F.pad(x, (0, sw.in_features - in_features))
    if bias is not None and out_features < sw.out_features:
        bias = F.pad(bias, (0, sw.out_features - out_features))
    y = ops.sparse_mm(x, sw, bias, backend=_backend_arg(backend))
    return y[..., :out_features].contiguous() if out_features < sw.out_features else y


@sparse_linear.register_fake
def _(
    x, values, metadata, bias, out_features, pattern, layout, backend, run_values, run_metadata, run_layout, run_shape
):
    dtype = torch.int32 if x.dtype == torch.int8 else x.dtype
    return x.new_empty((*x.shape[:-1], out_features), dtype=dtype)


@torch.library.custom_op("nxm::sparse_linear_grad_input", mutates_args=())
def sparse_linear_grad_input(
    grad: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, in_features: int, pattern: str, layout: str
) -> torch.Tensor:
    """``grad @ W`` (the input gradient of ``sparse_linear``), W decompressed on the fly."""
    sw = _sparse_weight(values, metadata, as_pattern(pattern), layout)
    w = ops.decompress(sw)[: grad.shape[-1], :in_features]
    return (grad.to(torch.float32) @ w.to(torch.float32)).to(grad.dtype)


@sparse_linear_grad_input.register_fake
def _(grad, values, metadata, in_features, pattern, layout):
    return grad.new_empty((*grad.shape[:-1], in_features))


def _setup_context(ctx, inputs, output):
    x, values, metadata, _bias, _out_features, pattern, layout = inputs[:7]
    ctx.save_for_backward(values, metadata)
    ctx.in_features, ctx.pattern, ctx.layout = x.shape[-1], pattern, layout


def _backward(ctx, grad):
    values, metadata = ctx.saved_tensors
    grad_x = sparse_linear_grad_input(grad, values, metadata, ctx.in_features, ctx.pattern, ctx.layout)
    return (grad_x,) + (None,) * 11


sparse_linear.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- SparseLinear


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with W an N:M weight held compressed in buffers.

    Buffers (what ``state_dict`` holds): ``values`` and ``metadata`` of the weight padded to
    ``padded_shape`` (see :func:`padded_shape`), and ``bias`` ``[out_features]`` (or None). The
    weights are frozen (buffers, not parameters); gradients flow to the input.

    Build one with :meth:`from_dense`; the constructor makes an all-zero weight of the given size
    (like ``nn.Linear(in, out)``, to load a ``state_dict`` into).

    ``.to(dtype)``/``.half()``/``.float()`` convert the weight exactly. A layout that cannot hold
    the new dtype is re-encoded into the one ``from_dense(layout=None)`` would pick: e.g.
    ``.half()`` of an fp32 1:2 ``cutlass`` weight gives an fp16 1:2 ``packed`` weight (fp16's
    ``cutlass`` layout holds only 2:4), and ``.float()`` of an fp16 2:4 ``cutlass`` weight gives
    fp32 2:4 ``packed``. The pattern never changes.

    The forward may multiply with a backend-specific form of the weight instead (see
    :meth:`backend_form`); the output is the same weight's product either way.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        pattern: PatternLike = "2:4",
        layout: str | None = None,
        backend: str = "auto",
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        pattern = as_pattern(pattern)
        dtype = dtype or torch.get_default_dtype()
        _check_float(dtype)
        sw = _compress_layer(
            torch.zeros(out_features, in_features, dtype=dtype, device=device), pattern, layout, None, backend
        )
        bias_tensor = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._init(sw, bias_tensor, in_features, out_features, backend)

    def _init(self, sw: NMSparseWeight, bias, in_features: int, out_features: int, backend: str) -> None:
        if backend != "auto":
            dispatch.get_backend(backend)  # an unknown name fails here, not at the first forward
        if sw.layout not in STORED_LAYOUTS:
            raise ValueError(
                f"SparseLinear stores layout 'packed' or 'cutlass', not {sw.layout!r}; "
                "backend-specific forms are made from these on the device"
            )
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self.layout, self.backend = sw.pattern, sw.layout, backend
        self.register_buffer("values", sw.values)
        self.register_buffer("metadata", sw.metadata)
        self.register_buffer("bias", bias)
        self._run_form = None  # (key, backend-specific form or None): see backend_form()

    @classmethod
    def from_compressed(
        cls,
        sw: NMSparseWeight,
        bias: torch.Tensor | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
        backend: str = "auto",
    ) -> "SparseLinear":
        """Wrap a compressed weight. ``sw.shape`` must be :func:`padded_shape` of
        ``(out_features, in_features)`` (both default to ``sw.shape``)."""
        if not isinstance(sw, NMSparseWeight):
            raise TypeError(f"from_compressed takes an NMSparseWeight (from nxm.compress), got {type(sw).__name__}")
        _check_float(sw.dtype)
        out_features = sw.out_features if out_features is None else out_features
        in_features = sw.in_features if in_features is None else in_features
        want = padded_shape(out_features, in_features, sw.pattern, sw.layout, sw.dtype)
        if sw.shape != want:
            raise ValueError(
                f"a {out_features}x{in_features} {sw.pattern} {sw.layout} {sw.dtype} layer is stored as "
                f"{want[0]}x{want[1]}, but the weight is {sw.shape[0]}x{sw.shape[1]}: "
                "compress the weight padded as nxm.nn.padded_shape says (from_dense does this)"
            )
        if bias is not None and (bias.shape != (out_features,) or bias.dtype != sw.dtype or bias.device != sw.device):
            raise ValueError(
                f"bias must be {sw.dtype} [{out_features}] on {sw.device}, got {bias.dtype} "
                f"{list(bias.shape)} on {bias.device}"
            )
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._init(sw, bias, in_features, out_features, backend)
        return module

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        pattern: PatternLike = "2:4",
        mask: torch.Tensor | None = None,
        scores: torch.Tensor | None = None,
        backend: str = "auto",
        layout: str | None = None,
    ) -> "SparseLinear":
        """The layer with its weight projected onto ``pattern`` and compressed.

        Selection keeps the n largest ``|w|`` of every m (or the largest ``scores``, e.g. Wanda's
        ``|w| * ||x||``); ``mask`` (bool, at most n True per group, e.g. from training) keeps
        exactly the weights it marks instead. ``backend`` runs the forward (``"auto"``: dispatch's
        default, ``NXM_BACKEND`` when set). ``layout=None`` picks :func:`default_layout`, or
        ``packed`` when an explicit ``backend`` can run only that.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense takes an nn.Linear, got {type(linear).__name__}")
        pattern = as_pattern(pattern)
        w = linear.weight.detach()
        if mask is not None:
            if scores is not None:
                raise ValueError("give mask or scores, not both: a mask already decides what is kept")
            w = torch.where(_checked_mask(mask, w, pattern), w, torch.zeros((), dtype=w.dtype, device=w.device))
        if scores is not None:
            if not isinstance(scores, torch.Tensor) or scores.shape != w.shape:
                raise ValueError(f"scores must be a tensor of the weight's shape {tuple(w.shape)}")
            scores = scores.detach()
        sw = _compress_layer(w, pattern, layout, scores, backend)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_compressed(sw, bias, linear.in_features, linear.out_features, backend)

    @property
    def weight_sparse(self) -> NMSparseWeight:
        """The stored (padded) compressed weight."""
        return _sparse_weight(self.values, self.metadata, self.pattern, self.layout)

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.weight_sparse.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features in its last dimension, but this SparseLinear "
                f"takes in_features={self.in_features}"
            )
        if torch.compiler.is_compiling():
            run = self._run_form[1] if self._run_form is not None else None  # made by an eager call
        else:
            run = self.backend_form()
        return sparse_linear(
            x,
            self.values,
            self.metadata,
            self.bias,
            self.out_features,
            str(self.pattern),
            self.layout,
            self.backend,
            run.values if run is not None else None,
            run.metadata if run is not None else None,
            run.layout if run is not None else "",
            list(run.shape) if run is not None else [],
        )

    def backend_form(self) -> NMSparseWeight | None:
        """The backend-specific form the forward multiplies with (None: the stored one).

        Made lazily on the weight's device, the first time it is needed, through ``compress``
        into each layout a backend keeps for itself (``cusparselt``: cuSPARSELt's buffer on a
        GPU), when the backend this layer uses (explicit, or what ``auto`` picks) can make and
        run it. It is kept beside the stored form (so it costs memory), remade after ``.to()``,
        ``load_state_dict`` or in-place changes to the buffers, and never saved.
        """
        values, metadata = self.values, self.metadata
        versions = None if values.is_inference() else (values._version, metadata._version)
        key = (
            values.device,
            values.dtype,
            values.data_ptr(),
            metadata.data_ptr(),
            versions,
            self.backend,
            os.environ.get("NXM_BACKEND"),
        )
        if self._run_form is None or self._run_form[0] != key:
            self._run_form = (key, self._make_backend_form())
        return self._run_form[1]

    def _make_backend_form(self) -> NMSparseWeight | None:
        dtype, device, backend = self.values.dtype, self.values.device, _backend_arg(self.backend)
        for layout in DERIVED_LAYOUTS:
            shape = padded_shape(self.out_features, self.in_features, self.pattern, layout, dtype)
            try:
                check_layout(dtype, shape, self.pattern, layout)
                # Ask before decompressing: can a backend (the chosen one, or auto's pick) make it here?
                dispatch.select(
                    "compress",
                    backend,
                    {
                        "w": torch.empty(shape, dtype=dtype, device=device),
                        "pattern": self.pattern,
                        "layout": layout,
                        "scores": None,
                    },
                )
            except (TypeError, ValueError, dispatch.BackendNotSupported):
                continue
            dense = ops.decompress(self.weight_sparse)[: self.out_features, : self.in_features]
            sw = ops.compress(_pad(dense, shape, 0), self.pattern, layout, backend=backend)
            x = torch.zeros(1, shape[1], dtype=dtype, device=device)
            bias = None if self.bias is None else F.pad(self.bias, (0, shape[0] - self.out_features))
            try:
                dispatch.select("sparse_mm", backend, {"x": x, "sw": sw, "bias": bias})
            except dispatch.BackendNotSupported:
                continue
            return sw
        return None

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (weight = the N:M weight, dense), same dtype and device."""
        w = ops.decompress(self.weight_sparse)[: self.out_features, : self.in_features]
        linear = nn.utils.skip_init(
            nn.Linear,
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(w)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def _apply(self, fn, recurse=True):
        self._run_form = None
        before = dict(self._buffers)
        old = self.weight_sparse
        super()._apply(fn, recurse)
        try:
            self._reconcile(old, fn)
        except Exception:
            self._buffers.update(before)  # leave the module as it was
            raise
        return self

    def _reconcile(self, old: NMSparseWeight, fn) -> None:
        """After ``_apply`` converted the buffers one by one, make them one valid weight again."""
        values, metadata = self.values, self.metadata
        if not values.is_floating_point() or metadata.dtype != old.metadata.dtype:
            raise TypeError(
                f"this conversion turned SparseLinear values into {values.dtype} and metadata into "
                f"{metadata.dtype}: convert with .to(dtype)/.half()/.float()/.bfloat16(), which keep the "
                "metadata, or use .to_dense() first"
            )
        if values.dtype == old.dtype:
            return
        try:
            check_layout(values.dtype, old.shape, self.pattern, self.layout)
            NMSparseWeight(values, metadata, old.shape, self.pattern, self.layout, check_metadata=False)
            return  # this layout holds the new dtype with the same metadata (packed; cutlass fp16<->bf16)
        except ValueError:
            pass
        # Re-encode exactly through dense: the N:M weight cast to the new dtype is still N:M.
        dense = fn(ops.decompress(old))[: self.out_features, : self.in_features]
        sw = _compress_layer(dense, self.pattern, None, None, self.backend)
        self.layout = sw.layout
        self._buffers["values"], self._buffers["metadata"] = sw.values, sw.metadata

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._run_form = None
        values, metadata = state_dict.get(prefix + "values"), state_dict.get(prefix + "metadata")
        if values is not None and metadata is not None:
            if values.dtype != self.values.dtype:
                error_msgs.append(
                    f"{prefix}values are {values.dtype} but this SparseLinear is {self.values.dtype}: "
                    "a compressed weight cannot be cast while loading; build the module in the saved "
                    "dtype, load, then convert it with .to(dtype)"
                )
                return
            try:  # shapes, metadata dtype and every index, against this module's pattern and layout
                NMSparseWeight(values, metadata, self.padded_shape, self.pattern, self.layout)
            except (TypeError, ValueError) as e:
                error_msgs.append(
                    f"{prefix}values/metadata do not form this layer's {self.pattern} {self.layout} weight: {e}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={self.pattern}, layout={self.layout}, dtype={self.values.dtype}, backend={self.backend}"
        )


def _compress_layer(w: torch.Tensor, pattern: Pattern, layout: str | None, scores, backend: str) -> NMSparseWeight:
    """Pad ``w`` [out, in] (and ``scores``) to the layout's shape and compress it.

    ``layout=None``: :func:`default_layout`, unless an explicit ``backend`` cannot run ``sparse_mm``
    on that layout but can on ``packed`` (e.g. a GEMM that reads only ``packed``).
    """
    _check_float(w.dtype)
    out_features, in_features = w.shape
    if backend != "auto":
        dispatch.get_backend(backend)  # an unknown name fails here, not at the first forward
    if layout is not None and layout not in STORED_LAYOUTS:
        raise ValueError(
            f"SparseLinear stores layout 'packed' or 'cutlass' (or None: automatic), not {layout!r}; "
            "backend-specific forms are made from these on the device"
        )

    def compress(candidate: str) -> NMSparseWeight:
        shape = padded_shape(out_features, in_features, pattern, candidate, w.dtype)
        check_layout(w.dtype, shape, pattern, candidate)
        # Padded scores sit below every real score, so a padded position is never kept over a real one.
        padded_scores = (
            None
            if scores is None
            else _pad(scores, shape, torch.finfo(scores.dtype).min if scores.is_floating_point() else 0)
        )
        return ops.compress(_pad(w, shape, 0), pattern, candidate, scores=padded_scores)

    sw = compress(layout or default_layout(w.dtype, pattern, out_features, in_features))
    if layout is not None or backend == "auto" or sw.layout == "packed":
        return sw
    chosen = dispatch.get_backend(backend)

    def runs(candidate: NMSparseWeight) -> bool:
        x = torch.zeros(1, candidate.in_features, dtype=w.dtype, device=w.device)
        return not dispatch.reasons(chosen, "sparse_mm", {"x": x, "sw": candidate, "bias": None})

    if runs(sw):
        return sw
    packed = compress("packed")
    return packed if runs(packed) else sw


def _check_float(dtype: torch.dtype) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"SparseLinear holds float32, float16 or bfloat16 weights, got {dtype}: cast the layer "
            "first (e.g. linear.half()); int8 weights go through nxm.compress/nxm.sparse_mm"
        )


def _pad(t: torch.Tensor, shape, value) -> torch.Tensor:
    rows, cols = t.shape
    if (rows, cols) == tuple(shape):
        return t
    return F.pad(t, (0, shape[1] - cols, 0, shape[0] - rows), value=value)


def _checked_mask(mask, w: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.shape != w.shape:
        raise ValueError(f"mask must be a tensor of the weight's shape {tuple(w.shape)}")
    mask = mask.to(device=w.device, dtype=torch.bool)
    groups = _pad(mask, (mask.shape[0], _round_up(mask.shape[1], pattern.m)), False).reshape(-1, pattern.m)
    too_many = groups.sum(-1) > pattern.n
    if too_many.any():
        raise ValueError(
            f"mask keeps more than {pattern.n} of {pattern.m} in {int(too_many.sum())} group(s): "
            f"it is not a {pattern} mask (make one with nxm.nm_mask)"
        )
    return mask


# ---------------------------------------------------------------- sparsify(model)

Selector = Callable[[str, nn.Module], bool]

# Modules that read their child Linear's .weight directly (PyTorch's fused fast paths), so a
# swapped layer would break them or be bypassed.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@dataclass
class SparsifyReport:
    """What :func:`sparsify` did. ``model`` is the sparsified model (a copy when ``inplace=False``)."""

    model: nn.Module
    converted: dict[str, str] = field(default_factory=dict)  # layer name -> what it became
    skipped: dict[str, str] = field(default_factory=dict)  # layer name -> why not
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} linear layer(s), skipped {len(self.skipped)}"]
        lines += [f"  + {name}: {what}" for name, what in self.converted.items()]
        lines += [f"  - {name}: {why}" for name, why in self.skipped.items()]
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else 1.0
        lines.append(
            f"parameters {self.params_before:,} -> {self.params_after:,} (stored weights); "
            f"bytes {self.bytes_before:,} -> {self.bytes_after:,} ({ratio:.1%})"
        )
        return "\n".join(lines)


def model_size(model: nn.Module) -> tuple[int, int]:
    """(weights stored, bytes): parameters plus SparseLinear values and bias; bytes of every
    parameter and buffer (each tensor counted once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    params = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, SparseLinear):
            params += module.values.numel() + (module.bias.numel() if module.bias is not None else 0)
    return params, nbytes


def _selects(selector, name: str, module: nn.Module) -> str | None:
    """The glob of ``selector`` that matches ``name`` (or "the predicate"), None if none does."""
    if callable(selector):
        return "the predicate" if selector(name, module) else None
    globs = [selector] if isinstance(selector, str) else list(selector)
    return next((f"'{g}'" for g in globs if fnmatch.fnmatchcase(name, g)), None)


def sparsify(
    model: nn.Module,
    pattern: PatternLike = "2:4",
    include=None,
    exclude=None,
    scores=None,
    backend: str = "auto",
    inplace: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> SparsifyReport:
    """Swap the eligible ``nn.Linear`` layers of ``model`` for :class:`SparseLinear`.

    ``include``/``exclude``: name globs (``"encoder.*.intermediate.dense"``, a string or a list)
    or a predicate ``(name, module) -> bool``; by default every ``nn.Linear`` is included.
    ``scores``: ``{layer name: tensor}`` or ``(name, module) -> tensor``; a layer it gives no
    scores for is skipped (say so by leaving it out of ``include``). ``progress(done, total,
    name)`` is called after each layer. Layers are skipped, with the reason in the report, when
    their weight is tied to another module's, their parent reads their ``.weight`` directly
    (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``), or their dtype cannot be held.
    """
    pattern = as_pattern(pattern)
    if not inplace:
        model = copy.deepcopy(model)
    report = SparsifyReport(model)
    report.params_before, report.bytes_before = model_size(model)
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    parents = {}
    for parent_name, parent in model.named_modules():
        for child_name, _ in parent.named_children():
            parents[f"{parent_name}.{child_name}" if parent_name else child_name] = (parent, child_name)

    # Names, not modules: holding the modules would keep every dense weight alive until the end;
    # looking each layer up as it is swapped lets the converted ones go (conversion streams).
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for done, name in enumerate(names, 1):
        linear = model.get_submodule(name)
        why, layer_scores = _skip_reason(name, linear, include, exclude, scores, owners, parents)
        if why is None:
            try:
                sparse = SparseLinear.from_dense(linear, pattern, scores=layer_scores, backend=backend)
            except (TypeError, ValueError) as e:
                why = str(e)
        if why is None:
            sparse.train(linear.training)
            parent, child_name = parents[name]
            setattr(parent, child_name, sparse)
            dtype = str(sparse.values.dtype).removeprefix("torch.")
            # Weights already N:M (e.g. after ADMM training) convert without dropping any.
            dropped = int(torch.count_nonzero(linear.weight)) - int(torch.count_nonzero(sparse.values))
            report.converted[name] = (
                f"{linear.in_features}->{linear.out_features} {pattern} {sparse.layout} {dtype}, "
                + (f"dropped {dropped:,} nonzero weights" if dropped else "already N:M, nothing dropped")
            )
        else:
            report.skipped[name] = why
        if progress is not None:
            progress(done, len(names), name)
    report.params_after, report.bytes_after = model_size(model)
    return report


def _skip_reason(name, linear, include, exclude, scores, owners, parents):
    """(why ``linear`` is not converted or None, its scores)."""
    if include is not None and _selects(include, name, linear) is None:
        return "not selected by include", None
    if exclude is not None:
        matched = _selects(exclude, name, linear)
        if matched is not None:
            return f"excluded by {matched}", None
    parent = parents.get(name, (None, None))[0]
    if isinstance(parent, _READS_CHILD_WEIGHTS):
        return (
            f"its parent {type(parent).__name__} reads .weight directly (PyTorch's fused path), so a "
            "swapped layer would be bypassed; write the block with plain nn.Linear calls to sparsify it"
        ), None
    shared = [o for o in owners.get(id(linear.weight), []) if o != f"{name}.weight"]
    if shared:
        return f"weight is tied to {', '.join(shared)} (sparsifying one side would untie them)", None
    if linear.weight.is_meta:
        return "weight is on the meta device (not loaded yet): load the weights, then sparsify", None
    if linear.weight.dtype not in FLOAT_DTYPES:
        return f"dtype {linear.weight.dtype} cannot be held: cast the model to float32/float16/bfloat16", None
    if scores is None:
        return None, None
    layer_scores = scores(name, linear) if callable(scores) else scores.get(name)
    if layer_scores is None:
        return "no scores given for this layer", None
    return None, layer_scores
