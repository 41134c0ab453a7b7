"""Packaging for rwmn (model, data, training) and kernels (fused Triton kernels)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="rwmn",
    version="0.1.0",
    description="Read-Write Memory Network (ICCV 2017) in PyTorch with fused Triton kernels",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["rwmn", "rwmn.*", "kernels", "kernels.*"]),
    py_modules=["train"],
    install_requires=[
        # Install torch first (see README): an unpinned torch pulls the CUDA build.
        "torch>=2.6",
        # Triton ships wheels for Linux x86-64 (and aarch64); elsewhere the reference
        # backend runs alone.
        "triton>=3.6; platform_system == 'Linux'",
        "numpy>=1.24",
        "h5py>=3.8",
        # NVTX ranges (rwmn.profiling); tested with 0.2.17.
        "nvtx>=0.2.17",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            # The suite runs on every core (python -m pytest -n auto; one file a worker).
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "matplotlib>=3.7",
            "tensorboard>=2.14",
            # Writes the hickle 5 story files of tests/test_release.py (the reader itself
            # never imports hickle); 5.0.3 is the version tested.
            "hickle==5.0.3",
        ],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        "visualize": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["rwmn-train=rwmn.training:main"]},
)
