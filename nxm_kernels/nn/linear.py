"""``SparseLinear``: a drop-in for ``nn.Linear`` holding an N:M weight compressed.

It talks only to the op surface (``compress``, ``decompress``, ``sparse_mm``) and dispatch;
whichever backend dispatch picks runs its forward.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch, ops
from ..layouts import NMSparseWeight
from ..layouts.weight import TRANSPOSED_NAMES, tensor_names
from ..pattern import PatternLike, as_pattern
from .autograd import linear_plan, sparse_linear
from .policy import (
    _backend_arg,
    _check_float,
    _check_stored,
    _checked_mask,
    _compress_layer,
    _pad,
    _sparse_weight,
    derived_layouts,
)

# Backends may refuse tensors of 2**31 elements or more (32-bit offsets): an eager plan made for a
# smaller input does not serve a larger one.
_LARGE_INPUT = 2**31

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

    def _init(self, sw: NMSparseWeight, bias, in_features: int, out_features: int, backend: str,
              act_bits: int | None = None) -> None:
        if backend != "auto":
            dispatch.get_backend(backend)  # an unknown name fails here, not at the first forward
        _check_stored(sw.layout)
        if act_bits is not None and (act_bits != 8 or not sw.encoding.quantized):
            raise ValueError(f"act_bits={act_bits!r} with {sw.encoding} weights: act_bits=8 (W8A8) needs "
                             "weight_bits=8 (or 4); leave act_bits=None for float activations")
        self._encoding, self._float_dtype, self.act_bits = sw.encoding, sw.float_dtype, act_bits
        self.in_features, self.out_features = in_features, out_features
        self.pattern, self._layout, self.backend = sw.pattern, sw.layout, backend
        self._shape = sw.shape
        for name, tensor in sw.tensors().items():  # values, metadata, and what else the weight holds (W^T's)
            self.register_buffer(name, tensor)
        self.register_buffer("bias", bias)
        self._run_form = None  # (key, backend-specific form or None): see backend_form()
        self._plan = None  # (key, callable of x, the buffers): the eager forward, see forward()

    @classmethod
    def from_compressed(
        cls,
        sw: NMSparseWeight,
        bias: torch.Tensor | None = None,
        in_features: int | None = None,
        out_features: int | None = None,
        backend: str = "auto",
        act_bits: int | None = None,
    ) -> "SparseLinear":
        """Wrap a compressed weight. ``sw.shape`` must be :func:`padded_shape` of
        ``(out_features, in_features)`` (both default to ``sw.shape``)."""
        if not isinstance(sw, NMSparseWeight):
            raise TypeError(f"from_compressed takes an NMSparseWeight (from nxm.compress), got {type(sw).__name__}")
        _check_float(sw.dtype)
        out_features = sw.out_features if out_features is None else out_features
        in_features = sw.in_features if in_features is None else in_features
        want = sw.layout.padded_shape(out_features, in_features, sw.pattern, sw.encoding.element_dtype(sw.dtype))
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
        module._init(sw, bias, in_features, out_features, backend, act_bits)
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
        weight_bits: int | None = None,
        group_size: int | None = None,
        act_bits: int | None = None,
    ) -> "SparseLinear":
        """The layer with its weight projected onto ``pattern`` and compressed.

        ``weight_bits=8`` or ``4`` stores the kept values as int8/int4 codes with fp32 scales per
        row or per ``group_size`` input features (``nxm.compress(bits=, group_size=)``); the
        forward dequantizes inside the GEMM (W8A16/W4A16), or with ``act_bits=8`` quantizes the
        activations per token and multiplies integers (W8A8).

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
        sw = _compress_layer(w, pattern, layout, scores, backend, weight_bits, group_size)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_compressed(sw, bias, linear.in_features, linear.out_features, backend, act_bits)

    @property
    def layout(self) -> str:
        """The name of the stored layout (the Layout object: ``weight_sparse.layout``)."""
        return self._layout.name

    @property
    def weight_sparse(self) -> NMSparseWeight:
        """The stored (padded) compressed weight."""
        return _sparse_weight(self.values, self.metadata, self._shape, self.pattern, self._layout, **self._transposed(),
                              **self._encoded(getattr(self, "scales", None)))

    def _encoded(self, scales) -> dict:
        """A quantized weight's fields besides its layout's (empty for the float encoding)."""
        if not self._encoding.quantized:
            return {}
        return {"scales": scales, "encoding": self._encoding, "float_dtype": self._float_dtype}

    def _transposed(self) -> dict:
        """W^T's buffers, for a transposable pattern (empty otherwise)."""
        return {name: getattr(self, name) for name in tensor_names(self._layout, self.pattern) if name in TRANSPOSED_NAMES}

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self._shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if compiling or (x.requires_grad and torch.is_grad_enabled()):
            # One opaque op for torch.compile (no graph break), with its autograd formula.
            if x.shape[-1] != self.in_features:
                raise self._features_error(x)
            run_form = self._run_form  # compiling reads what an eager call made, never makes it
            run = (run_form[1] if run_form is not None else None) if compiling else self.backend_form()
            return sparse_linear(*self._op_args(x, run))
        # Eager: what the op would check and choose, done once per plan key; a call runs the plan.
        plan = self._plan  # one read: another thread may replace it
        key = self._plan_key(x)
        if plan is None or plan[0] != key:
            if x.shape[-1] != self.in_features:
                raise self._features_error(x)
            # (the buffers are held with the plan, so the ids in its key stay theirs)
            plan = self._plan = (key, linear_plan(*self._op_args(x, self.backend_form())), self._buffers.copy())
        return plan[1](x)

    def _features_error(self, x: torch.Tensor) -> ValueError:
        return ValueError(
            f"input has {x.shape[-1]} features in its last dimension, but this SparseLinear "
            f"takes in_features={self.in_features}"
        )

    def _plan_key(self, x: torch.Tensor) -> tuple:
        """What an eager plan depends on: x's features, dtype and device (not its batch dimensions),
        the backend asked for (``NXM_BACKEND`` included), and each buffer's identity and version, which
        ``.to()``, ``load_state_dict`` and in-place changes move. (Inference tensors have no version:
        an in-place change to a buffer made under ``torch.inference_mode`` is not seen.)"""
        return (
            x.shape[-1], x.dtype, x.device, x.numel() < _LARGE_INPUT, self.backend, os.environ.get("NXM_BACKEND"),
            *[(id(t), None if t is None or t.is_inference() else t._version) for t in self._buffers.values()],
        )

    def _op_args(self, x: torch.Tensor, run: NMSparseWeight | None) -> tuple:
        """The arguments of ``torch.ops.nxm.sparse_linear`` (and of ``linear_plan``) for this layer."""
        transposed = tuple(self._transposed().values()) or (None, None)
        quantized = () if not self._encoding.quantized else (self.scales, str(self._encoding), self.act_bits or 0)
        return (
            x,
            self.values,
            self.metadata,
            self.bias,
            list(self._shape),
            self.out_features,
            str(self.pattern),
            self._layout.name,
            self.backend,
            run.values if run is not None else None,
            run.metadata if run is not None else None,
            run.layout.name if run is not None else "",
            list(run.shape) if run is not None else [],
            *transposed,
            *quantized,
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
        if self._encoding.quantized:
            return None  # the derived forms (cuSPARSELt's buffer) are made from float weights
        dtype, device, backend = self.values.dtype, self.values.device, _backend_arg(self.backend)
        for layout in derived_layouts():
            if layout.kind_reasons(self.pattern):
                continue
            shape = layout.padded_shape(self.out_features, self.in_features, self.pattern, dtype)
            try:
                layout.check(dtype, shape, self.pattern)
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
        self._run_form = self._plan = None
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
        if self._encoding.quantized:
            # Integer codes and metadata only move; the fp32 scales stay fp32; the dtype the layer
            # computes in follows the conversion.
            self._buffers["scales"] = old.scales.to(values.device)
            self._float_dtype = fn(torch.empty(0, dtype=old.dtype, device=old.device)).dtype
            _check_float(self._float_dtype)
            return
        if not values.is_floating_point() or metadata.dtype != old.metadata.dtype:
            raise TypeError(
                f"this conversion turned SparseLinear values into {values.dtype} and metadata into "
                f"{metadata.dtype}: convert with .to(dtype)/.half()/.float()/.bfloat16(), which keep the "
                "metadata, or use .to_dense() first"
            )
        if values.dtype == old.dtype:
            return
        try:
            NMSparseWeight(values, metadata, old.shape, self.pattern, self._layout, check_metadata=False,
                           **self._transposed())
            return  # this layout holds the new dtype with the same metadata (packed; cutlass fp16<->bf16)
        except (TypeError, ValueError):
            pass
        # Re-encode exactly through dense: the N:M weight cast to the new dtype is still N:M.
        dense = fn(ops.decompress(old))[: self.out_features, : self.in_features]
        sw = _compress_layer(dense, self.pattern, None, None, self.backend)
        self._layout, self._shape = sw.layout, sw.shape
        self._buffers.update(sw.tensors())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        self._run_form = self._plan = None
        values, metadata = state_dict.get(prefix + "values"), state_dict.get(prefix + "metadata")
        if values is not None and metadata is not None:
            if values.dtype != self.values.dtype:
                error_msgs.append(
                    f"{prefix}values are {values.dtype} but this SparseLinear is {self.values.dtype}: "
                    "a compressed weight cannot be cast while loading; build the module in the saved "
                    "dtype, load, then convert it with .to(dtype)"
                )
                return
            transposed = {name: state_dict.get(prefix + name) for name in self._transposed()}
            try:  # shapes, metadata dtype and every index, against this module's pattern and layout
                NMSparseWeight(values, metadata, self.padded_shape, self.pattern, self._layout, **transposed,
                               **self._encoded(state_dict.get(prefix + "scales")))
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
            f"pattern={self.pattern}, layout={self.layout}, dtype={self.weight_sparse.dtype}, backend={self.backend}"
            + (f", encoding={self._encoding}" if self._encoding.quantized else "")
            + (f", act_bits={self.act_bits}" if self.act_bits else "")
        )
