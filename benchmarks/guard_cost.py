"""What the non-finite guard costs: guarded / plain update, timed in one process.

``emakit bench`` gives each contender a process of its own, and on CPU the flat reference of a
100 MB model can take 2.8 ms in one process and 5.3 ms in the next (where the pages land), so
the ratio of two of its rows moves by 30 % between runs. Here one process holds both EMAs over
the same weights (``Policy(nonfinite="skip")`` and the default), timed in alternating chunks,
and the ratio of their medians is taken; the median of ``RUNS`` fresh processes is reported,
with the range.

Writes ``benchmarks/results/guard-cost-cpu-<threads>threads-torch<version>.{md,json}``.

Run from a clone: ``python benchmarks/guard_cost.py`` (about 3 minutes on 2 CPU threads).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ["tiny-gpt", "resnet50", "gpt2-small", "linear-4x"]
RUNS = 3
PROBE = """
import json, statistics, sys, time, torch
import emakit
from emakit.backends.torch import native
from emakit.bench.models import build
model = build(sys.argv[1])
if sys.argv[2] == "flat":
    emakit.flatten_parameters(model)
plain = emakit.EMA(model, decay=0.999)
guarded = emakit.EMA(model, decay=0.999, policy=emakit.Policy(nonfinite="skip"))
plain.update(); guarded.update()
def per_call(fn, budget=0.05):
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < budget:
        fn(); calls += 1
    return (time.perf_counter() - t0) / calls
p, g = [], []
for _ in range(15):
    p.append(per_call(plain.update)); g.append(per_call(guarded.update))
print(json.dumps({"plain_s": statistics.median(p), "guarded_s": statistics.median(g),
                  "kernels": native.status().split(" (")[0], "threads": torch.get_num_threads(),
                  "torch": torch.__version__.split("+")[0]}))
"""


def main() -> None:
    started = time.perf_counter()
    rows = []
    for model in MODELS:
        for layout in ("flat", "plain"):
            runs = []
            for _ in range(RUNS):
                out = subprocess.run([sys.executable, "-c", PROBE, model, layout],
                                     capture_output=True, text=True, check=True, timeout=900)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            ratios = sorted(r["guarded_s"] / r["plain_s"] for r in runs)
            rows.append({"model": model, "flattened": layout == "flat",
                         "plain_ms": statistics.median(r["plain_s"] for r in runs) * 1e3,
                         "guarded_ms": statistics.median(r["guarded_s"] for r in runs) * 1e3,
                         "ratio": statistics.median(ratios), "low": ratios[0],
                         "high": ratios[-1], "kernels": runs[0]["kernels"]})
            print(rows[-1], flush=True)
    info = {"threads": runs[0]["threads"], "torch": runs[0]["torch"], "runs": RUNS,
            "seconds": time.perf_counter() - started, "rows": rows}
    name = f"guard-cost-cpu-{info['threads']}threads-torch{info['torch']}"
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    lines = [f"# Non-finite guard: guarded / plain update (cpu, {info['threads']} threads, "
             f"torch {info['torch']})", "",
             f"`python benchmarks/guard_cost.py` ({info['seconds']:.0f} s): both EMAs over the "
             f"same weights in one process, timed in alternating chunks; median of {RUNS} fresh "
             f"processes (range in brackets).", "",
             "| model | flattened | kernels | plain ms | guarded ms | guarded / plain |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'yes' if r['flattened'] else 'no'} | {r['kernels']} | "
                     f"{r['plain_ms']:.3f} | {r['guarded_ms']:.3f} | {r['ratio']:.2f} "
                     f"({r['low']:.2f}-{r['high']:.2f}) |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
