"""The pure-torch reference as a backend: every op, any device, never the fastest."""

from __future__ import annotations

from .. import reference
from ..dispatch import OPS, Backend


class ReferenceBackend(Backend):
    name = "reference"
    ops = frozenset(OPS)

    def not_supported_reasons(self, op, **inputs):
        sw = inputs.get("sw")
        if (sw is not None and sw.layout == "cusparselt") or inputs.get("layout") == "cusparselt":
            return ["the cusparselt layout is cuSPARSELt's opaque buffer, which only cuSPARSELt writes and "
                    "reads: use backend='cusparselt' on a GPU, or layout 'packed'/'cutlass'"]
        return []

    def nm_mask(self, w, pattern, scores):
        return reference.nm_mask(w, pattern, scores)

    def project(self, w, pattern, scores):
        return reference.project(w, pattern, scores)

    def compress(self, w, pattern, layout, scores):
        return reference.compress(w, pattern, layout, scores)

    def decompress(self, sw):
        return reference.decompress(sw)

    def sparse_mm(self, x, sw, bias):
        return reference.sparse_mm(x, sw, bias)


BACKEND = ReferenceBackend()
