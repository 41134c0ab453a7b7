"""Fused Triton kernels for RWMN's hot operations (see kernels/README.md).

Each module holds private ``@triton.jit`` kernels, a plain launch function that checks
shapes, dtypes and contiguity, and the autograd/custom-op wrapper that ``rwmn.ops`` calls
under the ``"triton"`` backend. Importing this package does not import Triton.
"""
