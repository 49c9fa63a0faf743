"""Several EMAs of one model (different decays), updated together by one read of the weights.

Keeping a short and a long average (``decay=(0.999, 0.9999)``) is common: pick the better one at
the end, or synthesize others post hoc. Each average is a full :class:`~emakit.EMA` (swap,
save, bias correction, everything); :class:`MultiEMA` updates them in lockstep and shares the
work that does not depend on the decay: the weights are fetched once (each average's plan still
checks them), and on a flattened module (:func:`emakit.flatten_parameters`) one pass over memory
updates all the shadows, chunk by chunk, so each chunk of weights is read from memory once and
from the cache for the other averages:

    ema_k <- lerp(ema_k, w, 1 - D_k)      for k = 1..N,   D_k = prod of decay_k over the interval

which moves ``4 + 8 N`` bytes per fp32 parameter instead of ``12 N``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from emakit import engine
from emakit.ema import EMA, share_lock
from emakit.errors import StateDictError
from emakit.schedules import Schedule
from emakit.state import FORMAT_VERSION, LoadResult

__all__ = ["MultiEMA"]

_KIND = "multi-ema"


class MultiEMA:
    """Several exponential moving averages of one source with different decays.

    Args:
        source: an ``nn.Module``, a mapping ``name -> tensor`` or ``(name, tensor)`` pairs, as for
            :class:`~emakit.EMA`.
        decays: two or more decays (floats in [0, 1] or :mod:`emakit.schedules` schedules), one
            average each.
        **options: the other keyword arguments of :class:`~emakit.EMA` (``every``, ``dtype``,
            ``device``, ``policy``, ``start``, ``foreach``), shared by all the averages.

    Raises:
        TypeError, ValueError: for bad arguments (as :class:`~emakit.EMA`), fewer than two
            decays, or ``half_life=`` (give ``schedules.Constant.from_half_life(h)`` per
            average instead).

    Example:
        >>> import numpy as np
        >>> import emakit
        >>> w = {"w": np.zeros(2)}
        >>> emas = emakit.MultiEMA(w, decays=(0.5, 0.9))
        >>> w["w"] += 1.0
        >>> emas.update()
        True
        >>> [round(float(e.averaged()["w"][0]), 6) for e in emas]   # 1 - d after one step
        [0.5, 0.1]
        >>> with emas[1].swapped():                    # each average is a full EMA
        ...     print(w["w"])
        [0.1 0.1]
    """

    def __init__(self, source: Any, decays: Sequence[float | Schedule], **options: Any) -> None:
        if "half_life" in options or "decay" in options:
            raise TypeError(
                "MultiEMA takes decays=(...), one per average, not decay= or half_life=. For "
                "half-lives: decays=[emakit.schedules.Constant.from_half_life(h) for h in "
                "(1000, 10000)]."
            )
        if isinstance(decays, (str, bytes)) or not isinstance(decays, Sequence) or \
                len(decays) < 2:
            raise ValueError(
                f"decays must be a sequence of two or more decays, got {decays!r}. Example: "
                "MultiEMA(model, decays=(0.999, 0.9999)); for one average use EMA(model, ...)."
            )
        self._members = [EMA(source, decay=d, **options) for d in decays]
        share_lock(self._members)  # one lock: a member's swapped() and update() take turns
        self._shared = engine.SharedCache()

    # ------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> EMA:
        return self._members[index]

    def __iter__(self) -> Iterator[EMA]:
        return iter(self._members)

    @property
    def schedules(self) -> list[Schedule]:
        """The decay schedule of each average."""
        return [m.schedule for m in self._members]

    @property
    def step(self) -> int:
        """The last optimizer step seen by :meth:`update` (the same for every average)."""
        return self._members[0].step

    @property
    def one_pass(self) -> bool:
        """True if the last update read the weights once for all averages (one chunked pass
        over a flattened module); False if each average read them itself."""
        return self._shared.shared is not None

    def __repr__(self) -> str:
        decays = ", ".join(repr(m.schedule) for m in self._members)
        return f"MultiEMA({len(self)} averages: {decays}; step={self.step})"

    # ------------------------------------------------------------------------------ update
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into every average (after ``optimizer.step()``).

        Args:
            step: as for :meth:`emakit.EMA.update`.

        Returns:
            True if the shadows changed, False if this step was skipped (``every``) or repeated.

        Raises:
            ValueError: if an average was updated on its own and the steps no longer agree, or as
                :meth:`emakit.EMA.update`.
        """
        with contextlib.ExitStack() as held:
            for m in self._members:
                held.enter_context(m.lock)
            steps = {m.step for m in self._members}
            if len(steps) > 1:
                raise ValueError(
                    f"the averages are at different steps {sorted(steps)}: one was updated on "
                    "its own (emas[k].update()). Update them only through MultiEMA.update(), or "
                    "keep separate EMA objects.")
            # same step and every for all: they all update, or all skip
            return engine.update(self._members, step, shared=self._shared)

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "multi-ema", "format_version", "members": [EMA.state_dict(), ...]}``.

        Works with ``torch.save`` / ``torch.load(weights_only=True)``. To write safetensors files,
        save each average on its own: ``emakit.save(emas[k], path_k)``.
        """
        return {"kind": _KIND, "format_version": FORMAT_VERSION,
                "members": [m.state_dict() for m in self._members]}

    def load_state_dict(self, state: Mapping[str, Any], *, strict: bool = True
                        ) -> list[LoadResult]:
        """Load a :meth:`state_dict`: every average is checked before any is changed.

        Returns:
            One :class:`~emakit.LoadResult` per average.

        Raises:
            StateDictError: not a MultiEMA state, another number of averages, or any check of
                :meth:`emakit.EMA.load_state_dict` failing for any average. Nothing is loaded.
        """
        if not isinstance(state, Mapping) or state.get("kind") != _KIND:
            raise StateDictError("state is not a MultiEMA.state_dict()",
                                 fix="For one average use EMA.load_state_dict.")
        members = state.get("members")
        if not isinstance(members, Sequence) or len(members) != len(self._members):
            count = len(members) if isinstance(members, Sequence) else members
            raise StateDictError(
                f"the state holds {count!r} averages, this MultiEMA has {len(self._members)}",
                fix="Build the MultiEMA with the decays it was saved with.")
        return engine.load(self._members, members, strict=strict)
