"""Triton kernels, their plain-torch references and autograd Functions (ships as memkern.kernels)."""
