"""The reference ops, as the model and its users import them.

They live in :mod:`kernels.reference` beside the fused kernels they are the ground truth
for, so that ``kernels/`` needs only torch and triton and the imports run one way
(rwmn -> kernels). This module re-exports them.

May import: kernels.reference.
"""

from kernels.reference import *  # noqa: F403
from kernels.reference import __all__  # noqa: F401
