"""Files: atomic writes, weight files, emakit checkpoints and other libraries' EMA layouts."""

from emakit.ema import set_checkpoint_reader
from emakit.io.adopt import from_checkpoint
from emakit.io.atomic import atomic_path, atomic_write
from emakit.io.weights import read_weights, write_weights

set_checkpoint_reader(from_checkpoint)  # EMA.from_checkpoint, without the engine importing io

__all__ = ["atomic_path", "atomic_write", "read_weights", "write_weights"]
