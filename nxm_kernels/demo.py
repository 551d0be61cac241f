"""End-to-end demo on the CPU reference path: project, compress, decompress and multiply a
BERT-base-sized feed-forward weight, and say what happened at each step."""

from __future__ import annotations

import time

import torch

import nxm_kernels as nxm


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, (time.perf_counter() - start) * 1e3


def main(out_features: int = 3072, in_features: int = 768, tokens: int = 128, seed: int = 0) -> None:
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features, dtype=torch.float16)
    x = torch.randn(tokens, in_features, dtype=torch.float16)
    dense_bytes = w.numel() * w.element_size()
    print(f"weight {out_features}x{in_features} fp16 ({dense_bytes / 2**20:.2f} MiB), x {tokens}x{in_features}")
    print(f"backends here: {', '.join(n for n, why in nxm.backends().items() if why is None)}")

    z, ms = _timed(lambda: nxm.project(w, "2:4"))
    kept = (z != 0).float().mean().item()
    print(f"project 2:4        {ms:7.1f} ms  kept {kept:.1%} of weights, N:M valid: {nxm.is_nm_sparse(z, '2:4')}")

    for layout in ("packed", "cutlass"):
        sw, ms = _timed(lambda: nxm.compress(w, "2:4", layout=layout))
        print(
            f"compress {layout:8s}  {ms:7.1f} ms  values {tuple(sw.values.shape)} + metadata "
            f"{sw.metadata.dtype} {tuple(sw.metadata.shape)} = {sw.nbytes / dense_bytes:.4f} of dense bytes"
        )
        d, ms = _timed(lambda: nxm.decompress(sw))
        print(f"decompress {layout:8s}{ms:7.1f} ms  equals project(w) bit for bit: {torch.equal(d, z)}")
        y, ms = _timed(lambda: nxm.sparse_mm(x, sw))
        expected = (x.float() @ z.float().T).half()
        err = (y.float() - expected.float()).abs().max().item()
        print(f"sparse_mm {layout:8s} {ms:7.1f} ms  y {tuple(y.shape)}, max |y - x @ project(w).T| = {err:.2e}")


if __name__ == "__main__":
    main()
