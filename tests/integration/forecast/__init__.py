"""trainer.forecast through the real exporter and ONNX Runtime, and its CLI."""
