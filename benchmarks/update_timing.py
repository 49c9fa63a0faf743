"""First timing of EMA.update() on the ResNet-50 layout: fast path vs plain loop vs one flat lerp_.

x flat = median update time / median time of one in-place lerp_ over a single flat fp32 buffer
with as many elements as the model has averaged values; the contenders are timed interleaved in
short chunks in one process so machine noise hits them alike.

    python benchmarks/update_timing.py [--repeats 30] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import emakit


def bottleneck(cin: int, mid: int, stride: int) -> nn.Module:
    cout = mid * 4
    layers = nn.Sequential(
        nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
        nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
        nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout),
    )
    if stride != 1 or cin != cout:
        layers.append(nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.BatchNorm2d(cout)))
    return layers


def resnet50_layout() -> nn.Module:
    """The parameter and buffer layout of ResNet-50 (25.6M parameters), built in plain torch."""
    blocks: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64)]
    cin = 64
    for mid, n, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(n):
            blocks.append(bottleneck(cin, mid, stride if i == 0 else 1))
            cin = mid * 4
    blocks.append(nn.Linear(2048, 1000))
    return nn.Sequential(*blocks)


def tiny_gpt() -> nn.Module:
    """A tiny GPT-style stack: about 1.0M parameters in 100 tensors (many small tensors)."""
    d = 128
    blocks: list[nn.Module] = [nn.Embedding(512, d)]
    for _ in range(8):
        blocks += [nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d),
                   nn.Linear(d, 2 * d), nn.Linear(2 * d, d)]
    blocks += [nn.LayerNorm(d), nn.Linear(d, 512, bias=False)]
    return nn.Sequential(*blocks)


def interleaved(contenders: dict, repeats: int, chunk: int = 5) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():  # warm up
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            for _ in range(chunk):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    cases = [("ResNet-50 layout, fp32", resnet50_layout, torch.float32),
             ("ResNet-50 layout, bf16 model, fp32 shadow", resnet50_layout, torch.bfloat16),
             ("tiny GPT-style, fp32", tiny_gpt, torch.float32)]
    for label, build, dtype in cases:
        model = build().to(dtype)
        fast = emakit.EMA(model, decay=0.999)
        loop = emakit.EMA(model, decay=0.999, foreach=False)
        guard = emakit.EMA(model, decay=0.999, skip_nonfinite=True)
        n = sum(s.numel() for s in fast.shadows.values() if s.is_floating_point())
        flat, end = torch.zeros(n), torch.ones(n)
        times = interleaved({
            "flat lerp_": lambda flat=flat, end=end: flat.lerp_(end, 0.001),
            "emakit default (foreach)": fast.update,
            "emakit plain loop": loop.update,
            "emakit skip_nonfinite=True": guard.update,
        }, args.repeats)
        ref = statistics.median(times["flat lerp_"])
        src_bytes = 2 if dtype == torch.bfloat16 else 4
        for name, ts in times.items():
            med = statistics.median(ts)
            moved = n * (src_bytes + 4 + 4) if name != "flat lerp_" else n * 12
            rows.append({"case": label, "contender": name, "median_ms": med * 1e3,
                         "x_flat": med / ref, "GB_per_s": moved / med / 1e9,
                         "params": n, "tensors": len(fast.shadows)})
    device = f"cpu-{torch.get_num_threads()}threads"
    stem = f"update-{device}-torch{torch.__version__.split('+')[0]}"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "processor": platform.processor(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "emakit": emakit.__version__, "repeats": args.repeats}
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# EMA.update() timings ({device}, torch {torch.__version__})", "",
             "| case | values / tensors | contender | median ms | x flat | GB/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['params'] / 1e6:.1f}M / {r['tensors']} | {r['contender']} | "
              f"{r['median_ms']:.3f} | {r['x_flat']:.2f} | {r['GB_per_s']:.1f} |" for r in rows]
    lines += ["", "Tensors count parameters and buffers (BN statistics; `num_batches_tracked` is "
              "copied). Command: `python benchmarks/update_timing.py`."]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
