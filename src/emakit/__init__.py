"""emakit: exponential moving averages of model weights -- fast, exact, and safe to resume.

    >>> import numpy as np
    >>> import emakit
    >>> weights = {"w": np.zeros(2)}
    >>> ema = emakit.EMA(weights, half_life=10)
    >>> weights["w"] += 1.0
    >>> ema.update()
    True
    >>> ema.averaged()["w"].round(4)
    array([0.067, 0.067])

``import emakit`` imports neither torch nor numpy; each comes in when first used.
"""

from emakit import schedules
from emakit.bema import BEMA
from emakit.best import KeepBest
from emakit.clock import Start
from emakit.ema import EMA
from emakit.errors import EMAWarning, StateDictError, SwapError
from emakit.flat import FlatLayout, flatten_parameters
from emakit.io.checkpoint import load, read_state, save
from emakit.multi import MultiEMA
from emakit.policy import Policy
from emakit.state import FORMAT_VERSION, LoadResult
from emakit.version import __version__

__all__ = [
    "BEMA",
    "EMA",
    "FORMAT_VERSION",
    "EMAWarning",
    "FlatLayout",
    "KeepBest",
    "LoadResult",
    "MultiEMA",
    "Policy",
    "Start",
    "StateDictError",
    "SwapError",
    "__version__",
    "flatten_parameters",
    "load",
    "read_state",
    "save",
    "schedules",
]
