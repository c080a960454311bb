"""Exporters: one file per model family, each declaring its ONNX components."""
