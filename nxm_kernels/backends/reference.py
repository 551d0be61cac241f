"""The pure-torch reference as a backend: every op, any device, any layout with a reference
compress/decompress (the layout object's own), never the fastest."""

from __future__ import annotations

from .. import dispatch, reference
from ..dispatch import Backend, Support, call_facts


class ReferenceBackend(Backend):
    name = "reference"
    supports = {op: Support(encodings=None, act_bits=None, kinds=None) for op in dispatch.OPS}

    def extra_reasons(self, op, **inputs):
        layout = call_facts(inputs)[0]
        return layout.reference_reasons() if layout is not None else []

    def nm_mask(self, w, pattern, scores):
        return pattern.mask(w, scores)  # every kind's own reference selection

    def project(self, w, pattern, scores):
        return reference.project(w, pattern, scores)

    def compress(self, w, pattern, layout, scores):
        return reference.compress(w, pattern, layout, scores)

    def decompress(self, sw):
        return reference.decompress(sw)

    def sparse_mm(self, x, sw, bias, act_bits=None):
        return reference.sparse_mm(x, sw, bias, act_bits)


BACKEND = dispatch.register(ReferenceBackend(), priority=0)
