"""The tracked tensors of an EMA: which ones, their shadows, and the prepared update over them.

:class:`Tracked` reads the source by name (:mod:`emakit.sources`), lets the policy decide what
is averaged, copied or skipped (:mod:`emakit.policy`), allocates the shadows through the
backend (fp32 for 16-bit sources by default) and keeps the backend's :class:`~emakit.backends.Plan`
for them, re-planned whenever the sources no longer fit it. It does no decay arithmetic: the
engine (:mod:`emakit.ema`) decides what to fold in; this is where it goes.

Example:
    >>> import numpy as np
    >>> from emakit.policy import Policy
    >>> t = Tracked({"w": np.ones(2), "n": np.array([3])}, Policy(), dtype=None, device=None,
    ...             zeros=False, fast=True)
    >>> t.avg_names, t.copy_names, t.backend.name
    (['w'], ['n'], 'numpy')
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from emakit.backends import Backend, GroupInfo, Plan, backend_for
from emakit.errors import EMAWarning, StateDictError, user_stacklevel
from emakit.policy import Action, Policy
from emakit.sources import Entry, Source, as_source

__all__ = ["Tracked"]

_UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
_STALL_GAP = 0.01  # warn when a shadow ignores weights this close to it, relatively (math.md (8))


def _listed(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")


def _shard_specs(entries: list[Entry]) -> dict[str, Any]:
    """Name -> :class:`~emakit.distributed.shards.ShardSpec` of every DTensor entry."""
    if "torch.distributed.tensor" not in sys.modules:
        return {}
    from emakit.distributed import shards

    return {e.name: shards.ShardSpec.of(e.tensor) for e in entries if shards.is_dtensor(e.tensor)}


def _local_shards(tensors: list[Any]) -> list[Any]:
    """``tensors`` with every DTensor replaced by its local shard (a view: writes go through)."""
    if "torch.distributed.tensor" not in sys.modules:
        return tensors
    from emakit.distributed import shards

    return [shards.local(t) if shards.is_dtensor(t) else t for t in tensors]


def _pick_backend(entries: list[Entry]) -> Backend:
    if not entries:
        raise ValueError("the source holds no tensors; give a model or a non-empty mapping.")
    first = backend_for(entries[0].tensor)
    for e in entries:
        b = backend_for(e.tensor)
        if b is None:
            raise TypeError(f"source entry {e.name!r} is a {type(e.tensor).__name__}, not a "
                            "torch tensor or numpy array.")
        if b is not first:
            raise TypeError(
                f"source mixes array types: {entries[0].name!r} is "
                f"{type(entries[0].tensor).__name__} but {e.name!r} is "
                f"{type(e.tensor).__name__}. Use one array library per EMA.")
    if first is None:  # unreachable: the loop raised for the first entry
        raise TypeError("the source holds no torch tensors or numpy arrays.")
    return first


class Tracked:
    """The tensors an EMA tracks, their shadows, and the plan that updates them.

    Args:
        source: an ``nn.Module``, a mapping ``name -> tensor`` or ``(name, tensor)`` pairs.
        policy: decides, per tensor, average / copy / skip.
        dtype: shadow dtype of averaged tensors (None: fp32 for 16-bit sources, else theirs).
        device: where the shadows live (None: with their sources).
        zeros: start the averaged shadows at zero instead of the current weights.
        fast: use the backend's grouped kernels (False: the plain per-tensor loop).

    Attributes:
        backend, source, policy, actions (name -> action), aliases (second names of tied
        tensors -> tracked name), avg_names, copy_names, names (averaged first),
        avg_shadows, copy_shadows, avg_dtypes, override (the resolved ``dtype``).
    """

    def __init__(self, source: Any, policy: Policy, *, dtype: Any, device: Any, zeros: bool,
                 fast: bool) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be an emakit.Policy, got {type(policy).__name__}.")
        self.policy = policy
        self.source: Source = as_source(source)
        entries = self.source.entries()
        self.backend = _pick_backend(entries)
        self.override = None if dtype is None else self.backend.resolve_dtype(dtype)
        self.device = device
        self.fast = fast
        self.actions: dict[str, Action] = {}
        avg: list[Entry] = []
        cpy: list[Entry] = []
        for e in entries:
            action = policy.action(e.name, floating=self.backend.info(e.tensor).floating,
                                   buffer=e.buffer, requires_grad=e.requires_grad)
            if action != "skip":
                self.actions[e.name] = action
                (avg if action == "average" else cpy).append(e)
        if not self.actions:
            raise ValueError(
                f"the EMA tracks no tensor: the source has {len(entries)} tensors and the policy "
                f"{policy!r} skips all of them. Loosen include/exclude.")
        self.aliases = {a: n for a, n in self.source.aliases().items() if n in self.actions}
        self.buffers = frozenset(e.name for e in avg + cpy if e.buffer)
        self.avg_names = [e.name for e in avg]
        self.copy_names = [e.name for e in cpy]
        self.names = self.avg_names + self.copy_names
        self.avg_dtypes = [self.backend.shadow_dtype(e.tensor, self.override) for e in avg]
        self.specs = _shard_specs(avg + cpy)  # DTensor name -> layout; shadows are local shards
        self._sharded = [i for i, n in enumerate(self.names) if n in self.specs]
        avg_src, cpy_src = self.fetch(self.avg_names), self.fetch(self.copy_names)
        self.avg_shadows = self.backend.allocate(avg_src, self.avg_dtypes, device, zeros)
        self.copy_shadows = self.backend.allocate(cpy_src, [t.dtype for t in cpy_src], device,
                                                  False)
        self.plan: Plan | None = None
        self.held: dict[str, Any] | None = None  # the training weights while swapped out

    def reshard(self) -> None:
        """Put an FSDP2 model's modules back in their sharded state (no-op for other models):
        a module an eval forward left unsharded holds a gathered copy of the parameters."""
        if self.specs:
            from emakit.distributed import shards

            shards.reshard(getattr(self.source, "module", None))

    def training(self, names: Sequence[str]) -> list[Any]:
        """The training weights of ``names``: the source's tensors, or, while the EMA weights
        are swapped in, what the swap took out (:class:`~emakit.swap.Swapper` sets it)."""
        if self.held is None:
            return self.fetch(names)
        return [self.held[n] for n in names]

    def warn_if_stalling(self, late_decay: float) -> None:
        """Warn when a half-precision shadow would round its updates away (docs/math.md (8a)):
        it ignores weights within ``u / (1 - d)`` of it (unit roundoff ``u``); warn above 1%."""
        u = _UNIT_ROUNDOFF.get(str(self.override).removeprefix("torch."))
        if u is None or late_decay <= 0.0:
            return
        ignored = math.inf if late_decay >= 1.0 else u / (1.0 - late_decay)
        if ignored > _STALL_GAP:
            warnings.warn(
                f"a {self.override} shadow with decay {late_decay:g} stalls: an update moves it "
                f"by (1 - decay) = {1 - late_decay:.2g} of the gap to the weights, and a change "
                f"below the dtype's resolution ({u:.2g} relative) is rounded away, so the shadow "
                f"ignores weights that differ from it by less than {ignored:.0%}. Leave dtype "
                "unset (fp32 shadow) or use a smaller decay.", EMAWarning,
                stacklevel=user_stacklevel())

    @property
    def shadows(self) -> list[Any]:
        """Averaged shadows, then copied ones, in the order of :attr:`names`."""
        return self.avg_shadows + self.copy_shadows

    def by_name(self) -> dict[str, Any]:
        """Tracked name -> its shadow."""
        return dict(zip(self.names, self.shadows))

    def fetch(self, names: Sequence[str] | None = None) -> list[Any]:
        """The source's current tensors (all tracked ones, averaged first, by default); for a
        sharded parameter, this rank's local shard (FSDP modules left unsharded by an eval
        forward are resharded first)."""
        tensors = self.source.fetch(self.names if names is None else names)
        if not self.specs:
            return tensors
        from emakit.distributed import shards

        index = self._sharded if names is None else \
            [i for i, n in enumerate(names) if n in self.specs]
        if not all(shards.is_dtensor(tensors[i]) for i in index):
            self.reshard()
            tensors = self.source.fetch(self.names if names is None else names)
        for i in index:
            if not shards.is_dtensor(tensors[i]):
                name = (self.names if names is None else names)[i]
                raise ValueError(
                    f"source tensor {name!r} was sharded ({self.specs[name].describe()}) and "
                    f"is now a {type(tensors[i]).__name__}: the EMA keeps its shadow as a "
                    "local shard. Keep the model sharded, or create a new EMA for it.")
            tensors[i] = shards.local(tensors[i])
        return tensors

    def state_tensors(self) -> dict[str, Any]:
        """Tracked name -> shadow for ``state_dict()``: a sharded one as a DTensor around the
        local shadow (no copy, no collective), so distributed checkpoints see the layout."""
        return self.state_tensors_of(self.names, self.shadows)

    def state_tensors_of(self, names: Sequence[str], tensors: Sequence[Any]) -> dict[str, Any]:
        """``name -> tensor`` for a state, shadow-shaped tensors of sharded names as DTensors."""
        out = dict(zip(names, tensors))
        if self.specs:
            from emakit.distributed import shards

            for name in out:
                if name in self.specs:
                    out[name] = shards.as_dtensor(out[name], self.specs[name])
        return out

    def check_given(self, parameters: Any, verb: str) -> None:
        """Accept torch-ema's ``store(model.parameters())``: every tensor given must be a
        tracked source tensor (the whole tracked set is stored either way)."""
        if parameters is None:
            return
        mine = {id(x) for x in self.source.fetch(self.names)}
        given = list(parameters)
        if not all(id(x) in mine for x in given):
            raise ValueError(
                f"{verb}(parameters): {sum(id(x) not in mine for x in given)} of the "
                f"{len(given)} tensors given are not tensors this EMA tracks. Call {verb}() "
                "without arguments (it covers every tracked tensor), or use "
                "emakit.compat.torch_ema.ExponentialMovingAverage for torch-ema's semantics.")

    def repointable(self) -> list[bool]:
        """Per tracked tensor: may a swap re-point it at its shadow? Not a shard, whose local
        tensor is a view into memory FSDP owns, and not a buffer, which a forward pass in
        training mode changes in place (BatchNorm's statistics, without a trace in the version
        counter): those are copied into, so the shadows stay as they were."""
        return [name not in self.specs and name not in self.buffers for name in self.names]

    def global_shape(self, name: str) -> tuple[int, ...]:
        """The shape of the tracked tensor ``name`` in the model (of the whole, for a shard)."""
        spec = self.specs.get(name)
        return spec.shape if spec is not None else self.backend.info(self.by_name()[name]).shape

    def source_dtypes(self) -> dict[str, str]:
        """Tracked name -> dtype name of the source's tensor."""
        info = self.backend.info
        return {n: info(t).dtype for n, t in zip(self.names, self.fetch())}

    def prepare(self, sources: list[Any] | None = None, *, overlap: bool = False
                ) -> tuple[list[Any], Plan]:
        """The current source tensors and a plan that fits them (validated and re-made when
        the sources changed since the last plan)."""
        if sources is None:
            sources = self.fetch()
        plan = self.plan
        if plan is None or not plan.fits(sources):
            if plan is not None:
                plan.settle()  # the old plan's work must reach the shadows before the new one's
            self.validate(sources)
            plan = self.plan = self.backend.plan(self.avg_shadows, self.copy_shadows, sources,
                                                 fast=self.fast, overlap=overlap)
        return sources, plan

    def describe(self, *, overlap: bool = False) -> tuple[GroupInfo, ...]:
        """How an update runs over the current sources (see :class:`~emakit.backends.GroupInfo`)."""
        return self.prepare(overlap=overlap)[1].describe()

    def settle(self) -> None:
        """Wait until every update so far has reached the shadows."""
        if self.plan is not None:
            self.plan.settle()

    def fence(self) -> None:
        """Make later device work wait for the last update's reads (overlapped copies)."""
        if self.plan is not None:
            self.plan.fence()

    def replan(self) -> None:
        """Drop the plan; the next update plans anew (e.g. with another overlap mode)."""
        self.settle()
        self.plan = None

    def validate(self, tensors: Sequence[Any]) -> None:
        """Raise if a source tensor is gone, of another type, or of another shape."""
        b = self.backend
        for name, tensor, shadow in zip(self.names, tensors, self.shadows):
            if tensor is None:
                raise ValueError(
                    f"the source no longer has a tensor named {name!r} (it is None now), which "
                    "the EMA tracks. If the model changed, create a new EMA.")
            if not b.is_tensor(tensor):
                raise TypeError(
                    f"source tensor {name!r} is now a {type(tensor).__name__}; the EMA was made "
                    f"for {b.name} tensors. Keep the source's entries as {b.name} tensors.")
            have, want = b.info(tensor).shape, b.info(shadow).shape
            if have != want:
                raise ValueError(
                    f"source tensor {name!r} has shape {have} but its shadow has shape {want}. "
                    "If the model was resized, create a new EMA for it.")

    def mismatches(self, tensors: dict[str, Any]) -> list[str]:
        """``name: reason`` for given tensors whose shape or dtype differ from the shadows'
        (for a sharded tensor: its global shape; a DTensor or a full tensor both fit)."""
        b = self.backend
        mine = self.by_name()
        out = []
        for name, tensor in tensors.items():
            if name in mine:
                have, want = b.info(tensor), b.info(mine[name])
                if have.shape != self.global_shape(name):
                    out.append(f"{name}: shape {have.shape} != {self.global_shape(name)}")
                elif have.dtype != want.dtype:
                    out.append(f"{name}: dtype {have.dtype} != {want.dtype}")
        return out

    def write(self, tensors: dict[str, Any]) -> None:
        """Copy ``tensors`` (checked by the caller) into the shadows of the same names; a
        sharded shadow takes its local piece (of a DTensor, or sliced from a full tensor)."""
        self.settle()
        mine = self.by_name()
        names = [n for n in self.names if n in tensors]
        self.write_into([mine[n] for n in names], names, [tensors[n] for n in names])

    def write_into(self, dsts: Sequence[Any], names: Sequence[str], values: Sequence[Any]
                   ) -> None:
        """Copy ``values`` into shadow-shaped ``dsts`` of tracked ``names`` (a sharded name
        takes its local piece of a DTensor or of a full tensor)."""
        if self.specs:
            from emakit.distributed import shards

            values = [shards.local_piece(v, self.specs[n]) if n in self.specs else v
                      for n, v in zip(names, values)]
        self.backend.copy_(dsts, values)

    def adopt(self, weights: dict[str, Any]) -> None:
        """Copy averages from another library's checkpoint in (cast to the shadows' dtypes).

        Raises:
            StateDictError: a tensor that is not an array of numbers, or of another shape;
                nothing was copied.
        """
        b = self.backend
        mine = self.by_name()
        try:
            native = {n: b.as_native(w, repr(n)) for n, w in weights.items()}
        except TypeError as exc:
            raise StateDictError(str(exc)) from None
        bad = [f"{n}: shape {b.info(w).shape} != {b.info(mine[n]).shape}"
               for n, w in native.items() if b.info(w).shape != b.info(mine[n]).shape]
        if bad:
            raise StateDictError("the checkpoint's tensors do not fit this model",
                                 mismatched=bad, fix="Use the model the checkpoint was made for.")
        self.settle()
        b.copy_([mine[n] for n in native], list(native.values()))

    def reset(self, zeros: bool) -> None:
        """Shadows start again: copies of the current weights (averaged ones zero if asked)."""
        self.settle()
        avg, cpy = self.fetch(self.avg_names), self.fetch(self.copy_names)
        self.validate(avg + cpy)
        b = self.backend
        if zeros:
            b.copy_(self.avg_shadows, b.allocate(avg, self.avg_dtypes, self.device, True))
        else:
            b.copy_(self.avg_shadows, avg)
        b.copy_(self.copy_shadows, cpy)

    def model_state(self, values: Sequence[Any], device: Any) -> dict[str, Any]:
        """The source's state dict with ``values`` (by tracked name, and under every alias of
        a tied weight) cast to the source's dtypes; untracked tensors copied."""
        b, state = self.backend, self.source.state()
        chosen = dict(zip(self.names, values))
        chosen.update({alias: chosen[name] for alias, name in self.aliases.items()})
        for name, value in state.items():
            avg = chosen.get(name)
            spec = self.specs.get(self.aliases.get(name, name))
            if avg is not None and spec is not None:  # a shard: the same layout as the model's
                from emakit.distributed import shards

                local = b.converted(avg, shards.local(value), device)
                state[name] = shards.as_dtensor(local, spec)
            elif avg is not None:
                state[name] = b.converted(avg, value, device)
            elif b.is_tensor(value):
                state[name] = b.clone(value, device)  # else: extra state, kept as it is
        return state

    def copy_into(self, target: Any, values: Sequence[Any], *, strict: bool) -> list[str]:
        """Copy ``values`` (by tracked name) into ``target`` (None: the source), checked first.

        Returns:
            The tracked names ``target`` lacks (only with ``strict=False``).

        Raises:
            StateDictError, ValueError: a missing name (strict), a shape that differs, or a
                value holding NaN/Inf; nothing was copied.
        """
        b = self.backend
        by_name = dict(zip(self.names, values))
        names, missing, dst = self.names, [], self.source
        if target is not None:
            dst = as_source(target)
            available = {e.name for e in dst.entries()}
            missing = [n for n in names if n not in available]
            if missing and strict:
                raise StateDictError("copy_to(): the target lacks names the EMA tracks",
                                     missing=missing,
                                     fix="Pass strict=False to copy the names it has.")
            names = [n for n in names if n in available]
        tensors = self.fetch(names) if target is None else _local_shards(dst.fetch(names))
        for name, x in zip(names, tensors):
            if not b.is_tensor(x) or b.info(x).shape != b.info(by_name[name]).shape:
                shape = b.info(x).shape if b.is_tensor(x) else type(x).__name__
                raise ValueError(f"copy_to(): target tensor {name!r} is {shape}, the average is "
                                 f"{b.info(by_name[name]).shape}; nothing was copied.")
        chosen = [by_name[n] for n in names]
        bad = [n for n, ok in zip(names, b.finite(chosen)) if not ok]
        if bad:
            raise ValueError(
                f"copy_to(): the average of {len(bad)} tensor(s) holds NaN or Inf "
                f"({_listed(bad)}); nothing was copied, so the target keeps its weights. A "
                "non-finite weight got into the average: Policy(nonfinite='skip') keeps such "
                "steps out of it.")
        b.copy_(tensors, chosen)
        return missing
