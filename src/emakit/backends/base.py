"""The backend contract: what the engine asks of an array library (numpy, torch).

Every backend implements the same update, ``shadow <- lerp(shadow, source, w)`` with ``w = 1 - d``,
with the rounding of ``torch.lerp`` (see ``docs/math.md``), in two ways: a grouped fast path and a
plain per-tensor loop, which must give bitwise the same numbers. A :class:`Plan` is that update
prepared for fixed lists of shadows; :meth:`Plan.describe` says how it runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

__all__ = ["Backend", "GroupInfo", "Plan", "SharedRead", "TensorInfo", "bad_dtype"]


class TensorInfo(NamedTuple):
    """What the engine needs to know about one tensor, backend-independent."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    floating: bool


class GroupInfo(NamedTuple):
    """One group of a plan: tensors of one kind, updated together.

    Attributes:
        role: ``"average"`` (lerp) or ``"copy"``.
        kind: ``"native"`` (CPU: one call of emakit's compiled kernels for the whole group,
            converting bf16/fp16 weights on the fly; ``EMAKIT_NATIVE`` chooses), ``"direct"``
            (the shadows' dtype and device: torch's kernels straight on the tensors),
            ``"staged"`` (converted chunk by chunk through a staging buffer), ``"offloaded"``
            (host shadows of a CUDA model: copied over, folded in by a background thread) or
            ``"loop"`` (the plain per-tensor loop).
        tensors: how many tensors the group updates.
        runs: stretches of tensors back to back in memory, one kernel each (a flattened
            module is one run per group; ``"native"``: all in the one call).
        loose: tensors updated one by one (in one grouped ``_foreach`` call where possible).
        shadow: ``"dtype@device"`` of the shadows.
        source: ``"dtype@device"`` of the sources.
        side_stream: for ``"offloaded"``: the copy runs on a side stream (``attach(overlap=True)``).
        chunks: for ``"staged"``: the chunks converted and folded in one after another.
        pinned: for ``"offloaded"``: the host mirror is pinned (the copy does not block).
    """

    role: str
    kind: str
    tensors: int
    runs: int
    loose: int
    shadow: str
    source: str
    side_stream: bool = False
    chunks: int = 1
    pinned: bool = False


class Plan(ABC):
    """A prepared update for fixed lists of shadows (rebuilt when the sources' layout changes).

    ``sources`` is always the averaged sources followed by the copied ones, in the order of the
    shadows the plan was made for. A backend implements the four abstract methods; the default
    :meth:`settle` and :meth:`fence` suit plans that finish their work before returning.
    """

    @abstractmethod
    def fits(self, sources: Sequence[Any]) -> bool:
        """Cheaply: is the plan still right for ``sources``? False: validate and plan again."""

    @abstractmethod
    def lerp_(self, sources: Sequence[Any], weight: float) -> None:
        """In place, for each averaged i: ``shadows[i] <- lerp(shadows[i], sources[i], weight)``."""

    @abstractmethod
    def copy_(self, sources: Sequence[Any]) -> None:
        """In place, for each copied i: ``copy_shadows[i] <- sources[n_averaged + i]``."""

    @abstractmethod
    def describe(self) -> tuple[GroupInfo, ...]:
        """The groups this plan updates, and how (see :class:`GroupInfo`)."""

    def peaks(self, sources: Sequence[Any], *, averaged: bool = True
              ) -> tuple[float, float] | None:
        """The largest magnitude among the floating averaged sources, and among the copied ones.

        ``max |x|`` over every element (0.0 for none); NaN when one is NaN (an infinite one
        gives inf). One reduction per run or loose tensor, and one read back to the host: what
        the non-finite guard checks before taking the grouped kernels. ``averaged=False``: the
        copied ones only (the first number is then 0.0). Default None: no cheap answer (the
        guard then checks tensor by tensor).
        """
        return None

    checks_while_folding = False
    """True when :meth:`guarded_lerp_` has a kernel (else it returns None)."""

    def guarded_lerp_(self, sources: Sequence[Any], weight: float, limit: float
                      ) -> tuple[list[int], float] | None:
        """``lerp_`` of each averaged tensor whose weights are all finite and at most ``limit``
        in magnitude, in one pass that checks each tensor just before folding it in.

        Returns the positions left alone (their shadows unchanged) and the largest magnitude
        folded in, or None when the plan has no such kernel (default): the non-finite guard
        then checks with :meth:`peaks` first.
        """
        return None

    def settle(self) -> None:
        """Block until every ``lerp_`` / ``copy_`` so far has reached the shadows.

        ``lerp_`` and ``copy_`` may return before the shadows hold the result (a shadow offloaded
        to host memory is updated by a worker thread); the engine calls this before any read
        or write of the shadows. An error raised by that work is raised here. Default: nothing
        to wait for.
        """
        return

    def fence(self) -> None:
        """Make later device work wait until the last update has read the sources.

        Only plans made with ``overlap=True`` read the sources alongside later work (on a side
        stream). It never blocks the host. Default: nothing to fence.
        """
        return


class SharedRead(Protocol):
    """Several plans over one source, updated in one pass that reads the source once."""

    def lerp_(self, weights: Sequence[float]) -> None:
        """For plan k: ``lerp_`` of its averaged shadows with ``weights[k]``."""


class Backend(ABC):
    """The operations the engine needs from an array library.

    The abstract methods are what every backend implements; the rest have defaults for array
    libraries without devices or pointer swaps (numpy).
    """

    name: str

    @abstractmethod
    def is_tensor(self, x: object) -> bool:
        """True if ``x`` is this backend's array type."""

    @abstractmethod
    def info(self, x: Any) -> TensorInfo:
        """Shape, dtype name, device name and whether ``x`` is floating point."""

    @abstractmethod
    def resolve_dtype(self, spec: object) -> Any:
        """The native floating dtype for a user's ``dtype=`` argument."""

    @abstractmethod
    def shadow_dtype(self, x: Any, override: Any) -> Any:
        """The dtype of the shadow of floating tensor ``x`` (fp32 for half types by default)."""

    @abstractmethod
    def allocate(self, sources: Sequence[Any], dtypes: Sequence[Any], device: object,
                 zeros: bool) -> list[Any]:
        """New shadows: copies of ``sources`` (or zeros) in ``dtypes`` on ``device``."""

    @abstractmethod
    def plan(self, avg_shadows: Sequence[Any], copy_shadows: Sequence[Any],
             sources: Sequence[Any], *, fast: bool, overlap: bool = False) -> Plan:
        """Prepare the update of the shadows from ``sources`` (grouped when ``fast``).

        ``overlap``: the sources may be read alongside later work until :meth:`Plan.fence`.
        """

    @abstractmethod
    def copy_(self, dsts: Sequence[Any], srcs: Sequence[Any]) -> None:
        """In place ``dsts[i] <- srcs[i]``, casting dtype and moving device as needed."""

    @abstractmethod
    def guarded_update_(self, shadows: Sequence[Any], sources: Sequence[Any],
                        decay: float | None) -> list[bool]:
        """Lerp with weight ``1 - decay`` (or copy when ``decay is None``) where the result is
        all finite; leave the other shadows as they were.

        Returns:
            For each shadow, whether it was updated (non-floating ones always are). May
            synchronise: this is the guard's tensor-by-tensor path, taken on the updates whose
            :meth:`Plan.peaks` check failed.
        """

    @abstractmethod
    def largest(self, xs: Sequence[Any]) -> float:
        """``max |x|`` over the floating arrays' elements (0.0 for none; NaN if one is NaN)."""

    @abstractmethod
    def headroom(self, xs: Sequence[Any]) -> float:
        """Half the largest finite value of the narrowest floating dtype among ``xs`` (inf if
        none is floating).

        A lerp of finite values at most this large, with a weight in [0, 1], into shadows of
        these dtypes cannot overflow (the difference of two such values is finite, and the
        result lies between them up to rounding).
        """

    @abstractmethod
    def finite(self, xs: Sequence[Any]) -> list[bool]:
        """Whether each array holds only finite values (may synchronise)."""

    @abstractmethod
    def scaled(self, xs: Sequence[Any], divisor: float | Sequence[float]) -> list[Any]:
        """New arrays ``xs[i] / divisor`` (or ``/ divisor[i]``) in the dtype of ``xs[i]``."""

    @abstractmethod
    def shifted(self, base: Sequence[Any], current: Sequence[Any], origin: Sequence[Any],
                alpha: float) -> list[Any]:
        """New arrays ``base[i] + alpha * (current[i] - origin[i])`` in ``base[i]``'s dtype and
        on its device (``current`` converted first; BEMA's correction)."""

    @abstractmethod
    def clone(self, x: Any, device: object = None) -> Any:
        """A copy of ``x`` (on ``device`` when given)."""

    @abstractmethod
    def converted(self, x: Any, like: Any, device: object = None) -> Any:
        """A new tensor holding ``x`` in ``like``'s dtype (on ``device`` when given)."""

    @abstractmethod
    def as_native(self, x: object, name: str) -> Any:
        """Convert a state tensor (possibly of the other backend) to this backend's type.

        Raises:
            TypeError: for anything that is not a dense array of numbers with its values.
        """

    def shared_read(self, plans: Sequence[Plan]) -> SharedRead | None:
        """One pass that updates the averages of all ``plans`` (plans over the same source
        memory) while reading the source once, or None where that is not possible (default)."""
        return None

    def can_alias(self, target: Any, value: Any) -> bool:
        """True if ``target`` can be re-pointed at ``value``'s memory (default: never)."""
        return False

    def repoint(self, target: Any, value: Any) -> Any:
        """Make ``target`` use ``value``'s memory; return the memory it used before.

        Called only where :meth:`can_alias` said True.
        """
        raise NotImplementedError(f"the {self.name} backend cannot re-point arrays")

    def writes(self, x: Any) -> int | None:
        """A counter of in-place writes made through ``x`` (None: the backend keeps none)."""
        return None


def bad_dtype(spec: object, library: str, example: str, *, known: bool) -> TypeError | ValueError:
    """The error for a ``dtype=`` that is unknown (TypeError) or not floating (ValueError)."""
    if not known:
        return TypeError(f"dtype must be a {library} floating dtype or its name, got {spec!r}. "
                         f"Example: {example}.")
    return ValueError(
        f"dtype must be a floating dtype (the shadow of an average), got {spec}. Integer "
        f"tensors are copied in their own dtype; pass e.g. {example}."
    )
