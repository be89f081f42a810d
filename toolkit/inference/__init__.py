"""Torch-free inference: image preparation, test-split and image-folder readers, runtimes, the catalog of servable artifacts. Imports only core."""
