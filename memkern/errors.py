"""Typed errors for bad user input. The CLI turns any of these into one line on stderr and exit 2."""


class MemkernError(Exception):
    """Base class: an error whose message is fit to show a user as it is."""


class ConfigError(MemkernError, ValueError):
    """An option or configuration value is out of range or unknown."""


class DataError(MemkernError, RuntimeError):
    """A dataset file is missing, truncated, of the wrong format, or fails its checksum."""


class CheckpointError(MemkernError, RuntimeError):
    """A checkpoint is missing, corrupt, not memkern's, or of another architecture."""


class RunDirError(MemkernError, RuntimeError):
    """A run directory is missing pieces, or exists where a fresh one was asked for."""


class UnsupportedLayerError(ConfigError):
    """A layer has no per-example gradient rule for the mode asked for."""


class DistributedError(MemkernError, RuntimeError):
    """The processes of a torchrun launch could not join, or one stopped waiting for the others."""
