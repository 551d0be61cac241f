"""One module per backend, each defining ``BACKEND``. Auto dispatch tries them in this order."""

BACKEND_MODULES = ("reference",)
