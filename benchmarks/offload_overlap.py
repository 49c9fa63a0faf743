"""Exposed time per training step of an EMA whose shadows live in host memory (GPU model).

    python benchmarks/offload_overlap.py [--device cuda] [--layers 16] [--width 4096]
                                         [--tokens 4096] [--steps 20] [--every 1 8]

A stack of ``--layers`` bf16 ``Linear(width, width)`` + GELU trains with AdamW on random data.
For each contender the wall time of ``--steps`` whole training steps (after warm-up, ending with
a device synchronisation and, for emakit, a wait for the last offloaded fold) is divided by the
steps; **exposed ms/step** is that minus the same without any EMA, measured in the same run.

Contenders: no EMA; emakit with shadows on the GPU; emakit with shadows in host memory
(``device="cpu"``: pinned mirror, non-blocking copy, fold on a worker thread), the same attached
with ``overlap=True`` (the copy on a side stream during the next forward/backward); emakit's plain
per-tensor loop with host shadows (``foreach=False``: a synchronous ``.to("cpu")`` per tensor,
which is what offloading peers do); and timm's ``ModelEmaV3(device="cpu")`` when timm is
installed. Results go to ``benchmarks/results/offload-<device>-torch<version>.{md,json}``.
On a machine without CUDA, ``--device cpu`` runs the same steps (nothing is offloaded there:
the shadows are already in host memory); it is how the tests check this script.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import emakit
from emakit.bench.contenders import timm_model_ema

Update = Callable[[], Any]
# (model, optimizer, every) -> (call after each step, wait for the last update)
Contender = Callable[[nn.Module, Any, int], tuple[Update, Update]]


def _emakit(**options: Any) -> Contender:
    def make(model: nn.Module, opt: Any, every: int) -> tuple[Update, Update]:
        ema = emakit.EMA(model, decay=0.999, every=every, **options)
        return ema.update, lambda: ema.averaged()  # reading the shadows waits for the last fold

    return make


def _emakit_overlap(model: nn.Module, opt: Any, every: int) -> tuple[Update, Update]:
    ema = emakit.EMA(model, decay=0.999, every=every, device="cpu")
    ema.attach(opt, overlap=True)  # updates from the optimizer's hooks
    return lambda: None, lambda: ema.averaged()


def _timm(model: nn.Module, opt: Any, every: int) -> tuple[Update, Update]:
    ema = timm_model_ema().ModelEmaV3(model, decay=0.999, device="cpu")
    count = [0]

    def update() -> None:
        count[0] += 1
        if count[0] % every == 0:
            ema.update(model, step=count[0])

    return update, lambda: None


CONTENDERS: dict[str, Contender | None] = {
    "no EMA": None,
    "emakit, shadows on the GPU": _emakit(),
    "emakit, shadows in host memory": _emakit(device="cpu"),
    "emakit, host memory, attach(overlap=True)": _emakit_overlap,
    "emakit plain loop, host memory": _emakit(device="cpu", foreach=False),
    "timm ModelEmaV3(device='cpu')": _timm,
}


def _model(layers: int, width: int, device: str) -> nn.Module:
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks).to(device=device, dtype=torch.bfloat16)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(name: str, args: argparse.Namespace, every: int) -> float:
    """ms per training step for contender ``name`` with an update every ``every`` steps."""
    torch.manual_seed(0)
    model = _model(args.layers, args.width, args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(args.tokens, args.width, device=args.device, dtype=torch.bfloat16)
    make = CONTENDERS[name]
    update, wait = make(model, opt, every) if make is not None else (None, None)

    def step() -> None:
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if update is not None:
            update()

    def settle() -> None:
        _sync(args.device)
        if wait is not None:
            wait()

    for _ in range(max(3, every)):
        step()
    settle()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    settle()
    return float((time.perf_counter() - start) / args.steps * 1e3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many timings")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device; use --device cpu to try the script")
    names = [n for n in CONTENDERS if n != "timm ModelEmaV3(device='cpu')"]
    try:
        timm_model_ema()
        names.append("timm ModelEmaV3(device='cpu')")
    except ImportError:
        pass
    params = sum(p.numel() for p in _model(args.layers, args.width, "meta").parameters())
    rows = []
    for every in args.every:
        timed = {n: statistics.median(time_steps(n, args, every) for _ in range(args.repeats))
                 for n in names}
        base = timed["no EMA"]
        for name in names:
            ms = timed[name]
            rows.append({"contender": name, "every": every, "ms_per_step": ms,
                         "exposed_ms_per_step": ms - base})
            print(f"every={every} {name}: {ms:.2f} ms/step ({ms - base:+.2f} exposed)",
                  flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    version = torch.__version__.split("+")[0]
    stem = args.out / f"offload-{slug}-torch{version}"
    meta = {"device": device, "torch": torch.__version__, "params": params,
            "layers": args.layers, "width": args.width, "tokens": args.tokens,
            "steps": args.steps, "dtype": "bfloat16", "shadow dtype": "float32"}
    args.out.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Offloaded EMA: exposed time per training step ({device}, torch "
             f"{torch.__version__})", "",
             f"{params / 1e6:.0f}M bf16 parameters ({args.layers} x Linear({args.width}) + GELU), "
             f"AdamW, {args.tokens} tokens per step, fp32 shadows; median of {args.repeats} "
             f"timings of {args.steps} steps each.", "",
             "`python benchmarks/offload_overlap.py " + " ".join(argv) + "`", "",
             "| every | contender | ms / step | exposed ms / step |", "|---|---|---|---|"]
    lines += [f"| {r['every']} | {r['contender']} | {r['ms_per_step']:.2f} | "
              f"{r['exposed_ms_per_step']:+.2f} |" for r in rows]
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
