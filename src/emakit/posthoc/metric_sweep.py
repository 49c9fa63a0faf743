"""The sigma_rel sweep: evaluate synthesised averages of several widths, keep the best.

For each ``sigma_rel``, :func:`sweep` synthesises the average (:func:`emakit.posthoc.synthesize`),
hands it to your ``evaluate`` (as a state dict, or loaded into ``model``) and records the metric;
then it writes the best average to a file, a PNG of metric against ``sigma_rel`` with the chosen
point, and returns a :class:`SweepResult` whose :meth:`~SweepResult.table` prints the numbers.
Every target is checked against what the snapshots support before anything is evaluated.

Example:
    >>> import numpy as np, pathlib, tempfile
    >>> from emakit.posthoc import Snapshots, sweep
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> w = {"w": np.zeros(1)}
    >>> rec = Snapshots(w, folder, snapshot_every=100)
    >>> rng = np.random.default_rng(0)
    >>> for step in range(1, 3001):
    ...     w["w"][:] = 1.0 + rng.normal()            # noise around the answer, 1.0
    ...     _ = rec.update()
    >>> result = sweep(folder, [0.05, 0.1, 0.2], lambda sd: abs(float(sd["w"][0]) - 1.0))
    >>> result.best_sigma_rel                      # the widest average removes the most noise
    0.2
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from emakit.posthoc.least_squares import MAX_PROFILE_ERROR, supported_ranges
from emakit.posthoc.synthesis import Record, open_record, select, synthesize

__all__ = ["SweepResult", "default_sigma_rels", "plot_sweep", "sigma_rel_axis", "sweep"]


class SweepResult(NamedTuple):
    """What :func:`sweep` measured.

    Attributes:
        step: the step the averages end at.
        sigma_rels: the widths evaluated, in the order given.
        metrics: the metric of each (NaN where ``evaluate`` returned NaN).
        profile_errors: how far each synthesised profile is from its target (relative L2).
        best_index: the index of the best finite metric.
        mode: ``"min"`` or ``"max"``.
        out: the file the best average was written to, or None.
        plot: the PNG written, or None.
    """

    step: int
    sigma_rels: tuple[float, ...]
    metrics: tuple[float, ...]
    profile_errors: tuple[float, ...]
    best_index: int
    mode: str
    out: Path | None
    plot: Path | None

    @property
    def best_sigma_rel(self) -> float:
        """The width with the best metric."""
        return self.sigma_rels[self.best_index]

    @property
    def best_metric(self) -> float:
        """The best metric."""
        return self.metrics[self.best_index]

    def table(self) -> str:
        """The sweep as a text table, the best row marked."""
        lines = [f"step {self.step}: metric by sigma_rel ({self.mode} is best)",
                 "sigma_rel        metric  profile error", "---------  ------------  -------------"]
        for i, (s, m, e) in enumerate(zip(self.sigma_rels, self.metrics, self.profile_errors)):
            mark = "  *best" if i == self.best_index else ""
            lines.append(f"{s:9.4f}  {m:12.6g}  {e:13.2e}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values."""
        return {"step": self.step, "mode": self.mode, "best_sigma_rel": self.best_sigma_rel,
                "best_metric": self.best_metric,
                "rows": [{"sigma_rel": s, "metric": m if math.isfinite(m) else None,
                          "profile_error": e}
                         for s, m, e in zip(self.sigma_rels, self.metrics, self.profile_errors)],
                "out": str(self.out) if self.out else None,
                "plot": str(self.plot) if self.plot else None}


def default_sigma_rels(record: Record, step: int | None = None, *, count: int = 12,
                       max_profile_error: float = MAX_PROFILE_ERROR) -> list[float]:
    """``count`` widths spread evenly in log scale over the widest supported range at ``step``.

    Raises:
        ValueError: no width is supported at that step.
    """
    out = step if step is not None else record.steps[-1]
    used = [e for e in record.entries if e.step <= out]
    ranges = supported_ranges([e.step for e in used], [e.gamma for e in used], out,
                              max_profile_error=max_profile_error)
    if not ranges:
        raise ValueError(f"the snapshots in {str(record.dir)!r} support no sigma_rel at step "
                         f"{out} within max_profile_error={max_profile_error:g}.")
    lo, hi = max(ranges, key=lambda r: math.log(r[1] / r[0]))
    return [float(f"{x:.4g}") for x in np.geomspace(lo, hi, count)]


def _metric(value: object, sigma_rel: float) -> float:
    item = getattr(value, "item", None)
    got = item() if callable(item) and not isinstance(value, (int, float)) else value
    if type(got) is int or isinstance(got, (float, np.floating, np.integer)):
        return float(got)
    raise TypeError(f"evaluate returned {value!r} of type {type(value).__name__} for sigma_rel "
                    f"{sigma_rel}; it must return a number (the metric), e.g. a float.")


def _loader(model: Any) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    """``load(state)`` into ``model`` and ``restore()`` of its own weights."""
    if hasattr(model, "load_state_dict") and hasattr(model, "state_dict"):
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def load(state: dict[str, Any]) -> None:
            result = model.load_state_dict(state, strict=False)
            if result.unexpected_keys:
                raise ValueError(f"the snapshots hold tensors the model lacks: "
                                 f"{result.unexpected_keys[:5]}; give the model they recorded.")

        return load, lambda: model.load_state_dict(own)
    if isinstance(model, Mapping):
        own = {k: np.array(v, copy=True) for k, v in model.items()}

        def load_arrays(state: dict[str, Any]) -> None:
            missing = [k for k in state if k not in model]
            if missing:
                raise ValueError(f"the snapshots hold tensors the model lacks: {missing[:5]}.")
            shapes = [f"{k}: {np.shape(model[k])} != {np.shape(v)}" for k, v in state.items()
                      if np.shape(model[k]) != np.shape(v)]
            if shapes:
                raise ValueError(f"the model's arrays differ in shape from the snapshots': "
                                 f"{shapes[:5]}; give the model they recorded.")
            for k, v in state.items():
                np.copyto(model[k], v)

        def restore_arrays() -> None:
            for k, v in own.items():
                np.copyto(model[k], v)

        return load_arrays, restore_arrays
    raise TypeError(f"model must be an nn.Module (load_state_dict) or a dict of numpy arrays, "
                    f"got {type(model).__name__}; or leave it out and evaluate the state dict.")


def _check_out(out: str | os.PathLike[str] | None, plot: str | os.PathLike[str] | None
               ) -> tuple[Path | None, Path | None]:
    from emakit.io.weights import SUFFIXES

    dest = Path(out) if out is not None else None
    if dest is not None and dest.suffix.lower() not in SUFFIXES:
        raise ValueError(f"out={str(dest)!r}: use one of the suffixes {', '.join(SUFFIXES)}.")
    picture = Path(plot) if plot is not None else None
    if picture is not None and picture.suffix.lower() != ".png":
        raise ValueError(f"plot={str(picture)!r}: the figure is a PNG; end the name in .png.")
    for path in (dest, picture):
        if path is not None and not path.parent.is_dir():
            raise FileNotFoundError(f"the folder of {str(path)!r} does not exist.")
    return dest, picture


def sweep(dir: str | os.PathLike[str] | Record, sigma_rels: Sequence[float] | None,
          evaluate: Callable[[Any], object], *, model: Any = None, step: int | None = None,
          mode: str = "min", out: str | os.PathLike[str] | None = None,
          plot: str | os.PathLike[str] | None = None, framework: str | None = None,
          verify: bool = True, max_profile_error: float = MAX_PROFILE_ERROR) -> SweepResult:
    """Evaluate the synthesised average of each ``sigma_rel``; write the best.

    Args:
        dir: the snapshot folder (or a :class:`~emakit.posthoc.synthesis.Record`).
        sigma_rels: the widths to try; None: 12 spread over the supported range.
        evaluate: ``evaluate(model)`` if ``model`` is given (loaded with each average), else
            ``evaluate(state_dict)``; returns the metric (a number; NaN is never best).
        model: an ``nn.Module`` or a dict of numpy arrays to load each average into (by name,
            tensors the snapshots lack keep their values); its own weights are put back after
            the sweep, error or not.
        step: the step the averages end at (default: the last snapshot's).
        mode: ``"min"`` (a loss, FID) or ``"max"`` (an accuracy) is best.
        out: write the best average here (``.safetensors``, ``.pt``, ``.npz``), atomically.
        plot: write a PNG of metric against ``sigma_rel`` here (needs matplotlib).
        framework, verify, max_profile_error: as for :func:`~emakit.posthoc.synthesize`.

    Returns:
        A :class:`SweepResult`.

    Raises:
        ValueError: a width the snapshots do not support (before anything is evaluated), a bad
            ``mode``, suffix or step, or no finite metric.
        TypeError: ``evaluate`` returned something that is not a number.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (lower is better) or 'max', got {mode!r}.")
    dest, picture = _check_out(out, plot)
    record = dir if isinstance(dir, Record) else open_record(dir, verify=verify)
    if sigma_rels is None:
        sigma_rels = default_sigma_rels(record, step, max_profile_error=max_profile_error)
    widths = [float(s) for s in sigma_rels]
    if not widths:
        raise ValueError("sigma_rels is empty: give the widths to try, or None for a default "
                         "range.")
    chosen = select(record, widths, step, max_profile_error=max_profile_error)  # checks all
    at, errors = chosen.step, chosen.solution.profile_errors
    load, restore = _loader(model) if model is not None else (None, None)
    metrics = []
    try:
        for s in widths:
            state = synthesize(record, s, step=at, framework=framework, verify=verify,
                               max_profile_error=max_profile_error)
            if load is not None:
                load(state)
                del state
                metrics.append(_metric(evaluate(model), s))
            else:
                metrics.append(_metric(evaluate(state), s))
    finally:
        if restore is not None:
            restore()
    finite = [i for i, m in enumerate(metrics) if not math.isnan(m)]
    if not finite:
        raise ValueError(f"evaluate returned NaN for every sigma_rel {widths}: nothing to choose.")
    pick = min if mode == "min" else max
    best = pick(finite, key=lambda i: metrics[i])
    result = SweepResult(at, tuple(widths), tuple(metrics), tuple(float(e) for e in errors),
                         best, mode, dest, picture)
    if dest is not None:
        from emakit.io import write_weights

        state = synthesize(record, widths[best], step=at, framework=framework, verify=verify,
                           max_profile_error=max_profile_error)
        write_weights(state, dest, metadata={
            "emakit.posthoc.sigma_rel": repr(widths[best]), "emakit.posthoc.step": str(at),
            "emakit.posthoc.metric": repr(metrics[best]), "emakit.posthoc.mode": mode})
    if picture is not None:
        plot_sweep(result, picture, inputs=record.manifest.sigma_rels)
    return result


def plot_sweep(result: SweepResult, path: Path, *, inputs: Sequence[float] = (),
               title: str | None = None) -> None:
    """Write a PNG of metric against ``sigma_rel`` (log scale), the best point starred and the
    recorded widths marked."""
    from emakit.cli.figures import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.sigma_rels, result.metrics, "o-", ms=4, label="synthesised average")
    ax.plot([result.best_sigma_rel], [result.best_metric], "*", ms=16, color="C3",
            label=f"best: sigma_rel {result.best_sigma_rel:.4g} ({result.best_metric:.4g})")
    for k, s in enumerate(inputs):
        ax.axvline(s, color="gray", ls=":", lw=1, label="recorded widths" if k == 0 else None)
    sigma_rel_axis(ax)
    ax.set(xlabel="sigma_rel (width of the average, relative to the run)",
           ylabel=f"metric ({result.mode} is best)",
           title=title or f"post-hoc EMA sweep at step {result.step}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    save_png(fig, path)


TICKS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)


def sigma_rel_axis(ax: Any) -> None:
    """A log-scale ``sigma_rel`` x axis labelled with plain numbers (0.03, 0.05, 0.1, ...)."""
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(TICKS))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
