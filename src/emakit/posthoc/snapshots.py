"""Recording for post-hoc EMA: power-function EMAs, snapshotted to files every N steps.

:class:`Snapshots` keeps one power-function EMA (:class:`emakit.schedules.PowerFunction`) per
``sigma_rel`` with the engine's :class:`~emakit.MultiEMA` (one pass over the weights for all of
them on a flattened module), and after the update at every multiple of ``snapshot_every`` steps
writes each average with :func:`emakit.save` (fp32 or wider, atomic, CRC-32 per tensor) and then
the folder's manifest (:mod:`emakit.posthoc.manifest`). After training,
:func:`emakit.posthoc.synthesize` makes the average of any ``sigma_rel`` from the files.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> from emakit.posthoc import Snapshots
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "snapshots"
    >>> w = {"w": np.zeros(3, dtype=np.float32)}
    >>> rec = Snapshots(w, folder, snapshot_every=10)
    >>> for step in range(1, 31):
    ...     w["w"] += 1.0                       # an optimizer step
    ...     _ = rec.update()
    >>> [(e.step, e.sigma_rel) for e in rec.entries()][:3]
    [(10, 0.05), (10, 0.1), (20, 0.05)]
"""

from __future__ import annotations

import numbers
import os
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emakit.distributed.agree import from_rank0
from emakit.distributed.gather import rank
from emakit.errors import EMAWarning, StateDictError, SwapError, user_stacklevel
from emakit.hooks import Attachment, hookable
from emakit.multi import MultiEMA
from emakit.posthoc.manifest import Entry, Manifest, file_name, read_manifest, write_manifest
from emakit.schedules import PowerFunction

__all__ = ["Snapshots"]

_KIND = "posthoc-snapshots"
_VERSION = 1
_NARROW = ("float16", "bfloat16", "half", "float8")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be an int >= 1 (optimizer steps), got {value!r}.")
    return int(value)


def _start(start: object) -> int:
    if start is None:
        return 0
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or int(start) < 0:
        raise ValueError(
            f"start must be the optimizer step of the current weights (an int >= 0), got "
            f"{start!r}. A power-function EMA needs no zero start: its first decay is 0, so "
            "it starts at the first weights it sees.")
    return int(start)


class Snapshots:
    """Power-function EMAs of a model, written to ``dir`` every ``snapshot_every`` steps.

    Args:
        source: an ``nn.Module``, a mapping ``name -> tensor`` (torch or numpy) or pairs, as for
            :class:`~emakit.EMA`.
        dir: the snapshot folder (created if missing). It holds ``manifest.json`` and one
            ``.safetensors`` file per average and snapshot step.
        snapshot_every: write a snapshot after the update at every multiple of this many
            optimizer steps (a multiple of ``every``).
        sigma_rels: the widths of the averages recorded, two or more distinct values in
            ``(0, 1/sqrt(12))``; EDM2's 0.05 and 0.10 by default.
        every: update the averages on every ``every``-th optimizer step (the decay of the
            skipped steps is applied, so the profiles do not change; see ``docs/math.md`` 11).
        dtype: shadow dtype; default float32 for 16-bit models, else the model's. 16-bit
            shadows are refused (they stall, and fp16 snapshots limit the synthesis).
        device, policy: as for :class:`~emakit.EMA`.
        start: the optimizer step of the current weights (default 0: before the first step).

    Raises:
        TypeError, ValueError: a bad argument (named, with what is valid).

    The first :meth:`update` checks the folder: a manifest of another recording there is
    refused (resume that recording with :meth:`load_state_dict`, or use another folder).
    """

    def __init__(self, source: Any, dir: str | os.PathLike[str], *, snapshot_every: int,
                 sigma_rels: Sequence[float] = (0.05, 0.10), every: int = 1, dtype: Any = None,
                 device: Any = None, policy: Any = None, start: int | None = None) -> None:
        every = _positive_int("every", every)
        self._snapshot_every = _positive_int("snapshot_every", snapshot_every)
        if self._snapshot_every % every:
            raise ValueError(
                f"snapshot_every={snapshot_every} is not a multiple of every={every}: a snapshot "
                "is taken after an update. Use a multiple, e.g. snapshot_every="
                f"{max(1, round(self._snapshot_every / every)) * every}.")
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Sequence) or \
                len(sigma_rels) < 2:
            raise ValueError(f"sigma_rels must be two or more widths, got {sigma_rels!r}. "
                             "Example: sigma_rels=(0.05, 0.10) (EDM2's).")
        schedules = [PowerFunction(sigma_rel=s) for s in sigma_rels]
        gammas = [float(s.gamma) for s in schedules]  # type: ignore[arg-type]
        if len(set(gammas)) != len(gammas):
            raise ValueError(f"sigma_rels must be distinct, got {list(sigma_rels)}.")
        if dtype is not None and any(n in str(dtype) for n in _NARROW):
            raise ValueError(f"dtype={dtype!r}: snapshots are kept in float32 or wider (16-bit "
                             "shadows stall, and their rounding limits what synthesis can "
                             "reach). Leave dtype=None (float32 for 16-bit models).")
        first = _start(start)
        folder = Path(dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"dir {str(folder)!r} exists and is not a folder.")
        self._emas = MultiEMA(source, decays=schedules, every=every, dtype=dtype, device=device,
                              policy=policy, start=first)
        folder.mkdir(parents=True, exist_ok=True)
        self._dir = folder
        self._sigma_rels = tuple(float(s) for s in sigma_rels)
        self._gammas = tuple(gammas)
        self._collective = bool(self._emas[0].parts.tracked.specs)  # sharded: rank 0 writes
        self._run = from_rank0(lambda: uuid.uuid4().hex, collective=self._collective)
        self._next = (first // self._snapshot_every + 1) * self._snapshot_every
        self._entries: list[Entry] | None = None  # the manifest, once checked
        self._attachment: Attachment | None = None

    # ----------------------------------------------------------------------------- read-only
    @property
    def emas(self) -> MultiEMA:
        """The averages (``emas[k]`` is a full :class:`~emakit.EMA`: swap, save, ...)."""
        return self._emas

    @property
    def dir(self) -> Path:
        """The snapshot folder."""
        return self._dir

    @property
    def sigma_rels(self) -> tuple[float, ...]:
        """The widths recorded, in the order of :attr:`emas`."""
        return self._sigma_rels

    @property
    def gammas(self) -> tuple[float, ...]:
        """The exponents of the averages (authoritative; ``sigma_rels`` are derived)."""
        return self._gammas

    @property
    def snapshot_every(self) -> int:
        """Steps between snapshots."""
        return self._snapshot_every

    @property
    def step(self) -> int:
        """The last optimizer step seen."""
        return self._emas.step

    @property
    def next_snapshot(self) -> int:
        """The step at (or after) which the next snapshot is written."""
        return self._next

    def entries(self) -> list[Entry]:
        """The snapshots in the manifest, in the order written."""
        return list(self._checked_entries())

    def __repr__(self) -> str:
        return (f"Snapshots({str(self._dir)!r}, sigma_rels={list(self._sigma_rels)}, "
                f"snapshot_every={self._snapshot_every}, step={self.step}, "
                f"next_snapshot={self._next})")

    # -------------------------------------------------------------------------------- update
    def update(self, step: int | None = None) -> bool:
        """Fold the current weights into every average; write a snapshot when one is due.

        Args:
            step: as for :meth:`emakit.EMA.update` (the optimizer step after this step).

        Returns:
            True if the averages changed (the snapshot, if due, was written), False if this
            step was skipped (``every``) or repeated.

        Raises:
            ValueError: a call without ``step`` while attached to an optimizer (the hook
                already updates once per step), or as :meth:`emakit.EMA.update`; the folder
                holds another recording's manifest.
            OSError: a snapshot could not be written (the average is updated; the snapshot is
                tried again after the next update).
        """
        if step is None and self._attachment is not None:
            raise ValueError(
                "update() called on Snapshots attached to an optimizer: they already update "
                "after every optimizer.step(), so this call would count the step twice. Remove "
                "the call, or attachment.remove() to update by hand.")
        return self._update(step)

    def _update(self, step: int | None) -> bool:
        self._checked_entries()  # the folder is checked before the first update
        changed = self._emas.update(step)
        if changed and self._emas.step >= self._next:
            self._write(self._emas.step)
        return changed

    def attach(self, optimizer: Any) -> Attachment:
        """Update after every ``optimizer.step()`` (and snapshot when due).

        Args:
            optimizer: a ``torch.optim.Optimizer`` or a wrapper of one (as
                :meth:`emakit.EMA.attach`).

        Returns:
            An :class:`~emakit.hooks.Attachment`; ``.remove()`` detaches.

        Raises:
            TypeError: ``optimizer`` takes no step hooks.
            ValueError: already attached.
        """
        target = hookable(optimizer)
        if self._attachment is not None:
            raise ValueError("attach() called while the Snapshots are attached: each step would "
                             "update them twice. Keep the first attachment (or remove it "
                             "first: attachment.remove()).")
        self._attachment = Attachment(target, on_step=lambda: self._update(None), fence=None,
                                      on_remove=self._detached, before_step=self._unswapped)
        return self._attachment

    def _unswapped(self) -> None:
        """Refuse an optimizer step while an average is swapped into the model."""
        with self._emas[0].lock:  # the members share it: another thread's swap ends first
            swapped = [s for s, ema in zip(self._sigma_rels, self._emas) if ema.is_swapped]
        if swapped:
            raise SwapError(f"optimizer.step() called while the average of sigma_rel "
                            f"{swapped[0]} is swapped in: the step would write into it. Nothing "
                            "was stepped; leave the swapped() block first.")

    def _detached(self, attachment: Attachment) -> None:
        if self._attachment is attachment:
            self._attachment = None

    def snapshot(self) -> list[Path]:
        """Write a snapshot of the averages now (e.g. at the end of training).

        The snapshot's step is the step of the last update. Nothing is written if the
        manifest already holds that step.

        Returns:
            The files of that step.

        Raises:
            ValueError: no update yet (nothing averaged).
        """
        state = self._emas[0].state_dict()
        if state["num_updates"] == 0:
            raise ValueError("snapshot() before the first update: the averages hold no "
                             "weights yet. Call update() (or attach) first.")
        step = int(state["last_update_step"])
        done = [e for e in self._checked_entries() if e.step == step]
        if not done:
            self._write(step)
            done = [e for e in self._checked_entries() if e.step == step]
        return [self._dir / e.file for e in done]

    # -------------------------------------------------------------------------------- files
    def _checked_entries(self) -> list[Entry]:
        if self._entries is None:
            run = self._run
            found = from_rank0(lambda: self._read(run), collective=self._collective)
            self._entries = list(found.entries) if found else []
        return self._entries

    def _read(self, run: str) -> Manifest | None:
        try:
            found = read_manifest(self._dir)
        except FileNotFoundError:
            return None
        if found.run != run:
            raise ValueError(
                f"{str(self._dir)!r} holds the snapshots of another recording (run "
                f"{found.run}, {len(found.entries)} snapshots up to step "
                f"{max((e.step for e in found.entries), default=0)}): mixing two runs would "
                "make every synthesis wrong. Use a new folder, resume that recording with "
                "load_state_dict(saved_state), or delete the folder.")
        if found.gammas != self._gammas:
            raise ValueError(f"{str(self._dir)!r} records sigma_rels {list(found.sigma_rels)}, "
                             f"these Snapshots {list(self._sigma_rels)}: build them with the "
                             "same sigma_rels.")
        return found

    def _write(self, step: int) -> None:
        """Save every average at ``step``, then the manifest (files first: a crash between
        leaves files the manifest does not list, which are ignored)."""
        import safetensors

        import emakit
        from emakit.io.checkpoint import HEADER_CRC_KEY

        entries = self._checked_entries()
        paths = [self._dir / file_name(step, k) for k in range(len(self._sigma_rels))]
        for k, ema in enumerate(self._emas):  # a collective for a sharded model: rank 0 writes
            emakit.save(ema, paths[k], metadata={"posthoc.run": self._run,
                                                 "posthoc.sigma_rel": repr(self._sigma_rels[k])})

        def listed() -> list[Entry]:  # rank 0 only for a sharded model: it holds the files
            new = []
            for k, path in enumerate(paths):
                with safetensors.safe_open(str(path), framework="np") as f:
                    crc = (f.metadata() or {})[HEADER_CRC_KEY]
                new.append(Entry(step, self._sigma_rels[k], self._gammas[k], path.name,
                                 path.stat().st_size, crc))
            out = [e for e in entries if e.step != step] + new
            write_manifest(self._dir, self._manifest(out))
            return out

        self._entries = from_rank0(listed, collective=self._collective)
        self._next = (step // self._snapshot_every + 1) * self._snapshot_every

    def _drop(self, stale: list[Entry]) -> None:
        """List only the kept entries, then delete the files of ``stale`` ones."""
        write_manifest(self._dir, self._manifest(self._entries or []))
        for e in stale:
            (self._dir / e.file).unlink(missing_ok=True)

    def _manifest(self, entries: list[Entry]) -> Manifest:
        return Manifest(self._run, self._sigma_rels, self._gammas, self._snapshot_every,
                        self._emas[0].every, tuple(entries))

    # --------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that shapes the recording: the averages, the run id, the next snapshot.

        Plain Python and tensors: works with ``torch.save`` / ``torch.load(weights_only=True)``.
        """
        return {"kind": _KIND, "format_version": _VERSION, "run": self._run,
                "dir": str(self._dir), "snapshot_every": self._snapshot_every,
                "next_snapshot": self._next, "sigma_rels": list(self._sigma_rels),
                "gammas": list(self._gammas), "written": len(self._entries or []),
                "emas": self._emas.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume a recording exactly: the averages, the run id and the next snapshot's step.

        Everything is checked before anything changes. Snapshots in the folder after the
        saved step (written by the run that went on past the checkpoint) are dropped from the
        manifest and their files deleted, with an :class:`~emakit.EMAWarning`: the resumed run
        writes its own.

        Raises:
            StateDictError: not a :meth:`state_dict` of Snapshots, other ``sigma_rels``, a
                malformed entry, or the averages do not fit (nothing is loaded).
            ValueError: the folder holds another recording's manifest.
        """
        if not isinstance(state, Mapping) or state.get("kind") != _KIND:
            raise StateDictError("state is not a Snapshots.state_dict()",
                                 fix="Give what Snapshots.state_dict() returned.")
        if state.get("format_version") != _VERSION:
            raise StateDictError(f"unknown Snapshots format_version "
                                 f"{state.get('format_version')!r}; this emakit reads {_VERSION}",
                                 fix="Upgrade emakit to read it.")
        run, due = state.get("run"), state.get("next_snapshot")
        if not isinstance(run, str) or not re.fullmatch(r"[0-9a-f]{32}", run):
            raise StateDictError(f"state key 'run' must be 32 hex digits, got {run!r}",
                                 fix="The state is corrupt.")
        if isinstance(due, bool) or not isinstance(due, int) or due < 1:
            raise StateDictError(f"state key 'next_snapshot' must be an int >= 1, got {due!r}",
                                 fix="The state is corrupt.")
        gammas = state.get("gammas")
        if not isinstance(gammas, (list, tuple)) or tuple(gammas) != self._gammas:
            raise StateDictError(
                f"the state records sigma_rels {state.get('sigma_rels')!r}, these Snapshots "
                f"{list(self._sigma_rels)}", fix="Build the Snapshots with the saved sigma_rels.")
        saved_every, written = state.get("snapshot_every"), state.get("written")
        for key, value in (("snapshot_every", saved_every), ("written", written)):
            if type(value) is not int or value < 0:
                raise StateDictError(f"state key {key!r} must be an int >= 0, got {value!r}",
                                     fix="The state is corrupt.")
        written = int(written)  # type: ignore[arg-type]  # checked above
        found = from_rank0(lambda: self._read(run), collective=self._collective)
        self._emas.load_state_dict(state.get("emas", {}))  # all or nothing
        step = self._emas.step
        entries = list(found.entries) if found else []
        stale = [e for e in entries if e.step > step]
        self._run, self._entries = run, [e for e in entries if e.step <= step]
        self._next = due
        if saved_every != self._snapshot_every:
            warnings.warn(f"the state was recorded with snapshot_every={saved_every!r}; these "
                          f"Snapshots use {self._snapshot_every} from step {due} on.",
                          EMAWarning, stacklevel=user_stacklevel())
        if stale:
            from_rank0(lambda: self._drop(stale), collective=self._collective)
            first, last = min(e.step for e in stale), max(e.step for e in stale)
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            if not self._collective or rank() == 0:  # one message for the job
                warnings.warn(
                    f"dropped {len(stale)} snapshot files after step {step} ({steps}) from "
                    f"{str(self._dir)!r}: they were written after the checkpoint being "
                    "resumed; the resumed run writes its own.", EMAWarning,
                    stacklevel=user_stacklevel())
        if len(self._entries) < written:
            warnings.warn(f"the state was saved after {written} snapshot files were written, "
                          f"but {str(self._dir)!r} lists {len(self._entries)} up to step {step}: "
                          "the others are not in this folder (resuming into a new folder?).",
                          EMAWarning, stacklevel=user_stacklevel())
