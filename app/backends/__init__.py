"""CPU backends for encoder models: the PyTorch head exported to ONNX once (cached on disk), run by
ONNX Runtime or OpenVINO. The runner that uses them is app/runners/exported.py."""
