"""Files: atomic writes and weight files (safetensors, npz, torch), with clear errors."""

from emakit.io.atomic import atomic_path
from emakit.io.weights import read_weights, write_weights

__all__ = ["atomic_path", "read_weights", "write_weights"]
