"""``emakit demo --posthoc``: choose the EMA's width after training, on the demo's data.

The same data, network and noisy training as ``emakit demo``. During training,
:class:`emakit.posthoc.Snapshots` records power-function EMAs of sigma_rel 0.05 and 0.10 and writes
them 30 times over the run (every epoch by default) and at the last step; alongside, for
comparison, six fixed-decay EMAs (constant decays of half-lives 12.5 to 400 steps) are kept the
usual way, plus one power EMA of sigma_rel 0.07 as a check of the synthesis. After training,
:func:`emakit.posthoc.sweep` synthesises 12 widths over the range the snapshots support and
evaluates each on the validation split (cross-entropy: smoother than accuracy on 359 images); the
best synthesised average and the best fixed-decay EMA (chosen on the same split the same way) are
then scored on the test split, which played no part in either choice.

Writes ``OUT/snapshots/`` (the recording; try ``emakit posthoc info OUT/snapshots``),
``OUT/posthoc_best.safetensors`` (a plain state dict), ``OUT/posthoc.png`` and
``OUT/posthoc-report.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emakit.cli.demo_setup import build_model, evaluate_model, prepare_data
from emakit.cli.errors import CLIError

__all__ = ["CHECK_SIGMA_REL", "HALF_LIVES", "SIGMA_RELS", "profile_sigma_rel", "train_posthoc"]

SIGMA_RELS = (0.05, 0.10)
HALF_LIVES = (12.5, 25.0, 50.0, 100.0, 200.0, 400.0)
CHECK_SIGMA_REL = 0.07
SNAPSHOTS = 30
"""Snapshots per width over the run (every epoch for the default 30 epochs)."""


def profile_sigma_rel(schedule: Any, steps: int) -> float:
    """The width (std of the step each weight comes from, over ``steps``) of any schedule's
    average after ``steps`` steps: EDM2's ``sigma_rel``, for a fixed decay too."""
    from emakit.window import step_weights

    w = step_weights(schedule, steps)
    mids = np.concatenate([[0.0], w.steps - 0.5])  # each step's weights cover (s-1, s]
    shares = np.concatenate([[w.initial], w.weights])
    mean = float((shares * mids).sum())
    cells = float(w.weights.sum()) / 12.0  # the spread within each one-step cell
    return math.sqrt(float((shares * (mids - mean) ** 2).sum()) + cells) / steps


def _fresh(folder: Path) -> None:
    """Remove a previous demo's snapshot folder (only snapshot files and the manifest)."""
    if not folder.exists():
        return
    from emakit.posthoc.manifest import MANIFEST

    others = [p.name for p in folder.iterdir()
              if not (p.name == MANIFEST or (p.name.startswith("s") and
                                             p.name.endswith(".safetensors")))]
    if not folder.is_dir() or others:
        raise CLIError(f"{str(folder)!r} holds other files than a demo's snapshots "
                       f"({others[:3]}); choose another --out.")
    shutil.rmtree(folder)


def train_posthoc(args: argparse.Namespace, torch: Any, tqdm: Any) -> int:
    """Train with snapshots and fixed-decay EMAs, sweep sigma_rel, compare on the test split."""
    import emakit
    from emakit.posthoc import Snapshots, open_record, sweep

    started = time.perf_counter()
    data = prepare_data(args, torch)
    x_train, y_train, x_val, y_val, x_test, y_test = data.tensors
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    folder = out / "snapshots"
    _fresh(folder)

    model = build_model(data.x_all.shape, data.classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    batch = 16
    steps_per_epoch = math.ceil(len(data.train) / batch)
    total = args.epochs * steps_per_epoch
    every = math.ceil(total / SNAPSHOTS)  # every epoch by default (30 epochs of 68 steps)
    rec = Snapshots(model, folder, snapshot_every=every, sigma_rels=SIGMA_RELS)
    schedules = emakit.schedules
    fixed = emakit.MultiEMA(model, decays=[
        *(schedules.Constant.from_half_life(h) for h in HALF_LIVES),
        schedules.PowerFunction(sigma_rel=CHECK_SIGMA_REL)])
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=total, desc="emakit demo --posthoc", unit="step",
               disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    for _ in range(args.epochs):
        order = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(data.train), batch):
            idx = order[i:i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            rec.update()
            fixed.update()
            bar.update(1)
    bar.close()
    rec.snapshot()  # the last step (already written when it ends an epoch)
    train_s = time.perf_counter() - started
    steps = rec.step

    fixed_rows = []
    for h, ema in zip(HALF_LIVES, fixed):
        with ema.swapped():
            acc, loss_v = evaluate_model(model, x_val, y_val)
            test_acc, test_loss = evaluate_model(model, x_test, y_test)
        fixed_rows.append({"half_life": h, "sigma_rel": profile_sigma_rel(ema.schedule, steps),
                           "val_loss": loss_v, "val_acc": acc, "test_acc": test_acc,
                           "test_loss": test_loss})
    best_fixed = min(fixed_rows, key=lambda r: r["val_loss"])

    record = open_record(folder)
    evaluated: list[tuple[float, float]] = []

    def val_loss(m: Any) -> float:
        acc, loss_v = evaluate_model(m, x_val, y_val)
        evaluated.append((acc, loss_v))
        return loss_v

    t0 = time.perf_counter()
    result = sweep(record, None, val_loss, model=build_model(data.x_all.shape, data.classes),
                   mode="min", out=out / "posthoc_best.safetensors")
    sweep_s = time.perf_counter() - t0
    from safetensors.torch import load_file

    deployed = build_model(data.x_all.shape, data.classes)
    deployed.load_state_dict(load_file(out / "posthoc_best.safetensors"))
    test_acc, test_loss = evaluate_model(deployed, x_test, y_test)
    raw_val_acc, raw_val_loss = evaluate_model(model, x_val, y_val)
    raw_test_acc, raw_test_loss = evaluate_model(model, x_test, y_test)
    check = _check(record, fixed[len(HALF_LIVES)])

    rows = [{"sigma_rel": s, "val_loss": m, "val_acc": a, "profile_error": e}
            for s, m, (a, _), e in zip(result.sigma_rels, result.metrics, evaluated,
                                       result.profile_errors)]
    summary = {
        "synthesised": {"sigma_rel": result.best_sigma_rel, "val_loss": result.best_metric,
                        "val_acc": evaluated[result.best_index][0], "test_acc": test_acc,
                        "test_loss": test_loss},
        "fixed": best_fixed,
        "raw_final": {"val_loss": raw_val_loss, "val_acc": raw_val_acc,
                      "test_acc": raw_test_acc, "test_loss": raw_test_loss},
        "check_rel_l2": check}
    _plot(rows, fixed_rows, summary, out / "posthoc.png",
          title=f"emakit demo --posthoc: {data.source}, seed {args.seed}, step {steps}")
    report = {
        "settings": {"data": data.source, "epochs": args.epochs, "seed": args.seed,
                     "steps": steps, "snapshot_every": every,
                     "sigma_rels": list(SIGMA_RELS), "half_lives": list(HALF_LIVES),
                     "threads": torch.get_num_threads(), "metric": "validation cross-entropy"},
        "sweep": rows, "fixed": fixed_rows, "summary": summary,
        "snapshots": {"dir": str(folder), "files": len(record.entries),
                      "bytes": sum(e.bytes for e in record.entries)},
        "timings": {"train_s": round(train_s, 2), "sweep_s": round(sweep_s, 2),
                    "total_s": round(time.perf_counter() - started, 2)},
        "versions": {"emakit": emakit.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()}}
    (out / "posthoc-report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print(report, result.table(), out)
    return 0


def _check(record: Any, direct: Any) -> float | None:
    """The relative L2 difference between the synthesised sigma_rel 0.07 and the power EMA of
    that width tracked during training (all averaged tensors together); None if the snapshots
    do not support 0.07 (a very short run)."""
    from emakit.posthoc import synthesize

    try:
        synthesised = synthesize(record, CHECK_SIGMA_REL)
    except ValueError:
        return None
    tracked = direct.averaged()
    num = den = 0.0
    for name, action in direct.actions.items():
        if action == "average":
            a = tracked[name].double()
            num += float(((synthesised[name].double() - a) ** 2).sum())
            den += float((a ** 2).sum())
    return math.sqrt(num / den)


def _print(report: dict[str, Any], table: str, out: Path) -> None:
    s, summary = report["settings"], report["summary"]
    snaps = report["snapshots"]
    print(f"post-hoc EMA: {s['data']}, {s['epochs']} epochs ({s['steps']} steps); snapshots "
          f"of sigma_rel {', '.join(map(str, s['sigma_rels']))} every {s['snapshot_every']} "
          f"steps: {snaps['files']} files, {snaps['bytes'] / 1e6:.1f} MB\n")
    print("the synthesised average, by validation loss:\n" + table + "\n")
    print("fixed-decay EMAs (constant decay), kept during training:")
    print("half-life  sigma_rel  val loss  val acc")
    for r in report["fixed"]:
        mark = "  *best" if r is summary["fixed"] else ""
        print(f"{r['half_life']:9g}  {r['sigma_rel']:9.4f}  {r['val_loss']:8.4f}  "
              f"{r['val_acc']:7.4f}{mark}")
    syn, fix, raw = summary["synthesised"], summary["fixed"], summary["raw_final"]
    print("\n                                       val loss  val acc  test loss  test acc")
    for label, r in ((f"best synthesised (sigma_rel {syn['sigma_rel']:.4g})", syn),
                     (f"best fixed decay (half-life {fix['half_life']:g} steps)", fix),
                     ("final training weights", raw)):
        print(f"{label:<38} {r['val_loss']:8.4f}  {r['val_acc']:7.4f}  {r['test_loss']:9.4f}  "
              f"{r['test_acc']:8.4f}")
    check = summary["check_rel_l2"]
    print(f"\ncheck: sigma_rel {CHECK_SIGMA_REL} synthesised vs tracked during training: "
          + (f"relative L2 difference {check:.1e}" if check is not None else
             "not supported by this short run's snapshots"))
    print(f"wrote {out / 'posthoc_best.safetensors'}, {out / 'posthoc.png'}, "
          f"{out / 'posthoc-report.json'}, {out / 'snapshots'} in "
          f"{report['timings']['total_s']:.1f} s")
    print(f"try: emakit posthoc info {out / 'snapshots'}")


def _plot(rows: list[dict[str, Any]], fixed: list[dict[str, Any]], summary: dict[str, Any],
          path: Path, *, title: str) -> None:
    from emakit.cli.figures import pyplot, save_png
    from emakit.posthoc.metric_sweep import sigma_rel_axis

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4))
    ax.plot([r["sigma_rel"] for r in rows], [r["val_loss"] for r in rows], "o-", ms=4,
            label="synthesised from 2 recorded EMAs")
    ax.plot([r["sigma_rel"] for r in fixed], [r["val_loss"] for r in fixed], "s--", ms=6,
            color="C2", label="fixed decays (6 EMAs kept)")
    for r in fixed:
        ax.annotate(f"h={r['half_life']:g}", (r["sigma_rel"], r["val_loss"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    syn, fix = summary["synthesised"], summary["fixed"]
    ax.plot([syn["sigma_rel"]], [syn["val_loss"]], "*", ms=16, color="C3",
            label=f"chosen: sigma_rel {syn['sigma_rel']:.3g} (test acc {syn['test_acc']:.3f})")
    ax.plot([fix["sigma_rel"]], [fix["val_loss"]], "*", ms=14, color="C2", mec="k",
            label=f"best fixed: half-life {fix['half_life']:g} (test acc {fix['test_acc']:.3f})")
    for k, s in enumerate(SIGMA_RELS):
        ax.axvline(s, color="gray", ls=":", lw=1, label="recorded widths" if k == 0 else None)
    sigma_rel_axis(ax)
    ax.set(xlabel="sigma_rel (width of the average relative to the run)",
           ylabel="validation cross-entropy", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center")
    save_png(fig, path)
