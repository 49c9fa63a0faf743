"""Peak memory of post-hoc EMA synthesis: 20+ snapshots of a 100M-parameter model.

    python benchmarks/posthoc_synthesis_memory.py [--params 100e6] [--steps 10] [--dir DIR]

Records a model of about ``--params`` parameters (an embedding of a quarter of them and square
Linear layers; fp32) with ``emakit.posthoc.Snapshots`` (sigma_rel 0.05 and 0.10, a snapshot after
each of ``--steps`` steps: 2 x steps files), then synthesises sigma_rel 0.07 at the last step in
fresh processes and reads each one's peak resident set size (``VmHWM`` of
``/proc/self/status``, which counts the pages of mapped files too; not ``ru_maxrss``, which on
Linux carries the parent process's peak across ``exec``):

- ``numpy``: ``synthesize(dir, 0.07, framework="numpy")`` (no torch in the process);
- ``torch``: ``synthesize(dir, 0.07)`` (torch tensors; the process imports torch);
- ``cli``: ``emakit posthoc synthesize DIR --sigma-rel 0.07 --out FILE`` (synthesis and the write).

Each is reported as the whole process's peak and as the peak above the process's resident size
just before the call (the interpreter and imports), against one model in fp32. Writes
``benchmarks/results/posthoc-synthesis-rss-cpu-torch<ver>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECORD = r"""
import math, sys, time, torch
from emakit.posthoc import Snapshots
params, steps, folder = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
width = 2048
vocab = int(params / 4 / 1024)
layers = max(1, math.ceil((params - vocab * 1024 - 1024 * width) / (width * width + 3 * width))
             + 1)  # at least --params parameters
torch.manual_seed(0)
blocks = [torch.nn.Embedding(vocab, 1024), torch.nn.Linear(1024, width)]
for _ in range(layers - 1):
    blocks += [torch.nn.Linear(width, width), torch.nn.LayerNorm(width)]
model = torch.nn.Sequential(*blocks)
n = sum(p.numel() for p in model.parameters())
rec = Snapshots(model, folder, snapshot_every=1)
t0 = time.perf_counter()
with torch.no_grad():
    for _ in range(steps):
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=1e-3)
        rec.update()
print(n, len(list(model.parameters())), max(p.numel() for p in model.parameters()),
      time.perf_counter() - t0)
"""

MEASURE = r"""
import json, sys, time
mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
if mode in ("torch", "cli"):
    import torch  # the cli writes torch tensors (the recording's backend): import it first
from emakit.posthoc import synthesize

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")

before = status_mb("VmRSS")
t0 = time.perf_counter()
if mode == "cli":
    from emakit.cli import main
    rc = main(["posthoc", "synthesize", folder, "--sigma-rel", "0.07", "--out", out])
    assert rc == 0
else:
    state = synthesize(folder, 0.07, framework=mode)
seconds = time.perf_counter() - t0
peak = status_mb("VmHWM")  # not ru_maxrss: on Linux it keeps the parent's peak across exec
print(json.dumps({"mode": mode, "before_mb": before, "peak_mb": peak, "seconds": seconds,
                  "torch_imported": "torch" in sys.modules}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--dir", type=Path, default=None,
                        help="where the snapshots go (default: a temporary folder, removed)")
    args = parser.parse_args()
    import torch

    work = Path(tempfile.mkdtemp(prefix="posthoc-bench-")) if args.dir is None else args.dir
    folder = work / "snaps"
    try:
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, "-c", RECORD, str(args.params), str(args.steps),
                               str(folder)], check=True, capture_output=True, text=True)
        n, tensors, largest, _ = made.stdout.split()
        n, tensors, largest = int(n), int(tensors), int(largest)
        files = sorted(folder.glob("*.safetensors"))
        size = sum(f.stat().st_size for f in files)
        print(f"recorded {n / 1e6:.1f}M parameters ({tensors} tensors, largest "
              f"{largest / 1e6:.1f}M), {len(files)} snapshot files, {size / 1e9:.2f} GB in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        model_mb = n * 4 / 2**20
        rows = []
        for mode in ("numpy", "torch", "cli"):
            out = work / "out.safetensors"
            run = subprocess.run([sys.executable, "-c", MEASURE, mode, str(folder), str(out)],
                                 check=True, capture_output=True, text=True)
            row = json.loads(run.stdout.strip().splitlines()[-1])
            row["peak_x_model"] = row["peak_mb"] / model_mb
            row["above_before_x_model"] = (row["peak_mb"] - row["before_mb"]) / model_mb
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"parameters": n, "tensors": tensors, "largest_tensor": largest,
              "snapshot_files": len(files), "snapshot_bytes": size, "model_fp32_mb": model_mb,
              "rows": rows,
              "chunk_elements": 2**20, "cpu_count": os.cpu_count(),
              "torch": torch.__version__}
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    stem = out_dir / f"posthoc-synthesis-rss-cpu-torch{torch.__version__.split('+')[0]}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Post-hoc EMA synthesis: peak memory", "",
             f"`python benchmarks/posthoc_synthesis_memory.py` (machine: {os.cpu_count()} cores, "
             f"torch {torch.__version__}). {n / 1e6:.1f}M fp32 parameters in {tensors} tensors "
             f"(largest {largest / 1e6:.1f}M), {len(files)} snapshot files (sigma_rel 0.05 and "
             f"0.10 at {args.steps} steps); synthesis of sigma_rel 0.07 at the last step. One "
             f"model in fp32: {model_mb:.0f} MiB. Peak: the process's peak resident set "
             "(VmHWM, mapped file pages included); before: its resident set just before "
             "the call (interpreter and imports).", "",
             "| mode | before (MiB) | peak (MiB) | peak / model | (peak - before) / model | s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['peak_x_model']:.2f} | {r['above_before_x_model']:.2f} | {r['seconds']:.1f} |"
              for r in rows]
    lines += ["", "numpy: `synthesize(dir, 0.07, framework=\"numpy\")` in a process without "
              "torch; torch: `synthesize(dir, 0.07)` (torch tensors); cli: `emakit posthoc "
              "synthesize DIR --sigma-rel 0.07 --out FILE` (synthesis and the file write).",
              "", f"The synthesis itself adds about one model (the result) plus its chunks "
              f"(2^20 values at a time, float64); reading every snapshot into memory instead "
              f"would hold {len(files)} x {model_mb:.0f} MiB = {len(files) * model_mb / 1024:.1f} "
              f"GiB. In the torch rows, 'before' includes torch's own import."]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not all(math.isfinite(r["peak_mb"]) for r in rows):
        raise SystemExit("a measurement failed")


if __name__ == "__main__":
    main()
