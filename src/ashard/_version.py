"""The package version, in a module of its own (the Dask backend compares it across
machines without importing the package)."""

__version__ = "0.1.0.dev0"
