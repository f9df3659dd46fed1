"""Paged attention backends for the torch runner: the torch reference and the Triton kernels."""
