"""Benchmarks: latency, memory, size and quality of every variant against PyTorch."""
