"""Start an EMA from the average in a checkpoint file (emakit's or another library's).

The work behind :meth:`emakit.EMA.from_checkpoint` (:func:`from_checkpoint`, which
``emakit.io`` installs with :func:`emakit.ema.set_checkpoint_reader`, so the engine never imports
the file layer): read the file (:mod:`emakit.io.layouts`), match its names to the model's
(:func:`match_names`), then build the EMA and load the average through its public
``load_state_dict``, after every check has passed.

Example:
    >>> match_names(["module.fc.weight", "module.fc.bias"], ["fc.weight", "fc.bias"])
    ({'module.fc.weight': 'fc.weight', 'module.fc.bias': 'fc.bias'}, "strip 'module.'")
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from emakit import schedules
from emakit.errors import EMAWarning, StateDictError, user_stacklevel
from emakit.io.layouts import EMACheckpoint, read_checkpoint
from emakit.names import match_names, renamed_state
from emakit.policy import Policy

if TYPE_CHECKING:
    from emakit.ema import EMA

__all__ = ["ema_from_checkpoint", "from_checkpoint", "match_names"]


def _schedule(found: EMACheckpoint, options: dict[str, Any], path: str) -> None:
    if options.get("decay") is not None or options.get("half_life") is not None:
        return
    if found.decay is None:
        hint = "; ".join(n for n in found.notes if "decay" in n.lower())
        raise ValueError(
            f"{path!r}: the {found.layout} layout does not record its decay exactly"
            f"{' (' + hint + ')' if hint else ''}. Pass decay= or half_life= to "
            "EMA.from_checkpoint, the value the run used.")
    options["decay"] = schedules.from_dict(dict(found.decay))


def from_checkpoint(source: Any, path: Any, *, ema_class: type[EMA] | None = None,
                    names: Any = None, strict: bool = True, verify: bool = True,
                    **options: Any) -> EMA:
    """A new EMA of ``source`` that starts from the average in a checkpoint file.

    What :meth:`emakit.EMA.from_checkpoint` runs. The file may come from emakit
    (:func:`emakit.save`, or ``state_dict()`` inside a ``torch.save``) or from timm, Lightning,
    ema-pytorch, diffusers, torch-ema, Ultralytics or ``AveragedModel`` (see
    :mod:`emakit.io.layouts`), so training can switch libraries without losing the average.
    Names are matched to the source's, allowing for one wrapper prefix (``module.``,
    ``_orig_mod.``, a LightningModule's attribute), for emakit's own files too. For emakit files
    every counter is restored; for the others the step is the one the file records (``start=``
    overrides it) and the decay must be given unless the file records it exactly (diffusers,
    torch-ema). Foreign weights are cast to the shadow dtype (fp32 by default, also for
    Ultralytics' fp16 average). Even with ``strict=False`` the EMA never starts from the
    model's own weights when no name in the file is tracked: that raises.

    Args:
        source: the model (as for :class:`~emakit.EMA`).
        path: the checkpoint file.
        ema_class: the class to build (:class:`~emakit.EMA` or a subclass).
        names: parameter names (or the model) for layouts that store a bare list of tensors;
            default: ``source`` when it is a module.
        strict: raise if the file lacks a tracked tensor (buffers excepted for layouts that
            average parameters only) or holds names the model does not have; otherwise warn
            (:class:`~emakit.EMAWarning`) naming them, and the missing ones start from the
            model's weights.
        verify: check an emakit file's CRC-32 checksums (False skips them, for huge files).
        **options: the keyword arguments of :class:`~emakit.EMA` (``decay``, ``half_life``,
            ``every``, ``dtype``, ``device``, ``policy``, ``start``, ...).

    Returns:
        The EMA, holding the file's average.

    Raises:
        ValueError: no known layout, no decay given where the file records none, no tracked
            name in the file, or a name or shape mismatch (:class:`~emakit.StateDictError`);
            nothing is half-done.

    Example:
        >>> import numpy as np, pathlib, tempfile
        >>> import emakit
        >>> w = {"w": np.array([1.0, 2.0])}
        >>> ema = emakit.EMA(w, decay=0.9)
        >>> w["w"] += 1.0
        >>> _ = ema.update()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ema.safetensors"
        >>> emakit.save(ema, path)
        >>> again = from_checkpoint(w, path)
        >>> again.averaged()["w"], again.step, again.schedule
        (array([1.1, 2.1]), 1, Constant(decay=0.9))
    """
    if ema_class is None:
        from emakit.ema import EMA

        ema_class = EMA
    return ema_from_checkpoint(ema_class, source, path, names=names, strict=strict,
                               options={**options, "verify": verify})


def ema_from_checkpoint(cls: type[EMA], source: Any, path: Any, *, names: Any, strict: bool,
                        options: Mapping[str, Any]) -> EMA:
    """:func:`from_checkpoint` with the class given and the EMA options as a mapping (which
    may hold ``verify``)."""
    if names is None and callable(getattr(source, "named_parameters", None)):
        names = source
    opts = dict(options)
    verify = opts.pop("verify", True)
    found = read_checkpoint(path, names=names, verify=bool(verify))
    where = repr(str(path))
    _schedule(found, opts, str(path))
    if found.layout == "emakit":
        return _from_emakit(cls, source, found, strict, opts, where)
    if opts.get("start") is None:
        opts["start"] = found.step or 0
    ema = cls(source, **opts)
    renamed, how = match_names(list(found.weights), ema.names)
    tracked = set(ema.names)
    weights = {renamed[f]: t for f, t in found.weights.items() if renamed[f] in tracked}
    missing = [n for n in ema.names if n not in weights]
    if found.scope == "parameters":  # buffers are not in such files: they start from the model
        named = getattr(source, "named_parameters", None)
        if callable(named):
            params = {n for n, _ in named()}
            missing = [n for n in missing if n in params]
    known = _known_names(source, ema)  # names the model has but the EMA skips are fine
    unexpected = [f for f in found.weights if renamed[f] not in known]
    if not weights and ema.names:
        raise _nothing_matches(where, found, how, missing, unexpected)
    if strict and (missing or unexpected):
        raise StateDictError(
            f"{where}: the {found.layout} checkpoint{found.where} does not fit this model "
            f"(names matched {how})", missing=missing, unexpected=unexpected,
            fix="Use the model the checkpoint was made for, or pass strict=False to start from "
                "the names it has (the rest start from the model's weights).")
    try:
        _start_from(ema, weights, found.num_updates or 0)
    except StateDictError as exc:
        raise exc.located(where) from None
    if missing or unexpected:
        warnings.warn(f"{where}: started {len(weights)} of {len(ema.names)} tracked tensors "
                      f"from the checkpoint; missing {missing[:5]}, unexpected {unexpected[:5]}.",
                      EMAWarning, stacklevel=user_stacklevel())
    return ema


def _known_names(source: Any, ema: EMA) -> set[str]:
    """Every name the model holds, tracked or not (a file may carry the ones the EMA skips)."""
    if isinstance(source, Iterator):  # (name, tensor) pairs, already consumed by the EMA
        return set(ema.names)
    from emakit.sources import as_source

    return set(as_source(source).state()) | set(ema.names)


def _like(w: Any, shadow: Any) -> Any:
    """``w`` as a tensor of ``shadow``'s kind, dtype and device (a foreign average is cast)."""
    if type(shadow).__module__.startswith("torch"):
        import torch

        t = w if isinstance(w, torch.Tensor) else torch.as_tensor(w)
        return t.detach().to(device=shadow.device, dtype=shadow.dtype)
    import numpy as np

    if type(w).__module__.startswith("torch"):
        w = w.detach().to("cpu")
        w = (w.float() if str(w.dtype) == "torch.bfloat16" else w).numpy()
    return np.asarray(w).astype(shadow.dtype)


def _start_from(ema: EMA, weights: Mapping[str, Any], num_updates: int) -> None:
    """Load ``weights`` (by tracked name) and ``num_updates`` into ``ema``, all or nothing.

    Goes through :meth:`EMA.load_state_dict` with the EMA's own state, so every check there
    (shapes above all) runs before anything changes; the other tracked tensors keep the
    model's weights.
    """
    state = ema.state_dict()
    shadows = dict(state["shadows"])
    shadows.update({n: _like(w, shadows[n]) for n, w in weights.items()})
    ema.load_state_dict({**state, "shadows": shadows, "num_updates": num_updates})


def _nothing_matches(where: str, found: EMACheckpoint, how: str, missing: list[str],
                     unexpected: list[str]) -> StateDictError:
    return StateDictError(
        f"{where}: none of the {len(found.weights)} names in the {found.layout} "
        f"checkpoint{found.where} is tracked by this EMA (names matched {how}), so nothing "
        "would come from the file", missing=missing, unexpected=unexpected,
        fix="Use the model the checkpoint was made for; even with strict=False an EMA never "
            "starts from the model's own weights with the file's counters.")


def _saved_policy(saved: Mapping[str, Any], where: str) -> Policy:
    """The policy a file was saved with (a new EMA from it keeps the file's rules)."""
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in saved.items()}
    try:
        return Policy(**fields)
    except (TypeError, ValueError) as exc:
        raise StateDictError(f"{where}: the saved policy {dict(saved)!r} is not valid ({exc})",
                             fix="The file is corrupt or was edited; pass policy=.") from None


def _from_emakit(cls: type[EMA], source: Any, found: EMACheckpoint, strict: bool,
                 opts: dict[str, Any], where: str) -> EMA:
    state = dict(found.state or {})
    opts.setdefault("every", state.get("every", 1))
    opts.setdefault("start", "zeros" if state.get("init") == "zeros" else None)
    if "policy" not in opts and isinstance(state.get("policy"), Mapping):
        opts["policy"] = _saved_policy(state["policy"], where)
    ema = cls(source, **opts)
    saved = list(state.get("shadows") or {})
    aliases = state.get("aliases")
    renamed, how = match_names(
        [*saved, *(aliases if isinstance(aliases, Mapping) else ())], ema.names)
    if how != "as is":
        state = renamed_state(state, renamed)
    tracked = set(ema.names)
    hits = [renamed[n] for n in saved if renamed[n] in tracked]
    missing = [n for n in ema.names if n not in set(hits)]
    unexpected = [n for n in saved if renamed[n] not in tracked]
    if not hits and ema.names:
        raise _nothing_matches(where, found, how, missing, unexpected)
    try:
        ema.load_state_dict(state, strict=strict)
    except StateDictError as exc:
        raise exc.located(where) from None
    if missing or unexpected:
        warnings.warn(f"{where}: started {len(hits)} of {len(ema.names)} tracked tensors from "
                      f"the checkpoint (names matched {how}); missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}; the missing ones start from the model's "
                      "weights.", EMAWarning, stacklevel=user_stacklevel())
    return ema
