"""The captioning benchmark: drawn images captioned by PyTorch eager, each ONNX variant and the peers."""
