"""``float``: the kept values in the weight's own dtype (float types, or int8 as given): the
encoding of every weight before quantization existed, and the default."""

from __future__ import annotations

from .base import Encoding


class FloatEncoding(Encoding):
    name = "float"


FLOAT = FloatEncoding()
