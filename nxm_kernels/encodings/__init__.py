"""Value encodings: what the kept values of a compressed weight are (one module per encoding).

``float`` (the weight's own dtype, the default) and ``int8`` / ``int4`` (symmetric integer codes
with fp32 scales per output row or per group of input features). A weight carries its encoding
with its tensors; a layout says which encodings it holds (``Layout.encodings``).
"""

from .base import Encoding
from .floating import FLOAT, FloatEncoding
from .integer import IntEncoding, check_bits, from_bits

__all__ = ["FLOAT", "Encoding", "FloatEncoding", "IntEncoding", "as_encoding", "check_bits", "from_bits"]


def as_encoding(spec) -> Encoding:
    """An Encoding from itself, None (float) or its name: ``"float"``, ``"int8"``, ``"int4-g128"``."""
    if isinstance(spec, Encoding):
        return spec
    if spec is None or spec == "float":
        return FLOAT
    text = str(spec)
    kind, _, group = text.partition("-g")
    if kind in ("int8", "int4") and (not group or group.isdigit()):
        return IntEncoding(int(kind[3:]), int(group) if group else None)
    raise ValueError(f"unknown encoding {spec!r}: use 'float', 'int8', 'int4', or with a group size 'int4-g128'")
