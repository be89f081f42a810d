"""Training data: one source per dataset kind, loaders and the fast resident pipeline (torch). Imports core, inference and models."""
