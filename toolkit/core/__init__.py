"""Torch-free basics every stage shares: errors, files, progress, the environment, ONNX reading, dataset facts, the manifest, parity, the model card. Imports nothing else of toolkit."""
