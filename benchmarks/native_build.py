"""What emakit's native CPU kernels cost before the first update: the build, and the load.

Each run is a fresh process that imports torch and emakit, then times
``emakit.backends.torch.native.kernels()``: "cold" with an empty cache folder (compile with the
system C compiler, load, check against torch's kernels), "warm" with the library already in the
cache (load and check). Also times one first update of the tiny benchmark model in a fresh
process (plan, kernels and all) against the updates after it.

Writes ``benchmarks/results/native-build-cpu-torch<version>.{md,json}``.

Run from a clone: ``python benchmarks/native_build.py`` (about 15 seconds).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 5
PROBE = """
import time, json, torch
from emakit.backends.torch import native
t0 = time.perf_counter()
k = native.kernels()
load = time.perf_counter() - t0
import emakit
from emakit.bench.models import build
ema = emakit.EMA(build("tiny-gpt"), decay=0.999)
t1 = time.perf_counter(); ema.update(); first = time.perf_counter() - t1
later = []
for _ in range(50):
    t = time.perf_counter(); ema.update(); later.append(time.perf_counter() - t)
later.sort()
print(json.dumps({"kernels_s": load, "status": native.status(), "first_update_s": first,
                  "later_update_s": later[len(later) // 2], "torch": torch.__version__}))
"""


def probe(cache: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "EMAKIT_NATIVE"}
    env["EMAKIT_CACHE"] = str(cache)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=env, check=True, timeout=600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def compiler() -> str:
    cc = os.environ.get("CC", "cc")
    try:
        first = subprocess.run([cc, "--version"], capture_output=True, text=True,
                               check=False).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "none"
    return first


def main() -> None:
    cold, warm = [], []
    started = time.perf_counter()
    for _ in range(RUNS):
        with tempfile.TemporaryDirectory() as folder:
            cold.append(probe(Path(folder)))
            warm.append(probe(Path(folder)))
    if not str(cold[0]["status"]).startswith("native"):
        raise SystemExit(f"the native kernels are unavailable here: {cold[0]['status']}")

    def med(rows: list[dict[str, object]], key: str) -> float:
        return statistics.median(float(str(r[key])) for r in rows)

    result: dict[str, float] = {
        "cold_kernels_s": med(cold, "kernels_s"), "warm_kernels_s": med(warm, "kernels_s"),
        "cold_first_update_s": med(cold, "first_update_s"),
        "warm_first_update_s": med(warm, "first_update_s"),
        "later_update_s": med(warm, "later_update_s"),
        "seconds": time.perf_counter() - started,
    }
    info = {"compiler": compiler(), "runs": RUNS, **result}
    name = f"native-build-cpu-torch{str(cold[0]['torch']).split('+')[0]}"
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    ms = {k: v * 1e3 for k, v in result.items() if k.endswith("_s")}
    (out / f"{name}.md").write_text(
        f"# Native kernels: build and load ({info['compiler']})\n\n"
        f"`python benchmarks/native_build.py`: medians of {RUNS} fresh processes each, "
        f"cold = empty cache folder (compile, load, check), warm = cached library (load, "
        f"check). The first update includes its plan; later updates are the median of 50.\n\n"
        f"| | kernels() ms | first update of tiny-gpt ms |\n|---|---|---|\n"
        f"| cold cache | {ms['cold_kernels_s']:.0f} | {ms['cold_first_update_s']:.1f} |\n"
        f"| warm cache | {ms['warm_kernels_s']:.1f} | {ms['warm_first_update_s']:.1f} |\n"
        f"| later updates | | {ms['later_update_s']:.3f} |\n")
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
