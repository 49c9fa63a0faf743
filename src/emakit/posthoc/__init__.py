"""Post-hoc EMA (Karras et al. 2024, "EDM2"): choose the average's width after training.

During training, :class:`Snapshots` keeps power-function EMAs of two or more widths
(``sigma_rel`` 0.05 and 0.10 by default) and writes them to a folder every N steps. After
training, :func:`synthesize` makes the power-function EMA of any width ``sigma_rel`` the
snapshots support, at any snapshot step, as a least-squares mix of the snapshots
(:func:`coefficients`), reading them tensor by tensor; :func:`sweep` evaluates a range of
widths with your metric and writes the best. The math is in ``docs/math.md`` section 11.

``import emakit`` does not import this package; ``import emakit.posthoc`` does (it needs numpy).

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> import emakit.posthoc
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> w = {"w": np.zeros(2)}
    >>> rec = emakit.posthoc.Snapshots(w, folder, snapshot_every=50)
    >>> for step in range(1, 501):
    ...     w["w"][:] = np.sin(step / 40.0)
    ...     _ = rec.update()
    >>> sd = emakit.posthoc.synthesize(folder, sigma_rel=0.08)
    >>> sorted(sd), sd["w"].shape
    (['w'], (2,))
"""

from emakit.posthoc.least_squares import (
    MAX_PROFILE_ERROR,
    Solution,
    coefficients,
    solve,
    solve_gammas,
    supported_ranges,
)
from emakit.posthoc.manifest import Entry, Manifest, read_manifest
from emakit.posthoc.metric_sweep import SweepResult, sweep
from emakit.posthoc.snapshots import Snapshots
from emakit.posthoc.synthesis import Record, open_record, synthesize

__all__ = [
    "MAX_PROFILE_ERROR",
    "Entry",
    "Manifest",
    "Record",
    "Snapshots",
    "Solution",
    "SweepResult",
    "coefficients",
    "open_record",
    "read_manifest",
    "solve",
    "solve_gammas",
    "supported_ranges",
    "sweep",
    "synthesize",
]
