"""Fused Triton kernels for RWMN's hot operations (see kernels/README.md).

Each module holds private ``@triton.jit`` kernels, a plain launch function that checks
shapes, dtypes and contiguity, and the autograd/custom-op wrapper that ``rwmn.ops`` calls
under the ``"triton"`` backend. Importing this package does not import Triton.

May import: torch, triton and numpy, and its own modules; never rwmn, bench or tests
(tests/test_layering.py checks the arrows).
"""
