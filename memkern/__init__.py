"""memkern: where does a neural network keep what it memorized? (Maini et al., ICML 2023)."""

from memkern.network.attach import attach_sites, detach_sites

__version__ = "0.1.0"
__all__ = ["attach_sites", "detach_sites"]
