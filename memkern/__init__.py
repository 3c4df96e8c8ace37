"""memkern: where does a neural network keep what it memorized? (Maini et al., ICML 2023)."""

__version__ = "0.1.0"
