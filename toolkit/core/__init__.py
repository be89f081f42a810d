"""Torch-free basics every stage shares: errors, files, records, progress, the environment, ONNX reading, dataset
facts, the manifest, parity, speed, the model card. Imports nothing else of toolkit."""
