"""q8: 8-bit training of neural networks (Banner et al., NeurIPS 2018) in plain PyTorch."""

from q8.config import QuantConfig
from q8.functional import fake_quantize
from q8.gemm_coverage import Coverage, coverage
from q8.health import NonFiniteError, check_finite
from q8.kernels import BackendUnavailable, use_backend
from q8.layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
    QuantLinear,
    QuantMaxPool2d,
    QuantReLU,
)
from q8.norm import (
    QuantBatchNorm1d,
    QuantBatchNorm2d,
    QuantBatchNorm3d,
    QuantGroupNorm,
    QuantLayerNorm,
    RangeBatchNorm1d,
    RangeBatchNorm2d,
    RangeBatchNorm3d,
    RangeGroupNorm,
    RangeLayerNorm,
    d2,
    set_range_bn_sync,
)
from q8.transform import QuantReport, dequantize_model, quantize_model

__all__ = [
    "BackendUnavailable",
    "Coverage",
    "NonFiniteError",
    "QuantBatchNorm1d",
    "QuantBatchNorm2d",
    "QuantBatchNorm3d",
    "QuantConfig",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantConvTranspose1d",
    "QuantConvTranspose2d",
    "QuantConvTranspose3d",
    "QuantGroupNorm",
    "QuantLayerNorm",
    "QuantLinear",
    "QuantMaxPool2d",
    "QuantReLU",
    "QuantReport",
    "RangeBatchNorm1d",
    "RangeBatchNorm2d",
    "RangeBatchNorm3d",
    "RangeGroupNorm",
    "RangeLayerNorm",
    "check_finite",
    "coverage",
    "d2",
    "dequantize_model",
    "fake_quantize",
    "quantize_model",
    "set_range_bn_sync",
    "use_backend",
]
