"""The package version (a leaf: config and hub read it without importing the package)."""

__version__ = "0.1.0"
