"""One module per backend, each defining ``BACKEND``. Auto dispatch tries them in this order
(cusparselt, native, triton, reference: fastest first, the reference last)."""

BACKEND_MODULES = ("cusparselt", "native", "triton", "reference")
