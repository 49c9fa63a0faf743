"""One benchmark process: build a model, time the given contenders against the flat pass.

    python -m emakit.bench.worker '{"model": "resnet50", "contenders": ["emakit"], ...}'

Prints one JSON line (the last line of standard output) with a row per contender.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from emakit.bench.contenders import CONTENDERS, flat_reference
from emakit.bench.models import build
from emakit.bench.timing import interleaved, transient_bytes

__all__ = ["run"]

_BYTES = {torch.float32: 12.0, torch.bfloat16: 10.0, torch.float16: 10.0}


def run(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Time ``spec["contenders"]`` on ``spec["model"]``, one row per contender.

    Args:
        spec: ``model`` and ``contenders`` (names in :mod:`emakit.bench.models` and
            :mod:`emakit.bench.contenders`); optional ``device`` ("cpu"), ``dtype``
            ("float32"), ``chunks`` (15) and ``chunk_s`` (0.05) for
            :func:`emakit.bench.timing.interleaved`.

    Returns:
        Rows with the timings, ``chunks_kept``, ``chunks_discarded`` (noisy pairs),
        ``quiet`` and ``others_cpus`` (the load other processes put on the machine meanwhile),
        or ``skipped`` for a peer that is not installed.
    """
    device = spec.get("device", "cpu")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = build(spec["model"], device=device, dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    flat = flat_reference(n, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    scale = _BYTES[dtype] / _BYTES[torch.float32]  # the flat pass over the same bytes
    rows = []
    for name in spec["contenders"]:
        row: dict[str, Any] = {"model": spec["model"], "dtype": str(dtype).removeprefix("torch."),
                               "contender": name, "params": n,
                               "tensors": len(list(model.parameters()))}
        try:
            update = CONTENDERS[name](model, 0.999)
        except ImportError as exc:
            row["skipped"] = f"not installed: {exc}"
            rows.append(row)
            continue
        every = int(name.split("every=")[1]) if "every=" in name else 1
        result = interleaved(update, flat, chunks=spec.get("chunks", 15),
                             chunk_s=spec.get("chunk_s", 0.05), sync=sync, multiple=every)
        averages = int(name.split("multi x")[1]) if "multi x" in name else 1
        # the flat pass over the bytes this contender must move: source once, shadows N times
        moved = scale + (averages - 1) * 8.0 / _BYTES[torch.float32]
        flat_same_bytes = result.flat_s * moved
        row.update(update_ms=result.update_s * 1e3, flat_ms=flat_same_bytes * 1e3,
                   x_flat=result.update_s / flat_same_bytes,
                   gb_s=n * _BYTES[torch.float32] * moved / result.update_s / 1e9,
                   chunks_kept=result.kept, chunks_discarded=result.discarded,
                   quiet=result.quiet, others_cpus=result.others_cpus)
        if device == "cpu":
            row["transient_mb"] = (transient_bytes(update) or 0) / 1e6
        rows.append(row)
        del update
    return rows


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    print(json.dumps(run(spec)), flush=True)


if __name__ == "__main__":
    main()
