"""Ahead-of-time compilation of every kernel and GEMM config for sm_80 and sm_90, no GPU needed.

Each kernel is specialised as a real launch on a representative shape would specialise it:
16-byte aligned pointers and integers divisible by 16 get ``tt.divisibility=16``, integers equal
to 1 become constants. The compiled cubin is read back with the ``cuobjdump`` bundled in the
Triton wheel (registers, shared memory, local memory = spills) and the PTX is searched for the
tensor-core instruction. Used by ``tests/test_triton_aot.py`` and by ``inspect``.

Needs the kernels compiled, not interpreted: run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ...pattern import Pattern, as_pattern
from . import block_gemm, kernels, quant_gemm

ARCHS = (80, 90)


@dataclass(frozen=True)
class KernelSpec:
    """One compilation: a kernel, its argument types and values, and launch options."""

    kernel: str  # attribute name in ``module``
    label: str  # what it computes, for tables
    args: tuple  # (name, type, value): type as in Triton signatures ('*fp16', 'i32'), value for hints
    constexprs: tuple  # (name, value)
    num_warps: int = 4
    num_stages: int = 3
    module: str = "kernels"  # the module of this package that defines it

    @property
    def config(self) -> str:
        blocks = "x".join(str(v) for k, v in self.constexprs if k.startswith("BLOCK"))
        return f"{blocks + ' ' if blocks else ''}w{self.num_warps} s{self.num_stages}"


_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _ptr(name, dtype):
    return (name, dtype, None)


def _int(name, value):
    return (name, "i32", value)


# 8 distinct 4x4 masks that each keep 8 (rotations of the first half of the block), in hex.
LIBRARY_8_OF_4X4 = "4x4{ff00,7f80,3fc0,1fe0,0ff0,07f8,03fc,01fe}"


def gemm_specs(dtype: str = "fp16", pattern: Pattern = Pattern(2, 4), out_features=4096, in_features=4096):
    """The sparse GEMM with every autotuning config of ``dtype`` (``kernels.CONFIGS``)."""
    row_bytes = (in_features // pattern.m * pattern.n * pattern.index_bits + 7) // 8
    family = "fp32" if dtype == "fp32" else "half"
    specs = []
    for small, config in ((small, c) for small in (True, False) for c in kernels.CONFIGS[family, small]):
        m_rows = 16 if small else 4096
        args = (
            _ptr("x_ptr", _PTR[dtype]), _ptr("values_ptr", _PTR[dtype]), _ptr("meta_ptr", "*u8"),
            _ptr("bias_ptr", _PTR[dtype]), _ptr("y_ptr", _PTR[dtype]),
            _int("M", m_rows), _int("N", out_features), _int("K", in_features), _int("row_bytes", row_bytes),
            _int("M_BUCKET", min(m_rows, 2 * kernels.SMALL_M)),
            _int("stride_xm", in_features), _int("stride_xk", 1), _int("stride_vn", in_features // pattern.m * pattern.n),
        )
        constexprs = dict(
            N_KEEP=pattern.n, M_GROUP=pattern.m, BITS=pattern.index_bits, CODE_BYTES=kernels.code_bytes(pattern),
            HAS_BIAS=True, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, GROUP_M=8,
            **{k: v for k, v in config.items() if k.startswith("BLOCK")},
        )
        specs.append(KernelSpec("_sparse_mm_kernel", f"sparse_mm {pattern} {dtype}", args,
                                tuple(constexprs.items()), config["num_warps"], config["num_stages"]))
    return specs


def block_gemm_specs(dtype: str = "fp16", pattern="8:4x4", out_features=4096, in_features=4096):
    """The block-layout GEMM (``block_gemm.py``) with every autotuning config of ``dtype``."""
    pattern = as_pattern(pattern)
    (rows, cols), kept = pattern.block, pattern.kept_per_block
    bitmap_bytes = (rows * cols + 7) // 8
    library = pattern.kind == "library"
    meta_cols = in_features // cols * (1 if library else bitmap_bytes)
    family = "fp32" if dtype == "fp32" else "half"
    specs = []
    for small, config in ((small, c) for small in (True, False) for c in kernels.CONFIGS[family, small]):
        m_rows = 16 if small else 4096
        args = (
            _ptr("x_ptr", _PTR[dtype]), _ptr("values_ptr", _PTR[dtype]), _ptr("meta_ptr", "*u8"),
            ("masks_ptr", "*u8", None) if library else ("masks_ptr", "constexpr", None),
            _ptr("bias_ptr", _PTR[dtype]), _ptr("y_ptr", _PTR[dtype]),
            _int("M", m_rows), _int("N", out_features), _int("K", in_features),
            _int("M_BUCKET", min(m_rows, 2 * kernels.SMALL_M)),
            _int("stride_xm", in_features), _int("stride_xk", 1), _int("stride_vn", in_features // cols * kept),
            _int("stride_mn", meta_cols),
        )
        constexprs = dict(
            R=rows, C=cols, KEPT=kept, BITMAP_BYTES=bitmap_bytes, LIBRARY=library,
            HAS_BIAS=True, PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, GROUP_M=8,
            **{k: v for k, v in config.items() if k.startswith("BLOCK")},
        )
        label = f"sparse_mm block {'library' if library else pattern} {dtype}"
        specs.append(KernelSpec("_sparse_mm_block_kernel", label, args, tuple(constexprs.items()),
                                config["num_warps"], config["num_stages"], "block_gemm"))
    return specs


def quant_gemm_specs(dtype: str = "fp16", bits: int = 4, group_size: int | None = 128, out_features=4096,
                     in_features=4096):
    """The W4A16/W8A16 GEMM of the ``tiled_q`` layout (``quant_gemm.py``) with every autotuning config
    whose BLOCK_K fits the group size."""
    from ...layouts.tiled_q import META_PER_ROW, TILE_K, TILE_N

    group = group_size or 0
    code_bytes = TILE_K // 2 * bits // 8
    specs = []
    for decode, config in ((decode, c) for decode in (True, False) for c in quant_gemm.CONFIGS[decode]):
        if not quant_gemm._fits(config["BLOCK_K"], in_features, group):
            continue
        m_rows = 16 if decode else 4096
        args = (
            _ptr("x_ptr", _PTR[dtype]), _ptr("values_ptr", "*i8" if bits == 8 else "*u8"), _ptr("meta_ptr", "*u8"),
            _ptr("scales_ptr", "*fp32"), _ptr("bias_ptr", _PTR[dtype]), _ptr("y_ptr", _PTR[dtype]),
            _int("M", m_rows), _int("N", out_features), _int("K", in_features),
            _int("M_BUCKET", min(m_rows, 2 * quant_gemm.DECODE_M)),
            _int("stride_xm", in_features), _int("stride_xk", 1),
            _int("stride_vb", in_features // TILE_K * TILE_N * code_bytes),
            _int("stride_mb", in_features // TILE_K * TILE_N * META_PER_ROW),
            _int("stride_sn", -(-in_features // group) if group else 1),
        )
        constexprs = dict(
            BITS=bits, GROUP_K=group, TILE_ROWS=TILE_N, TILE_COLS=TILE_K, META_BYTES=META_PER_ROW, HAS_BIAS=True,
            UPCAST=False, **{k: v for k, v in config.items() if k.startswith("BLOCK")},
        )
        label = f"sparse_mm tiled_q int{bits}{f'-g{group}' if group else ''} {dtype}"
        specs.append(KernelSpec("_sparse_mm_tiled_q_kernel", label, args, tuple(constexprs.items()),
                                config["num_warps"], config["num_stages"], "quant_gemm"))
    return specs


def elementwise_specs(pattern: Pattern = Pattern(2, 4), rows=4096, cols=4096):
    """mask/project, compress and decompress for a 16-bit weight (fp16/bf16 share the kernels)."""
    mp = triton.next_power_of_2(pattern.m)
    np_ = triton.next_power_of_2(pattern.n)
    g = kernels._groups_per_program(mp)
    groups = cols // pattern.m
    row_bytes = (groups * pattern.n * pattern.index_bits + 7) // 8
    keys = dict(SIGN_CLEAR=0x7FFF, HAS_SCORES=False, SCORE_TYPE=triton.language.float32)
    none = ("scores_ptr", "constexpr", None)
    specs = []
    for project in (False, True):
        specs.append(KernelSpec(
            "_select_kernel", f"{'project' if project else 'nm_mask'} {pattern} fp16",
            (_ptr("w_ptr", "*i16"), none, _ptr("out_ptr", "*i16" if project else "*u8"), _int("total_groups", rows * groups)),
            tuple(dict(M=pattern.m, N=pattern.n, MP=mp, G=g, PROJECT=project, **keys).items()),
        ))
    specs.append(KernelSpec(
        "_compress_packed_kernel", f"compress packed {pattern} fp16",
        (_ptr("w_ptr", "*i16"), none, _ptr("values_ptr", "*i16"), _ptr("meta_ptr", "*u8"),
         _int("groups_per_row", groups), _int("row_bytes", row_bytes)),
        tuple(dict(M=pattern.m, N=pattern.n, MP=mp, NP=np_, BITS=pattern.index_bits, G=g,
                   BYTES=triton.next_power_of_2(g * pattern.n * pattern.index_bits // 8), **keys).items()),
    ))
    specs.append(KernelSpec(
        "_decompress_kernel", f"decompress packed {pattern} fp16",
        (_ptr("values_ptr", "*i16"), _ptr("meta_ptr", "*u8"), _ptr("out_ptr", "*i16"),
         _int("rows", rows), _int("groups_per_row", groups), _int("meta_cols", row_bytes)),
        tuple(dict(M=pattern.m, N=pattern.n, MP=mp, NP=np_, BITS=pattern.index_bits, G=g,
                   CUTLASS=False, PAIRS=False, WORD_BITS=8).items()),
    ))
    if pattern == Pattern(2, 4):
        specs.append(KernelSpec(
            "_compress_cutlass_kernel", "compress cutlass 2:4 fp16",
            (_ptr("w_ptr", "*i16"), none, _ptr("values_ptr", "*i16"), _ptr("meta_ptr", "*i16"),
             _int("rows", rows), _int("groups_per_row", groups)),
            tuple(dict(PAIRS=False, G=64, WORD_BITS=16, TABLE=kernels.CUTLASS_NIBBLE_TABLE, **keys).items()),
        ))
        specs.append(KernelSpec(
            "_decompress_kernel", "decompress cutlass 2:4 fp16",
            (_ptr("values_ptr", "*i16"), _ptr("meta_ptr", "*i16"), _ptr("out_ptr", "*i16"),
             _int("rows", rows), _int("groups_per_row", groups), _int("meta_cols", cols // 16)),
            tuple(dict(M=4, N=2, MP=4, NP=2, BITS=2, G=g, CUTLASS=True, PAIRS=False, WORD_BITS=16).items()),
        ))
    return specs


def all_specs():
    """Every kernel and every GEMM config: the GEMM in fp16, bf16 and fp32 for 2:4, and in fp16
    for 4:8 and 8:16 (wider codes: more registers per element) and 5:6 (m not a power of two); the
    block GEMM in fp16, bf16 and fp32 for 8:4x4, and in fp16 for a library of 4x4 masks; the
    quantized 2:4 GEMM (``tiled_q``) for int4 g128 in fp16 and bf16, int4 g64, int8 per row."""
    return (elementwise_specs(Pattern(2, 4)) + elementwise_specs(Pattern(4, 8))
            + gemm_specs("fp16") + gemm_specs("bf16") + gemm_specs("fp32")
            + gemm_specs("fp16", Pattern(4, 8)) + gemm_specs("fp16", Pattern(8, 16))
            + gemm_specs("fp16", Pattern(5, 6), in_features=4092)
            + block_gemm_specs("fp16") + block_gemm_specs("bf16") + block_gemm_specs("fp32")
            + block_gemm_specs("fp16", LIBRARY_8_OF_4X4)
            + quant_gemm_specs("fp16", 4, 128) + quant_gemm_specs("bf16", 4, 128) + quant_gemm_specs("fp16", 4, 64)
            + quant_gemm_specs("fp16", 8, None))


def _source(spec: KernelSpec) -> ASTSource:
    fn = getattr({"kernels": kernels, "block_gemm": block_gemm, "quant_gemm": quant_gemm}[spec.module], spec.kernel)
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs compiled kernels: run without TRITON_INTERPRET=1")
    signature, constexprs, attrs = {}, dict(spec.constexprs), {}
    for index, (name, kind, value) in enumerate(spec.args):
        if kind == "constexpr" or value == 1:  # the launcher turns 1 (and None) into constants
            signature[name] = "constexpr"
            constexprs[name] = value
        else:
            signature[name] = kind
            if kind.startswith("*") or value % 16 == 0:  # torch allocations are 16-byte aligned
                attrs[(index,)] = [["tt.divisibility", 16]]
    for name, _ in spec.constexprs:
        signature[name] = "constexpr"
    return ASTSource(fn, signature, constexprs, attrs)


_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame and local memory bytes of the cubin's kernel, from ``cuobjdump``.

    Spilled registers live in the stack frame / local memory, so both are 0 when nothing spills.
    """
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = _RESOURCES.search(text)
    if not found:
        raise RuntimeError(f"cannot read cuobjdump resource usage:\n{text}")
    registers, stack, local = (int(v) for v in found.groups())
    return dict(registers=registers, stack=stack, local=local)


def tensor_core_instruction(ptx: str) -> str:
    """'wgmma', 'mma' or '-' (none): the matrix instruction in the PTX."""
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def compile_spec(spec: KernelSpec, capability: int) -> dict:
    """Compile ``spec`` for sm_<capability>; a row of facts about the result."""
    target = GPUTarget("cuda", capability, 32)
    options = dict(num_warps=spec.num_warps, num_stages=spec.num_stages)
    compiled = triton.compile(_source(spec), target=target, options=options)
    usage = resource_usage(compiled.asm["cubin"])
    return dict(
        kernel=spec.label, config=spec.config, arch=f"sm_{capability}",
        registers=usage["registers"], shared=compiled.metadata.shared,
        spill_bytes=usage["local"] + usage["stack"], tensor_core=tensor_core_instruction(compiled.asm["ptx"]),
    )


def compile_all(specs=None, archs=ARCHS, workers: int = 1) -> list[dict]:
    """Every (spec, arch) compiled; ``workers`` > 1 compiles in parallel processes."""
    jobs = [(spec, cc) for spec in (specs if specs is not None else all_specs()) for cc in archs]
    if workers <= 1:
        return [compile_spec(spec, cc) for spec, cc in jobs]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_spec, *zip(*jobs)))
