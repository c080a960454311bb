"""Quantizers: int8, int4, fp16 and bitsandbytes variants of exported artifacts."""
