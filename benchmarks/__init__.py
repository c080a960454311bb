"""Benchmarks: latency, memory, size and quality of every variant against PyTorch.

``core/`` holds what every benchmark shares (config, round-robin timing, the memory probe, table
helpers, variant preparation, the machine's roofline); ``captioning/`` and ``text_to_image/`` are the
tasks, registered in ``tasks.BENCH_TASKS``, which `kiln bench` and `kiln build` both run;
``experiments/`` holds one-off studies that are not part of a report.
"""
