"""Time emakit.smoothing.ewm against pandas' Series/DataFrame.ewm().mean() on 10^7 points.

Each case runs both libraries interleaved (ours, pandas, ours, ...) in one process and reports the
medians, so machine noise hits both alike. Also checks the two agree (max relative difference).

    python benchmarks/smoothing_vs_pandas.py [--repeats 7] [--n 10000000]

Writes benchmarks/results/smoothing-cpu-<threads>threads-numpy<ver>-pandas<ver>.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd

from emakit.smoothing import ewm


def _time(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10**7)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(args.n).cumsum() * 1e-3 + rng.standard_normal(args.n)
    gappy = x.copy()
    gappy[rng.random(args.n) < 0.1] = np.nan
    wide = x.reshape(-1, 100)  # 100 series side by side, along axis 0
    cases = [
        ("1-D, adjust=True (pandas default)", x, {"alpha": 0.01}, 0),
        ("1-D, adjust=False", x, {"alpha": 0.01, "adjust": False}, 0),
        ("1-D, half_life=1000", x, {"half_life": 1000.0}, 0),
        ("2-D 100 columns, adjust=True", wide, {"alpha": 0.01}, 0),
        ("1-D, 10% NaN, adjust=True", gappy, {"alpha": 0.01}, 0),
        ("1-D, 10% NaN, ignore_na=True", gappy, {"alpha": 0.01, "ignore_na": True}, 0),
        ("1-D, 10% NaN, adjust=False", gappy, {"alpha": 0.01, "adjust": False}, 0),
    ]
    rows = []
    for name, data, kw, axis in cases:
        frame = pd.Series(data) if data.ndim == 1 else pd.DataFrame(data)
        pkw = {("halflife" if k == "half_life" else k): v for k, v in kw.items()}
        ours_t, pandas_t = [], []
        for _ in range(args.repeats):
            ours_t += _time(lambda d=data, k=kw, a=axis: ewm(d, axis=a, **k), 1)
            pandas_t += _time(lambda f=frame, k=pkw: f.ewm(**k).mean(), 1)
        got = ewm(data, axis=axis, **kw)
        want = frame.ewm(**pkw).mean().to_numpy()
        ok = ~np.isnan(want)
        rel = float(np.max(np.abs(got[ok] - want[ok])) / np.max(np.abs(want[ok])))
        o, p = statistics.median(ours_t) * 1e3, statistics.median(pandas_t) * 1e3
        rows.append({"case": name, "points": int(data.size), "emakit_ms": round(o, 1),
                     "pandas_ms": round(p, 1), "speedup": round(p / o, 2),
                     "max_rel_diff": rel})
        print(f"{name:38s} emakit {o:8.1f} ms  pandas {p:8.1f} ms  x{p / o:5.2f}  "
              f"max diff / max|y| {rel:.1e}", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    meta = {"numpy": np.__version__, "pandas": pd.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": threads, "repeats": args.repeats,
            "command": "python benchmarks/smoothing_vs_pandas.py"}
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stem = out / f"smoothing-cpu-{threads}threads-numpy{np.__version__}-pandas{pd.__version__}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# ewm: emakit vs pandas ({meta['machine']}, {threads} threads, numpy "
             f"{np.__version__}, pandas {pd.__version__})", "",
             f"`{meta['command']}`; median of {args.repeats} interleaved runs.", "",
             "| case | points | emakit ms | pandas ms | pandas / emakit | max diff / max|y| |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['points']:.0e} | {r['emakit_ms']} | {r['pandas_ms']} | "
              f"{r['speedup']}x | {r['max_rel_diff']:.1e} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md/.json")


if __name__ == "__main__":
    main()
