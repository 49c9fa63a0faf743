"""How far emakit's average is from each peer's over a long run, in ulp, update by update.

    python benchmarks/peer_agreement.py [--steps 200]

The model and training loop of the checkpoint tests (``tests/peers.py``: Linear, BatchNorm,
Linear; SGD with momentum on fixed random data), averaged side by side by emakit and by each
installed peer with the same decay convention (docs/migration.md): torch-ema at d = 0.9 and
0.99, diffusers ``EMAModel`` with its warmup, ema-pytorch ``EMA`` with its warmup
(``update_every=1``), timm ``ModelEmaV3``. After every update, the largest difference over the
parameters, in ulp of each tensor's largest magnitude (float32: 2^-23 of it); the table gives it
after 12 and 50 updates and the largest over the run. emakit rounds ``lerp`` once per update,
the peers two or three times; each update's difference is then damped by ``d`` at every later
update, so the differences stay bounded rather than growing with the run.

Writes ``benchmarks/results/peer-agreement-cpu-torch<version>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import emakit
from emakit.schedules import InverseGamma

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import peers  # the tests' model and loop


def ulps(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """The largest difference, in ulp of each tensor's largest magnitude (float32)."""
    worst = 0.0
    for name, want in theirs.items():
        got = ours[name].double()
        scale = 2.0**-23 * max(float(want.double().abs().max()), 1e-30)
        worst = max(worst, float((got - want.double()).abs().max()) / scale)
    return worst


def side_by_side(make: Callable[[torch.nn.Module], tuple[Any, Callable[[], dict[str, Any]]]],
                 ours_decay: Any, steps: int) -> list[float]:
    """ulp after each update of emakit's EMA next to the peer that ``make`` builds."""
    model = peers.net()
    names = [n for n, _ in model.named_parameters()]
    peer, read = make(model)
    ours = emakit.EMA(model, decay=ours_decay, policy=emakit.Policy(buffers="skip"))
    out: list[float] = []

    def after() -> None:
        peer.update() if hasattr(peer, "update") else peer.step(model.parameters())
        ours.update()
        theirs = read()
        out.append(ulps({n: ours.averaged()[n] for n in names},
                        {n: theirs[n].detach() for n in names}))

    peers.train(model, after, steps=steps)
    return out


def contenders() -> dict[str, Callable[[int], list[float]]]:
    """Name -> run(steps), for the peers that are installed."""
    runs: dict[str, Callable[[int], list[float]]] = {}
    try:
        from torch_ema import ExponentialMovingAverage
    except ImportError:
        pass
    else:
        def torch_ema_run(d: float) -> Callable[[int], list[float]]:
            def make(model: torch.nn.Module) -> tuple[Any, Any]:
                te = ExponentialMovingAverage(model.parameters(), decay=d, use_num_updates=False)
                names = [n for n, _ in model.named_parameters()]
                return te, lambda: dict(zip(names, te.shadow_params))

            return lambda steps: side_by_side(make, d, steps)

        for d in (0.9, 0.99):
            runs[f"torch-ema, d = {d}"] = torch_ema_run(d)
    warmup = InverseGamma(inv_gamma=1.0, power=2 / 3, max_decay=0.99)
    try:
        from diffusers.training_utils import EMAModel
    except ImportError:
        pass
    else:
        def diffusers(model: torch.nn.Module) -> tuple[Any, Any]:
            dm = EMAModel(model.parameters(), decay=0.99, use_ema_warmup=True, inv_gamma=1.0,
                          power=2 / 3)
            names = [n for n, _ in model.named_parameters()]
            return dm, lambda: dict(zip(names, dm.shadow_params))

        runs["diffusers EMAModel, warmup, max 0.99"] = \
            lambda steps: side_by_side(diffusers, warmup, steps)
    try:
        import ema_pytorch
    except ImportError:
        pass
    else:
        def ema_pt(model: torch.nn.Module) -> tuple[Any, Any]:
            ep = ema_pytorch.EMA(model, beta=0.99, update_after_step=0, update_every=1,
                                 inv_gamma=1.0, power=2 / 3, min_value=0.0,
                                 include_online_model=False)
            return ep, lambda: dict(ep.ema_model.named_parameters())

        runs["ema-pytorch EMA, warmup, max 0.99"] = \
            lambda steps: side_by_side(ema_pt, warmup, steps)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the peers' own deprecation chatter
    rows = []
    for name, run in contenders().items():
        series = run(args.steps)
        rows.append({"peer": name, "after_12": max(series[:12]), "after_50": max(series[:50]),
                     "max": max(series), "last": series[-1], "steps": args.steps})
        print(f"{name}: {rows[-1]['after_12']:.2f} / {rows[-1]['after_50']:.2f} / "
              f"{rows[-1]['max']:.2f} ulp", flush=True)
    version = torch.__version__.split("+")[0]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"peer-agreement-cpu-torch{version}"
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# emakit's average against each peer's, in ulp (torch {version})", "",
             f"`python benchmarks/peer_agreement.py --steps {args.steps}`: the largest "
             "difference over the parameters, in ulp of each tensor's largest magnitude, up to "
             "12 and 50 updates and over the whole run.", "",
             "| peer | up to 12 updates | up to 50 | whole run | last |", "|---|---|---|---|---|"]
    lines += [f"| {r['peer']} | {r['after_12']:.2f} | {r['after_50']:.2f} | {r['max']:.2f} | "
              f"{r['last']:.2f} |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
