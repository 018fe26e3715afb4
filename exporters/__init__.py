"""Exporters: PyTorch modules (and hand-built ONNX graphs) into ortserve model repositories."""
