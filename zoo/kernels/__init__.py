"""Triton kernels, each with its plain-torch reference beside it and a dispatch function."""
