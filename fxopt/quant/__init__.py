"""Quantization core: specs, observers, fake-quant."""
