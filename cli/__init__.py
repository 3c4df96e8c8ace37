"""The memkern command line (ships as memkern.cli)."""
