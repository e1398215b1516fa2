"""q8: 8-bit training of neural networks (Banner et al., NeurIPS 2018) in plain PyTorch."""

from q8.config import QuantConfig

__all__ = ["QuantConfig"]
