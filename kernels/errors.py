"""The errors of the channel-mask op. ``memkern.kernels`` stands on its own (it imports nothing
from the rest of memkern), so it raises these; memkern's CLI prints them as one line."""


class ChannelMaskError(ValueError):
    """An argument of the channel-mask op is out of range, of the wrong shape or unknown."""


class ChannelMaskTypeError(ChannelMaskError, TypeError):
    """An argument of the channel-mask op has the wrong dtype or Python type."""
