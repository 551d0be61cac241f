"""nxm-kernels: N:M semi-structured sparsity kernels for Transformer linear layers."""

from setuptools import find_packages, setup

setup(
    name="nxm-kernels",
    version="0.1.0",
    description="N:M semi-structured sparse kernels (Triton, CUDA, cuSPARSELt) for Transformer inference",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nxm_kernels", "nxm_kernels.*"]),
    install_requires=["torch>=2.4", "triton; platform_system == 'Linux'"],
    extras_require={
        "checkpoint": ["safetensors"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "safetensors", "numpy"],
    },
    entry_points={"console_scripts": ["nxm = nxm_kernels.cli:main"]},
)
