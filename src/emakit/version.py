"""The emakit version (one place: the package, the files it writes and the build read it)."""

__version__ = "0.1.0"
