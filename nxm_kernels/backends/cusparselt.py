"""Sparse Tensor Core GEMM through cuSPARSELt (``torch.ops.nxm.cusparselt_*`` in ``nxm_kernels._C``).

Weights live in the ``cusparselt`` layout: the opaque buffer of cuSPARSELt's compress, made on a GPU
from a dense weight (``nxm.compress(w, "2:4", layout="cusparselt")``; from ``packed``/``cutlass``
through ``nxm.decompress``). ``sparse_mm`` then runs ``x @ W.T (+ bias)`` on Sparse Tensor Cores.

Every decision the kernel relies on (which GPUs and library versions, dtypes, padding of small M,
output order, bias dtype, tuning keys) is made here, in plain functions that run on CPU and are
tested there; the C++ binding checks what it relies on and runs.

W8A8 (``sparse_mm(x, sw, act_bits=8)`` for ``sw = nxm.compress(w, "2:4", layout="cusparselt", bits=8)``):
x is quantized per token as ``reference.quantize_activations`` does, cuSPARSELt multiplies the int8
codes into exact int32 sums, and the scales follow in the reference's order (:func:`_w8a8`), so the
result equals ``reference.sparse_mm_int`` bit for bit while the sums fit int32. One int32 sum per
output covers all of K, so per-group scales (``group_size=``) are refused, as are int4 codes
(cuSPARSELt has no int4 GEMM).

Extras beyond the op surface: :func:`matmul` (int8 -> fp16/bf16 output and fp8 with per-row
``alpha``), :func:`compress_pruned` (fp8 weights) and :func:`tune` (algorithm search, ``nxm.tune``).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import warnings
from pathlib import Path

import torch

from .. import _extension, dispatch, reference
from ..dispatch import Backend, BackendNotSupported, Support
from ..layouts import CUSPARSELT, NMSparseWeight
from ..layouts.cusparselt import PATTERN as CUSPARSELT_PATTERN
from ..layouts.cusparselt import multiples as cusparselt_multiples
from ..pattern import PatternLike, as_pattern

FP8 = torch.float8_e4m3fn

# ------------------------------------------------------------------ which GPUs, which library

MIN_CAPABILITY = (8, 0)  # Ampere: the first Sparse Tensor Cores
# First cuSPARSELt release (CUSPARSELT_VERSION encoding, major*1000 + minor*100 + patch) with kernels
# for an architecture, as we read its release notes; from 0.8.0 on, non-block-scaled types run on
# later architectures too ("forward compatibility").
ARCH_SINCE = {(8, 0): 0, (8, 6): 100, (8, 7): 100, (8, 9): 400, (9, 0): 400, (10, 0): 700, (12, 0): 700,
              (10, 1): 800, (11, 0): 800, (12, 1): 800}
FP8_SINCE = {(8, 9): 800, (9, 0): 600, (10, 0): 700, (12, 0): 700, (10, 1): 800, (11, 0): 800, (12, 1): 800}
FORWARD_COMPATIBLE_SINCE = 800


def version_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 100}.{version % 100}"


def device_reasons(capability: tuple[int, int], version: int, dtype: torch.dtype) -> list[str]:
    """Why cuSPARSELt ``version`` cannot run ``dtype`` on a GPU of ``capability`` (empty: it can)."""
    sm = f"sm_{capability[0]}{capability[1]}"
    if tuple(capability) < MIN_CAPABILITY:
        return [f"the GPU is {sm}, older than sm_80 (Ampere), the first with Sparse Tensor Cores: use backend='triton'"]
    if dtype == FP8 and tuple(capability) < (8, 9):
        return [f"float8_e4m3fn needs sm_89 or newer (Ada, Hopper), the GPU is {sm}: use bfloat16 or int8"]
    table, what = (FP8_SINCE, f"float8_e4m3fn kernels for {sm}") if dtype == FP8 else (ARCH_SINCE, f"kernels for {sm}")
    since = table.get(tuple(capability), FORWARD_COMPATIBLE_SINCE)
    if version < since:
        return [f"cuSPARSELt {version_text(version)} has no {what} (they came in {version_text(since)}): "
                f"pip install -U 'nvidia-cusparselt-cu13>={version_text(since)}'"]
    return []


# ------------------------------------------------------------------ dtypes, padding, layouts

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.int8, FP8)
# Output dtypes per input dtype, the default first (the op surface's: the input dtype, int32 for int8).
OUTPUT_DTYPES = {
    torch.float16: (torch.float16,),
    torch.bfloat16: (torch.bfloat16,),
    torch.float32: (torch.float32,),
    torch.int8: (torch.int32, torch.float16, torch.bfloat16),
    FP8: (torch.bfloat16, torch.float16, torch.float32),
}


def dtype_reasons(dtype: torch.dtype, out_dtype: torch.dtype | None) -> list[str]:
    if dtype not in INPUT_DTYPES:
        return [f"cuSPARSELt multiplies {', '.join(str(d) for d in INPUT_DTYPES)}, not {dtype}"]
    if out_dtype is not None and out_dtype not in OUTPUT_DTYPES[dtype]:
        return [f"{dtype} inputs give {', '.join(str(d) for d in OUTPUT_DTYPES[dtype])} outputs, not {out_dtype}"]
    return []


def padded_rows(m: int, dtype: torch.dtype) -> int:
    """Rows of x handed to cuSPARSELt: M rounded up to the dense operand's multiple (so M=1 works);
    the extra rows are zeros and their outputs are sliced off."""
    multiple = cusparselt_multiples(dtype)[1]
    return -(-m // multiple) * multiple


def transposed_output(dtype: torch.dtype, want_transposed: bool = False) -> bool:
    """Whether the kernel writes y.T ([N, M], row-major D) rather than y ([M, N], column-major D).

    8-bit inputs always use the row-major D that torch's int8 tests of ``_cslt_sparse_mm`` run;
    the others write the order the caller wants (both are torch-tested for them), so neither
    needs a copy.
    """
    return want_transposed or dtype in (torch.int8, FP8)


def kernel_bias_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """cuSPARSELt reads the bias in the output's dtype, but in float32 for an int32 output (as we
    read its documentation; test_cusparselt_gpu.py checks int8 with an int32 bias)."""
    return torch.float32 if out_dtype == torch.int32 else out_dtype


# ------------------------------------------------------------------ availability

def _ops_problem() -> str | None:
    if _extension.unavailable_reason():
        return _extension.unavailable_reason()
    if not _extension.has_cuda_kernels():
        return ("nxm_kernels._C was built without CUDA, so it has no cuSPARSELt ops: rebuild it where nvcc and a "
                "CUDA build of torch are present (with NXM_SKIP_CUDA_BUILD unset)")
    return None


@functools.cache
def library_version() -> int:
    """cuSPARSELt's version as CUSPARSELT_VERSION encodes it (0.8.1 -> 801); needs no GPU."""
    return int(torch.ops.nxm.cusparselt_version())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


if _ops_problem() is None:
    # Plans and handles go while CUDA is still up (not in C++ static destructors, which may run after).
    atexit.register(torch.ops.nxm.cusparselt_release)


# ------------------------------------------------------------------ algorithm choice and tuning

# split-k values the tuner tries; 0 leaves it to cuSPARSELt's heuristic (the untuned default).
TUNE_SPLIT_K = (0, 1, 2, 4, 8)
DECOMPRESS_CHUNK = 4096  # rows of the identity multiplied at a time by decompress
DEFAULT_CONFIG = (0, 0)  # (algorithm id, split-k)


def rows_bucket(m: int, dtype: torch.dtype) -> int:
    """Tuning results apply to a range of M: the next power of two of the padded rows."""
    return 1 << max(0, math.ceil(math.log2(max(1, padded_rows(m, dtype)))))


def tuning_key(gpu: str, version: int, m: int, n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype,
               bias: bool, alpha: bool) -> str:
    """One problem for the tuning cache (in memory and in the JSON file): GPU name, cuSPARSELt
    version, M bucket, N, K, dtypes and epilogue."""
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    epilogue = "+bias" if bias else ""
    epilogue += "+alpha" if alpha else ""
    return (f"{gpu}|cusparselt {version_text(version)}|m<={rows_bucket(m, dtype)} n={n} k={k}|"
            f"{name(dtype)}->{name(out_dtype)}{epilogue}")


def default_tuning_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nxm_kernels" / "cusparselt_tuning.json"


def read_tuning(path: Path) -> dict[str, tuple[int, int]]:
    """{tuning key: (algorithm id, split-k)} from a tuning file ({} when there is none)."""
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {key: (int(e["alg_id"]), int(e["split_k"])) for key, e in entries.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read the cuSPARSELt tuning file {path} ({error}): delete it and run nxm.tune again")


def write_tuning(path: Path, results: dict[str, dict]) -> None:
    """Merge ``results`` ({key: {"alg_id", "split_k", "us"}}) into the tuning file, atomically."""
    entries = json.loads(path.read_text()) if path.exists() else {}
    entries.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps(entries, indent=1, sort_keys=True))
    scratch.replace(path)


class _Tuned:
    """Winners by tuning key: those of this process's nxm.tune calls, over those of the default
    file, which is read once, at the first lookup."""

    def __init__(self):
        self.configs: dict[str, tuple[int, int]] = {}
        self.file_read = False

    def lookup(self, key: str) -> tuple[int, int]:
        if not self.file_read:
            self.file_read = True
            try:
                self.configs = {**read_tuning(default_tuning_path()), **self.configs}
            except ValueError as error:  # a broken cache must not stop inference: say so, run untuned
                warnings.warn(f"{error}; running with cuSPARSELt's default algorithm", RuntimeWarning, stacklevel=2)
        return self.configs.get(key, DEFAULT_CONFIG)


_TUNED = _Tuned()


# Algorithm ids that computed wrong results on a GPU and cuSPARSELt version (some do: pytorch#155333),
# found by `nxm gpu-check`, which writes this file. tune() never times them and no call runs them.
def exclusions_path() -> Path:
    return default_tuning_path().with_name("cusparselt_excluded.json")


def exclusion_key(gpu: str, version: int, dtype: torch.dtype) -> str:
    return f"{gpu}|cusparselt {version_text(version)}|{str(dtype).removeprefix('torch.')}"


def read_exclusions(path: Path) -> dict[str, frozenset[int]]:
    """{exclusion key: excluded algorithm ids} from ``{key: {"alg_ids": [...], ...}}`` ({} without a file)."""
    if not path.exists():
        return {}
    try:
        return {key: frozenset(int(i) for i in entry["alg_ids"]) for key, entry in json.loads(path.read_text()).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"cannot read the cuSPARSELt exclusion file {path} ({error}): run nxm gpu-check again")


class _Excluded:
    """The exclusion file, read once, at the first call."""

    def __init__(self):
        self.ids: dict[str, frozenset[int]] | None = None

    def ids_for(self, device: torch.device, dtype: torch.dtype) -> frozenset[int]:
        if self.ids is None:
            self.ids = read_exclusions(exclusions_path())  # unreadable: raise, never run a suspect algorithm
        if not self.ids:
            return frozenset()
        return self.ids.get(exclusion_key(_device_name(_device_index(device)), library_version(), dtype), frozenset())

    def usable(self, config: tuple[int, int], device: torch.device, dtype: torch.dtype) -> tuple[int, int]:
        """``config``, or the lowest id that is not excluded (heuristic split-k) when its id is."""
        excluded = self.ids_for(device, dtype)
        if config[0] not in excluded:
            return config
        return next(i for i in range(len(excluded) + 1) if i not in excluded), 0


_EXCLUDED = _Excluded()


# ------------------------------------------------------------------ the kernels

def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned, as cuSPARSELt needs: allocations are, but a slice may start
    anywhere (judged by the offset, which fake tensors have too)."""
    t = t.contiguous()
    return t if t.storage_offset() * t.element_size() % 16 == 0 else t.clone()


def _run(x2: torch.Tensor, sw: NMSparseWeight, bias, alpha, out_dtype, config=None,
         want_transposed: bool = False) -> torch.Tensor:
    """y [M, N] (or y.T [N, M], contiguous either way) for x2 [M, K]: pad M, pick the tuned
    algorithm, run, slice back."""
    m = x2.shape[0]
    rows = padded_rows(m, x2.dtype)
    x_kernel = torch.nn.functional.pad(x2, (0, 0, 0, rows - m)) if rows != m else x2
    transpose = transposed_output(x2.dtype, want_transposed)
    if config is None:
        key = tuning_key(_device_name(_device_index(x2.device)), library_version(), m, sw.out_features,
                         sw.in_features, x2.dtype, out_dtype, bias is not None, alpha is not None)
        config = _TUNED.lookup(key)
    config = _EXCLUDED.usable(config, x2.device, x2.dtype)
    if bias is not None:
        bias = _aligned(bias.to(kernel_bias_dtype(out_dtype)))
    y = torch.ops.nxm.cusparselt_mm(_aligned(x_kernel), sw.values, sw.out_features, bias,
                                    None if alpha is None else _aligned(alpha), out_dtype, transpose, *config)
    if not transpose:
        return y[:m]
    y_t = y[:, :m]
    return y_t.contiguous() if want_transposed else y_t.t().contiguous()


def w8a8_reasons(encoding, act_bits) -> list[str]:
    """Why cuSPARSELt cannot multiply a weight of ``encoding`` with activations of ``act_bits``
    (empty: it can). Its int8 GEMM gives one exact int32 sum over all of K per output."""
    if not encoding.quantized:
        return []  # (float weights with act_bits: refused by the op surface)
    if encoding.bits != 8:
        return [f"cuSPARSELt has no int4 GEMM ({encoding} weight): use backend 'native' or 'triton' on a packed "
                "weight, or compress with bits=8"]
    why = []
    if act_bits != 8:
        why.append(f"cuSPARSELt multiplies {encoding} codes with int8 activations only: pass act_bits=8 (W8A8), or "
                   "keep the weight in layout 'packed' for float activations (W8A16)")
    if encoding.group_size is not None:
        why.append(f"cuSPARSELt's int32 sums run over all of K, so per-group scales ({encoding}) cannot be applied "
                   "between them: compress with group_size=None (one scale per row), or use a packed weight with "
                   "backend 'native'")
    return why


def _w8a8(x2: torch.Tensor, sw: NMSparseWeight, bias, act_bits: int) -> torch.Tensor:
    """``reference.sparse_mm_int`` with the integer product on cuSPARSELt: x quantized per token by
    the reference's own function, exact int32 sums, then the reference's epilogue for one group
    (each op rounded on its own, as there: no fused multiply-add)."""
    xq, sx = reference.quantize_activations(x2, act_bits)
    acc = _run(xq, sw.encoding.codes_weight(sw), None, None, torch.int32)
    y = torch.zeros(x2.shape[0], sw.out_features, dtype=torch.float32, device=x2.device)
    y = y + acc.to(torch.float32) * sw.scales[:, 0]
    y = y * sx
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x2.dtype)


def _require(device: torch.device, dtype: torch.dtype, what: str) -> None:
    why = [BACKEND.unavailable_reason()] if BACKEND.unavailable_reason() else BACKEND.device_problems(device, dtype)
    if why:
        raise BackendNotSupported(f"cuSPARSELt cannot {what} here: {'; '.join(why)}")


def _check_extras(x, sw, bias, alpha, out_dtype) -> torch.dtype:
    """Checks of :func:`matmul`'s inputs beyond the op surface's; returns the output dtype."""
    if not isinstance(sw, NMSparseWeight) or sw.layout is not CUSPARSELT:
        raise TypeError("matmul takes a cusparselt-layout NMSparseWeight (nxm.compress(w, '2:4', layout='cusparselt'))")
    if not isinstance(x, torch.Tensor) or x.dtype != sw.dtype or x.device != sw.device or x.shape[-1] != sw.in_features:
        got = f"{x.dtype} {list(x.shape)} on {x.device}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be {sw.dtype} [..., {sw.in_features}] on {sw.device}, got {got}")
    why = dtype_reasons(sw.dtype, out_dtype)
    if why:
        raise TypeError(why[0])
    out_dtype = out_dtype or OUTPUT_DTYPES[sw.dtype][0]
    if bias is not None and (bias.shape != (sw.out_features,) or bias.dtype != out_dtype or bias.device != x.device):
        raise ValueError(f"bias must be {out_dtype} [{sw.out_features}] on {x.device}, got {bias.dtype} "
                         f"{list(bias.shape)} on {bias.device}")
    if alpha is not None and (alpha.shape != (sw.out_features,) or alpha.dtype != torch.float32
                              or alpha.device != x.device):
        raise ValueError(f"alpha (one scale per output feature) must be float32 [{sw.out_features}] on {x.device}, "
                         f"got {alpha.dtype} {list(alpha.shape)} on {alpha.device}")
    return out_dtype


def matmul(x: torch.Tensor, sw: NMSparseWeight, bias: torch.Tensor | None = None, *,
           alpha: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           transposed: bool = False) -> torch.Tensor:
    """``alpha * (x @ W.T) + bias`` with alpha a per-output-feature float32 scale, e.g. for int8
    (-> int32, float16 or bfloat16) and fp8 (-> bfloat16, float16 or float32) quantized weights.

    ``transposed=True`` returns ``W @ x.T`` (``[out_features, M]`` for 2-D ``x``), written in that
    order by the kernel.
    """
    out_dtype = _check_extras(x, sw, bias, alpha, out_dtype)
    _require(sw.device, sw.dtype, "multiply")
    if transposed:
        if x.dim() != 2:
            raise ValueError(f"transposed=True takes a 2-D x [M, {sw.in_features}], got shape {list(x.shape)}")
        return _run(x, sw, bias, alpha, out_dtype, want_transposed=True)
    y = _run(x.reshape(-1, sw.in_features), sw, bias, alpha, out_dtype)
    return y.reshape(*x.shape[:-1], sw.out_features)


def compress_pruned(w: torch.Tensor, pattern: PatternLike = "2:4") -> NMSparseWeight:
    """A cusparselt weight from a dense weight that already is N:M sparse (the way to make fp8 ones:
    ``nxm.project`` in a wider dtype, then cast). Nothing is selected here; a weight with too many
    nonzeros in a group is refused."""
    pattern = as_pattern(pattern)
    CUSPARSELT.check(w.dtype, w.shape, pattern)
    nonzero = (w.view(torch.uint8) & 0x7F) != 0 if w.dtype == FP8 else w != 0
    if bool((nonzero.reshape(-1, pattern.m).sum(-1) > pattern.n).any()):
        raise ValueError(f"w is not {pattern} sparse: project it first (nxm.project(w, '{pattern}') in a wider dtype)")
    _require(w.device, w.dtype, "compress")
    values = torch.ops.nxm.cusparselt_compress(_aligned(w))
    return NMSparseWeight(values, torch.empty(0, dtype=torch.uint8, device=w.device), tuple(w.shape), pattern,
                          CUSPARSELT, check_metadata=False)


def _time_us(fn, iterations: int) -> float:
    fn()  # warm-up (and plan creation)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / iterations


def tune(sw: NMSparseWeight, tokens=(1, 16, 64, 256, 1024, 4096), *, bias: bool = False, alpha: bool = False,
         out_dtype: torch.dtype | None = None, iterations: int = 20, save: bool = True,
         path: str | os.PathLike | None = None) -> dict[int, dict]:
    """Time every algorithm id and split-k of cuSPARSELt for ``sw`` at each M in ``tokens``; keep the
    fastest for this process and, with ``save``, in the tuning file (default
    ``~/.cache/nxm_kernels/cusparselt_tuning.json``, read by later processes at their first call).

    Returns {M: {"alg_id", "split_k", "us", "default_us"}}.
    """
    if not isinstance(sw, NMSparseWeight) or sw.layout is not CUSPARSELT:
        raise TypeError("tune takes a cusparselt-layout NMSparseWeight (nxm.compress(w, '2:4', layout='cusparselt'))")
    _require(sw.device, sw.dtype, "tune")
    why = dtype_reasons(sw.dtype, out_dtype)
    if why:
        raise TypeError(why[0])
    out_dtype = out_dtype or OUTPUT_DTYPES[sw.dtype][0]
    device = sw.device
    bias_t = torch.zeros(sw.out_features, dtype=out_dtype, device=device) if bias else None
    alpha_t = torch.ones(sw.out_features, dtype=torch.float32, device=device) if alpha else None
    gpu, version = _device_name(_device_index(device)), library_version()
    results, file_entries = {}, {}
    for m in tokens:
        if sw.dtype in (torch.int8, FP8):
            x = torch.randint(-4, 5, (m, sw.in_features), device=device).to(sw.dtype)
        else:
            x = torch.randn(m, sw.in_features, device=device, dtype=sw.dtype)
        rows = padded_rows(m, sw.dtype)
        x_kernel = torch.nn.functional.pad(x, (0, 0, 0, rows - m))
        max_id = int(torch.ops.nxm.cusparselt_max_algorithm_id(
            x_kernel, sw.values, sw.out_features, None if bias_t is None else bias_t.to(kernel_bias_dtype(out_dtype)),
            alpha_t, out_dtype, transposed_output(sw.dtype)))
        timings = {}
        excluded = _EXCLUDED.ids_for(device, sw.dtype)
        for alg_id in (i for i in range(max_id + 1) if i not in excluded):
            for split_k in TUNE_SPLIT_K:
                config = (alg_id, split_k)
                try:
                    timings[config] = _time_us(lambda: _run(x, sw, bias_t, alpha_t, out_dtype, config), iterations)
                except RuntimeError:  # an id or split-k this problem does not have
                    continue
        if not timings:
            raise RuntimeError(f"cuSPARSELt ran no algorithm for M={m}: see the error of nxm.sparse_mm on this shape")
        best = min(timings, key=timings.get)
        key = tuning_key(gpu, version, m, sw.out_features, sw.in_features, sw.dtype, out_dtype, bias, alpha)
        _TUNED.configs[key] = best
        results[m] = {"alg_id": best[0], "split_k": best[1], "us": timings[best],
                      "default_us": timings.get(DEFAULT_CONFIG)}
        file_entries[key] = {"alg_id": best[0], "split_k": best[1], "us": round(timings[best], 2)}
    if save:
        write_tuning(Path(path) if path is not None else default_tuning_path(), file_entries)
    return results


# ------------------------------------------------------------------ the backend

class CusparseltBackend(Backend):
    name = "cusparselt"
    _make = "make one with nxm.compress(dense, '2:4', layout='cusparselt') ('1:2' for float32)"
    supports = {
        "compress": Support(layouts=(CUSPARSELT.name,), dtypes=INPUT_DTYPES, devices=("cuda",)),
        "decompress": Support(layouts=(CUSPARSELT.name,), devices=("cuda",), advice=_make),
        # int8 codes: W8A8 only (act_bits=8), one scale per row (extra_reasons)
        "sparse_mm": Support(layouts=(CUSPARSELT.name,), devices=("cuda",), encodings=("float", "int8"),
                             act_bits=(None, 8), advice=_make),
    }
    auto_devices = ("cuda",)

    def unavailable_reason(self) -> str | None:
        problems = []
        if not torch.cuda.is_available():
            problems.append("no CUDA device is visible (torch.cuda.is_available() is False): cuSPARSELt runs on "
                            "NVIDIA GPUs of sm_80 or newer")
        if _ops_problem():
            problems.append(_ops_problem())
        return "; ".join(problems) or None

    def device_problems(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        if device.type != "cuda":
            return [f"the tensors are on {device}: cuSPARSELt runs on CUDA tensors (move them with .cuda())"]
        return device_reasons(_capability(_device_index(device)), library_version(), dtype)

    def extra_reasons(self, op: str, **inputs) -> list[str]:
        sw = inputs.get("sw")
        why = []
        if op == "decompress" and sw.dtype == torch.float32:
            why.append("cuSPARSELt multiplies float32 as TF32, so an fp32 cusparselt weight cannot be read back "
                       "exactly: keep its dense or packed form to convert it")
        if op == "sparse_mm" and sw.dtype == FP8:
            why.append("float8 products need a wider output: use nxm_kernels.backends.cusparselt.matmul(x, sw, "
                       "out_dtype=torch.bfloat16, alpha=scales)")
        if op == "sparse_mm":
            why += w8a8_reasons(sw.encoding, inputs.get("act_bits"))
        subject = inputs["w"] if op == "compress" else sw
        if subject.device.type == "cuda":  # (other devices: the table's reason)
            # (the kernel's dtype: a quantized weight's codes, not the float dtype it dequantizes to)
            why += self.device_problems(subject.device, subject.values.dtype if op != "compress" else subject.dtype)
        return why

    def compress(self, w, pattern, layout, scores):
        # Selection runs on the fastest backend that implements it (the op surface checked the inputs).
        projected = dispatch.run("project", None, w=w, pattern=pattern, scores=scores)
        values = torch.ops.nxm.cusparselt_compress(_aligned(projected))
        return values, torch.empty(0, dtype=torch.uint8, device=w.device)

    def decompress(self, sw):
        # W.T = I @ W.T, exact: each output is one weight times 1 plus zeros, accumulated in fp32/int32
        # (fp8 values are exact in bfloat16). Chunks of the identity bound the scratch memory.
        out_dtype = {torch.int8: torch.int32, FP8: torch.bfloat16}.get(sw.dtype, sw.dtype)
        k, chunk = sw.in_features, DECOMPRESS_CHUNK
        columns = []
        for start in range(0, k, chunk):
            rows = min(chunk, k - start)
            eye = torch.zeros(rows, k, dtype=torch.float32, device=sw.device)
            eye[:, start:start + rows].fill_diagonal_(1)
            columns.append(_run(eye.to(sw.dtype), sw, None, None, out_dtype, config=DEFAULT_CONFIG))
        return torch.cat(columns).t().contiguous().to(sw.dtype)

    def sparse_mm(self, x, sw, bias, act_bits=None):
        if act_bits is not None:
            return _w8a8(x, sw, bias, act_bits)
        return _run(x, sw, bias, None, OUTPUT_DTYPES[sw.dtype][0])


BACKEND = dispatch.register(CusparseltBackend(), priority=30)
