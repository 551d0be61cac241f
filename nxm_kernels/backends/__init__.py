"""One module per backend; each registers its ``BACKEND`` into ``dispatch`` when imported, with a
priority. Auto dispatch tries the fastest first: cusparselt, native, triton, then the reference."""

from . import cusparselt, native, reference, triton  # noqa: F401  (each registers itself)
