"""The checking stage: verify (parity), its per-layer diagnosis, and bench."""
