"""Low-precision number formats: quantize → dequantize emulation and emulated low-precision GEMMs."""

from kunlun.formats.quantize import FORMATS, quantize

__all__ = ["FORMATS", "quantize"]
