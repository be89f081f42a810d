"""toolkit: train the write-ups' small image classifiers, then export, verify, benchmark and serve them."""

__version__ = "0.1.0"
