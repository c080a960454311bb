"""One-off studies run by hand (``python -m modelkiln.benchmarks.experiments.levers``), not part of a report."""
