"""Runs of missing values in one series: where they start, how long they are, and filling them.

Used by :mod:`emakit.ewm_slabs` on one slab of a series at a time, so everything here takes the
sorted positions of the missing samples (``np.flatnonzero(~np.isfinite(x))``), which are few next
to the series, and works on those only.

Example:
    >>> import numpy as np
    >>> y = np.array([1.0, 9.0, 9.0, 4.0, 9.0])
    >>> missing = np.array([1, 2, 4])
    >>> first, length = missing_runs(missing)
    >>> first, length
    (array([1, 4]), array([2, 1]))
    >>> fill_forward(y, missing, first, length, before=0.0)
    >>> y
    array([1., 1., 1., 4., 4.])
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["fill_forward", "missing_runs"]

Index = npt.NDArray[np.intp]


def missing_runs(missing: Index) -> tuple[Index, Index]:
    """The runs of consecutive positions in ``missing`` (sorted, non-empty).

    Args:
        missing: sorted positions of the missing samples, at least one.

    Returns:
        ``(first, length)``: the first position of each run and its number of samples.
    """
    starts = np.flatnonzero(np.diff(missing, prepend=missing[0] - 2) != 1)
    length = np.diff(starts, append=missing.size)
    return missing[starts], length


def fill_forward(y: npt.NDArray[np.float64], missing: Index, first: Index, length: Index, *,
                 before: float) -> None:
    """Give each missing position of ``y`` the value just before its run, in place.

    Args:
        y: the values; those at ``missing`` are overwritten.
        missing: sorted positions of the missing samples (as for :func:`missing_runs`).
        first, length: the runs, from :func:`missing_runs`.
        before: the value for a run that starts at position 0.
    """
    source = y[np.maximum(first - 1, 0)]
    if first[0] == 0:
        source[0] = before
    y[missing] = np.repeat(source, length)
