"""Files: atomic writes, weight files, emakit checkpoints and other libraries' EMA layouts."""

from emakit.io.atomic import atomic_path, atomic_write
from emakit.io.weights import read_weights, write_weights

__all__ = ["atomic_path", "atomic_write", "read_weights", "write_weights"]
