"""Quantized frozen weights for QLoRA: NF4 (4-bit NormalFloat, double-quantized absmax) and int8 (absmax per row).

quantize.py holds the idea whole: the code tables, the block quantizers, QuantLinear (a frozen Linear that
dequantizes its weight in forward) and loading a model straight into its quantized form.
"""
from quant.quantize import (BLOCK, DEFAULT_SKIP, DYNAMIC, GROUP, METHODS, NF4, QUANTIZERS, DequantLinear,
                            Int8Weight, NF4Weight, QuantLinear, check_method, dequant_linear, dequantize,
                            fill_quantized, load_quantized, quantizable, quantize, quantized_bytes)
