"""RWMN: the Read-Write Memory Network (Na et al., ICCV 2017) in PyTorch.

    from rwmn import RWMN, RWMNConfig
    model = RWMN(RWMNConfig(data_source="sub"))
    logits = model(story, query, answers)        # [B, A]

The hot ops go through ``rwmn.ops`` (reference PyTorch or fused Triton kernels).

May import: kernels and third-party packages; never bench or tests (tests/test_layering.py
checks the arrows: rwmn -> kernels, bench -> rwmn and kernels, never back).
"""

from rwmn.config import ConfigError, LayerSpec, RWMNConfig, parse_layer_spec
from rwmn.model import RWMN, RWMNOutput

__all__ = ["RWMN", "RWMNConfig", "RWMNOutput", "ConfigError", "LayerSpec", "parse_layer_spec"]
