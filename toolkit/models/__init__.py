"""The model registry, recipes and checkpoints (torch). Imports core and inference only."""
