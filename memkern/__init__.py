"""memkern: where does a neural network keep what it memorized? (Maini et al., ICML 2023)."""

__version__ = "0.1.0"
__all__ = ["attach_sites", "detach_sites"]


def __getattr__(name: str):
    # Imported on first use: `memkern --help` and other light paths never load torch.
    if name in __all__:
        from memkern.network import attach

        return getattr(attach, name)
    raise AttributeError(f"module 'memkern' has no attribute {name!r}")
