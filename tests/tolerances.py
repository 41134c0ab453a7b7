"""The fused-vs-float64 tolerance rule, said once: the kernel tests' (tests/kernel_helpers.py)
and the GPU session's checks (bench/checks.py) both read it.

A fused result passes when its largest error against a float64 reference is at most
``ratio`` times the largest error of the reference implementation run in the same dtype,
plus ``rel_atol`` times the largest float64 value (rounding headroom). fp32 allows four
times the reference's own error; bf16 and fp16 operands twice, with more headroom for the
coarser formats. Imports torch only, so bench/ can import it without pytest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """Fused error <= ratio * the reference's own error + rel_atol * max |float64|."""

    ratio: float
    rel_atol: float

    def allowed(self, ref_error: float, scale: float) -> float:
        """The largest fused error that passes, given the reference's own error and the
        largest float64 value."""
        return self.ratio * ref_error + self.rel_atol * scale


#: Per dtype name, as bench.cases spells them.
TOLERANCES = {
    "fp32": Tolerance(ratio=4.0, rel_atol=1e-5),
    "bf16": Tolerance(ratio=2.0, rel_atol=1e-2),
    "fp16": Tolerance(ratio=2.0, rel_atol=2e-3),
}
#: The same, per torch dtype.
BY_DTYPE = {
    torch.float32: TOLERANCES["fp32"],
    torch.bfloat16: TOLERANCES["bf16"],
    torch.float16: TOLERANCES["fp16"],
}
