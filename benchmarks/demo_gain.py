"""The EMA's gain in `emakit demo` over 5 seeds: best EMA minus best raw validation accuracy.

    python benchmarks/demo_gain.py [--seeds 0 1 2 3 4]

Runs `emakit demo --seed S` with the default settings for each seed and writes
benchmarks/results/demo-gain-cpu-torch<ver>.{md,json}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from emakit.cli import main as emakit_main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            rc = emakit_main(["demo", "--seed", str(seed), "--out", tmp, "--no-progress"])
            report = json.loads((Path(tmp) / "report.json").read_text())
        if rc:
            raise SystemExit(f"emakit demo --seed {seed} failed with status {rc}")
        s = report["summary"]
        rows.append({"seed": seed, "best_raw_val": s["best_raw_val_acc"],
                     "best_ema_val": s["best_ema_val_acc"],
                     "gain": s["best_ema_val_acc"] - s["best_raw_val_acc"],
                     "test_final_raw": s["test_acc_final_raw"],
                     "test_best_ema": s["test_acc_best_ema"],
                     "threads": report["settings"]["threads"],
                     "seconds": report["timings"]["total_s"]})
        print(json.dumps(rows[-1]), flush=True)
    gains = [r["gain"] for r in rows]
    test_gains = [r["test_best_ema"] - r["test_final_raw"] for r in rows]
    summary = {"gain_mean": statistics.mean(gains), "gain_std": statistics.stdev(gains),
               "gain_min": min(gains), "gain_max": max(gains),
               "test_gain_mean": statistics.mean(test_gains),
               "test_gain_std": statistics.stdev(test_gains),
               "seconds_max": max(r["seconds"] for r in rows)}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"demo-gain-cpu-torch{torch.__version__.split('+')[0]}"
    Path(f"{stem}.json").write_text(json.dumps({"rows": rows, "summary": summary},
                                                    indent=2) + "\n")
    lines = ["# `emakit demo`: EMA vs raw weights over seeds", "",
             f"`python benchmarks/demo_gain.py` (default demo settings: "
             f"{rows[0]['threads']} torch thread(s); machine: {os.cpu_count()} cores, "
             f"torch {torch.__version__}). s: wall seconds of the whole demo run.", "",
             "| seed | best raw val | best EMA val | gain | test, final raw | test, best EMA | s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['best_raw_val']:.4f} | {r['best_ema_val']:.4f} | "
              f"{r['gain']:+.4f} | {r['test_final_raw']:.4f} | {r['test_best_ema']:.4f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    lines += ["", f"Validation gain (best EMA - best raw): mean {summary['gain_mean']:+.4f}, "
              f"std {summary['gain_std']:.4f}, min {summary['gain_min']:+.4f}, max "
              f"{summary['gain_max']:+.4f}.",
              f"Test gain (kept best EMA - final raw): mean {summary['test_gain_mean']:+.4f}, "
              f"std {summary['test_gain_std']:.4f}."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-2:]))


if __name__ == "__main__":
    main()
