"""``emakit demo``: train a small CNN on digits with an EMA and keep the best EMA weights.

The set-up is deliberately noisy (a fifth of the training labels are wrong, large learning rate,
small batches), which is where an average of the weights beats the last weights. Every epoch the
training weights and the EMA weights are evaluated on a held-out validation split; the best EMA
weights (by validation accuracy) are kept with :class:`emakit.KeepBest`; at the end both are scored
on a test split that played no part in any choice. Uses only the public API: ``EMA``,
``swapped()``, ``KeepBest``, ``state_dict()``.

Runs on one torch thread unless ``--threads N`` says otherwise: the CNN is too small to gain from
intra-op threads, and on cores shared with other processes extra threads made it many times
slower. The caller's thread count is restored afterwards. The same seed and thread count give the
same numbers, bit for bit; a different thread count splits some floating-point sums (gradients of
the convolution and of the last layer) differently, so its numbers differ in the last bits and
then in the table.

Writes ``OUT/best_ema.safetensors`` (a plain state dict), ``OUT/checkpoint.pt`` (model, optimizer,
EMA and KeepBest state, for resuming), ``OUT/ema.safetensors`` (the EMA alone, ``emakit.save``;
try ``emakit inspect`` on it), ``OUT/report.json`` and ``OUT/curves.png``.

``--posthoc`` runs the post-hoc EMA demo instead (:mod:`emakit.cli.demo_posthoc`): the same data
and training, with power-EMA snapshots recorded; then a sweep of sigma_rel against the best of
several fixed decays.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from emakit.cli.demo_setup import LABEL_NOISE, build_model, evaluate_model, load_data, prepare_data
from emakit.cli.errors import CLIError

__all__ = ["add_parser", "load_data", "run"]

_model = build_model  # the name the CLI tests use


def add_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="train a small CNN with EMA and keep the best EMA weights",
                       description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--decay", type=float, help="per-step EMA decay, e.g. 0.99")
    g.add_argument("--half-life", type=float, help="EMA half-life in optimizer steps "
                   "(default 50)")
    p.add_argument("--out", type=Path, default=Path("emakit-demo"),
                   help="output folder (default ./emakit-demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--data", type=Path, help="your own data: an .npz with arrays X (samples "
                   "first; 2-D features or images N,H,W / N,C,H,W) and y (integer labels)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads while the demo runs (default 1: the small CNN "
                        "gains nothing from more, and shared cores slow it down many times)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--posthoc", action="store_true",
                   help="post-hoc EMA instead: record power-EMA snapshots, then sweep sigma_rel "
                        "and compare the synthesised best with the best of several fixed "
                        "decays (writes OUT/snapshots/, OUT/posthoc-*)")
    p.set_defaults(run=run)


# ------------------------------------------------------------------------------------ run
def run(args: argparse.Namespace) -> int:
    """Check the options, then train with ``--threads`` torch threads and deterministic
    algorithms; the caller's thread count and determinism flag are restored afterwards."""
    if args.threads < 1:
        raise CLIError(f"--threads must be >= 1, got {args.threads}.")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1, got {args.epochs}.")
    if args.decay is not None and not 0.0 <= args.decay <= 1.0:
        raise CLIError(f"--decay must be in [0, 1], got {args.decay}.")
    if args.half_life is not None and not (math.isfinite(args.half_life) and args.half_life > 0):
        raise CLIError(f"--half-life must be a number of steps > 0, got {args.half_life}.")
    if args.posthoc and (args.decay is not None or args.half_life is not None):
        raise CLIError("--posthoc compares the synthesised average with a range of fixed "
                       "half-lives itself; drop --decay / --half-life.")
    try:
        import torch
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError(f"the demo needs torch, scikit-learn, matplotlib and tqdm ({exc}); "
                          "install them with: pip install -c constraints.txt 'emakit[demo]'"
                          ) from exc
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        if args.posthoc:
            from emakit.cli.demo_posthoc import train_posthoc

            return train_posthoc(args, torch, tqdm)
        return _train(args, torch, tqdm)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(args: argparse.Namespace, torch: Any, tqdm: Any) -> int:
    import emakit
    from emakit.io import atomic_path

    started = time.perf_counter()
    data = prepare_data(args, torch)
    x_all, source, classes = data.x_all, data.source, data.classes
    tr, va, te = data.train, data.val, data.test
    x_train, y_train_t, x_val, y_val, x_test, y_test = data.tensors
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    model = build_model(x_all.shape, classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    # TensorFlow-style warmup: min(decay, (1 + t) / (10 + t)), so the average follows the fast
    # early progress instead of holding on to the random initial weights.
    decay = args.decay if args.decay is not None else emakit.schedules.half_life_to_decay(
        args.half_life or 50.0)
    ema = emakit.EMA(model, decay=emakit.schedules.TFWarmup(decay))
    keep = emakit.KeepBest(ema, out / "best_ema.safetensors", mode="max")

    batch = 16
    steps_per_epoch = math.ceil(len(tr) / batch)
    gen = torch.Generator().manual_seed(args.seed)
    history: list[dict[str, Any]] = []
    bar = tqdm(total=args.epochs * steps_per_epoch, desc="emakit demo", unit="step",
               disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    train_s = eval_s = 0.0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        order = torch.randperm(len(tr), generator=gen)
        losses = []
        for i in range(0, len(tr), batch):
            idx = order[i:i + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x_train[idx]), y_train_t[idx])
            loss.backward()
            optimizer.step()
            ema.update()
            losses.append(loss.detach())
            bar.update(1)
        t1 = time.perf_counter()
        raw_acc, raw_loss = evaluate_model(model, x_val, y_val)
        ema_loss = 0.0

        def evaluate_ema() -> float:
            nonlocal ema_loss
            acc, ema_loss = evaluate_model(model, x_val, y_val)
            return acc

        ema_acc = keep.evaluate(evaluate_ema)
        with atomic_path(out / "checkpoint.pt") as tmp:  # the training weights, not the EMA's
            torch.save({"epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                        "keep_best": keep.state_dict()}, tmp)
        emakit.save(ema, out / "ema.safetensors", metadata={"epoch": str(epoch)})
        t2 = time.perf_counter()
        train_s, eval_s = train_s + t1 - t0, eval_s + t2 - t1
        row = {"epoch": epoch, "train_loss": float(torch.stack(losses).mean()),
               "raw_acc": raw_acc, "ema_acc": ema_acc, "raw_loss": raw_loss,
               "ema_loss": ema_loss, "decay": ema.schedule(ema.step), "step": ema.step,
               "best": keep.best_step == ema.step, "seconds": round(t2 - t0, 3)}
        history.append(row)
        bar.set_postfix(raw=f"{raw_acc:.3f}", ema=f"{ema_acc:.3f}")
    bar.close()

    # Score on the test split: the final training weights, and the kept best EMA weights
    # loaded into a fresh plain model with load_state_dict (what a user would deploy).
    from safetensors.torch import load_file

    test_raw, _ = evaluate_model(model, x_test, y_test)
    deployed = build_model(x_all.shape, classes)
    deployed.load_state_dict(load_file(out / "best_ema.safetensors"))
    test_best, _ = evaluate_model(deployed, x_test, y_test)
    best_row = max(history, key=lambda r: r["ema_acc"])
    summary = {"best_raw_val_acc": max(r["raw_acc"] for r in history),
               "best_ema_val_acc": max(r["ema_acc"] for r in history),
               "final_raw_val_acc": history[-1]["raw_acc"],
               "final_ema_val_acc": history[-1]["ema_acc"],
               "test_acc_final_raw": test_raw, "test_acc_best_ema": test_best}
    timings = {"total_s": 0.0, "train_s": round(train_s, 2), "eval_and_save_s": round(eval_s, 2)}
    report: dict[str, Any] = {
        "settings": {"data": source, "epochs": args.epochs, "seed": args.seed,
                     "decay": decay, "half_life_steps": emakit.schedules.decay_to_half_life(decay),
                     "schedule": ema.schedule.to_dict(), "batch_size": batch, "optimizer":
                     "SGD lr 0.1 momentum 0.9 weight_decay 1e-4", "label_noise": LABEL_NOISE,
                     "split": {"train": len(tr), "val": len(va), "test": len(te)},
                     "threads": torch.get_num_threads(),
                     "steps_per_epoch": steps_per_epoch, "parameters":
                     sum(p.numel() for p in model.parameters())},
        "epochs": history,
        "best": {"epoch": best_row["epoch"], "step": keep.best_step, "val_ema_acc": keep.best,
                 "file": str(out / "best_ema.safetensors")},
        "summary": summary,
        "timings": timings,
        "versions": {"emakit": emakit.__version__, "torch": torch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    _plot(history, out / "curves.png", title=f"emakit demo: {source}, seed {args.seed}")
    timings["total_s"] = round(time.perf_counter() - started, 2)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(_table(history))
    raw_best, ema_best = summary["best_raw_val_acc"], summary["best_ema_val_acc"]
    print(f"\nbest validation accuracy: raw {raw_best:.4f}, EMA {ema_best:.4f} "
          f"(gain {ema_best - raw_best:+.4f})")
    print(f"test accuracy: final raw weights {test_raw:.4f}, best EMA weights {test_best:.4f}")
    print(f"wrote {out / 'best_ema.safetensors'} (epoch {best_row['epoch']}), "
          f"{out / 'checkpoint.pt'}, {out / 'ema.safetensors'}, {out / 'report.json'}, "
          f"{out / 'curves.png'} in {timings['total_s']:.1f} s")
    print(f"see what the EMA file holds: emakit inspect {out / 'ema.safetensors'}")
    return 0


def _table(history: list[dict[str, Any]]) -> str:
    lines = ["epoch  raw acc  EMA acc  train loss  decay", "-----  -------  -------  ----------"
             "  ------"]
    for r in history:
        mark = "  *best" if r["best"] else ""
        lines.append(f"{r['epoch']:5d}  {r['raw_acc']:7.4f}  {r['ema_acc']:7.4f}  "
                     f"{r['train_loss']:10.4f}  {r['decay']:.4f}{mark}")
    return "\n".join(lines)


def _plot(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    from emakit.cli.figures import pyplot, save_png

    plt = pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(epochs, [r["raw_acc"] for r in history], "o-", ms=3, label="training weights")
    ax1.plot(epochs, [r["ema_acc"] for r in history], "o-", ms=3, label="EMA weights")
    best = max(history, key=lambda r: r["ema_acc"])
    ax1.plot([best["epoch"]], [best["ema_acc"]], "*", ms=14, color="C1",
             label=f"kept best EMA ({best['ema_acc']:.3f})")
    ax1.set(xlabel="epoch", ylabel="validation accuracy", title="accuracy")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")
    ax2.plot(epochs, [r["raw_loss"] for r in history], "o-", ms=3, label="val, training weights")
    ax2.plot(epochs, [r["ema_loss"] for r in history], "o-", ms=3, label="val, EMA weights")
    ax2.plot(epochs, [r["train_loss"] for r in history], "--", color="gray",
             label="train (noisy labels)")
    ax2.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right")
    fig.suptitle(title)
    save_png(fig, path)
