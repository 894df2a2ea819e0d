"""Triton kernels, each with a plain-torch reference beside it and a dispatch function."""
