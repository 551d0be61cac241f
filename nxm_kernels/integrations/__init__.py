"""Integrations with training frameworks. Each module imports its framework, so install the
matching extra first: :mod:`.hf` needs ``pip install nxm-kernels[hf]``."""
